"""Config composition: groups merge in order, experiments override, errors name file and field."""

from pathlib import Path

import pytest

from cirlab.config import CONFIG_ROOT, apply_overrides, compose, load_config


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_groups_merge_then_experiment_overrides(tmp_path):
    write(tmp_path / "data" / "toy.yaml", "dataset: cirr\nroot: /x\nimage_size: 384\n")
    write(tmp_path / "trainer" / "t.yaml", "epochs: 3\noptimizer: {lr: 0.001, weight_decay: 0.1}\n")
    exp = write(tmp_path / "exp.yaml",
                "defaults: {data: toy, trainer: t}\nseed: 7\ntrainer: {optimizer: {lr: 0.5}}\n")
    raw = compose(exp, config_root=tmp_path)
    assert raw["data"] == {"dataset": "cirr", "root": "/x", "image_size": 384}
    assert raw["trainer"]["optimizer"] == {"lr": 0.5, "weight_decay": 0.1}  # deep merge keeps siblings
    assert raw["trainer"]["epochs"] == 3 and raw["seed"] == 7


def test_overrides_parse_yaml_scalars():
    cfg = apply_overrides({"trainer": {"epochs": 1}}, ["trainer.epochs=5", "trainer.optimizer.lr=1e-3", "name=x"])
    assert cfg["trainer"]["epochs"] == 5
    assert cfg["trainer"]["optimizer"]["lr"] == pytest.approx(1e-3)
    assert cfg["name"] == "x"
    with pytest.raises(ValueError, match="key.path=value"):
        apply_overrides({}, ["oops"])


def test_unknown_field_is_an_error_naming_file_and_field(tmp_path):
    exp = write(tmp_path / "bad.yaml", "trainer: {epochz: 3}\n")
    with pytest.raises(ValueError) as e:
        load_config(exp)
    assert "bad.yaml" in str(e.value) and "trainer.epochz" in str(e.value)


def test_missing_group_file_names_the_expected_path(tmp_path):
    exp = write(tmp_path / "exp.yaml", "defaults: {data: nope}\n")
    with pytest.raises(FileNotFoundError, match="nope"):
        compose(exp, config_root=tmp_path)


@pytest.mark.parametrize("path", sorted((CONFIG_ROOT / "data").glob("*.yaml")), ids=lambda p: p.stem)
def test_shipped_data_configs_validate(path, tmp_path):
    exp = write(tmp_path / "exp.yaml", f"defaults: {{data: {path.stem}, trainer: default}}\n")
    cfg = load_config(exp)
    assert cfg.data.dataset == path.stem
