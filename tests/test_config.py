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


def test_fields_that_nothing_reads_are_rejected():
    """data.image_size, data.num_workers and data.test_split did nothing: now they are errors."""
    for key in ("data.image_size=384", "data.num_workers=8", "data.test_split=test"):
        with pytest.raises(ValueError, match=key.split("=")[0].split(".")[1]):
            load_config(CONFIG_ROOT / "bidirectional" / "shapes_text.yaml", [key])


def test_method_sections_are_typed_per_stage_with_resolved_defaults(tmp_path):
    from cirlab.methods.bidirectional import BiTextConfig
    from cirlab.training.run import RunDir

    cfg = load_config(CONFIG_ROOT / "bidirectional" / "shapes_text.yaml")
    assert isinstance(cfg.method, BiTextConfig) and cfg.method.reversed_target == "normalized"
    with pytest.raises(ValueError, match="projection_dim"):  # a stage-II field in a stage-I config
        load_config(CONFIG_ROOT / "bidirectional" / "shapes_text.yaml", ["method.projection_dim=8"])
    with pytest.raises(ValueError, match="method.stage"):
        load_config(CONFIG_ROOT / "bidirectional" / "shapes_text.yaml", ["method.stage=nope"])
    # the run's config.yaml holds every default, so a changed default cannot change a --resume
    import yaml

    run = RunDir.create(cfg, tmp_path / "run")
    written = yaml.safe_load(run.config_path.read_text())["method"]
    assert written["reversed_target"] == "normalized" and written["text_proj_lr_scale"] == 100
    assert run.load_config() == cfg
    run.unlock()


def test_earlier_spellings_are_refused_naming_the_current_one():
    """RTD is its own method and the zero-shot configs live under configs/zeroshot: the old
    section and the old paths fail with the new ones named, not with a bare 'not found'."""
    from cirlab.cli import main
    from cirlab.methods.projection import RtdConfig

    assert isinstance(load_config(CONFIG_ROOT / "rtd" / "shapes_rtd.yaml").method, RtdConfig)
    with pytest.raises(ValueError, match=r"method: projection, stage rtd is now method: \{name: rtd\}"):
        load_config(CONFIG_ROOT / "rtd" / "shapes_rtd.yaml", ["method.name=projection", "method.stage=rtd"])
    with pytest.raises(FileNotFoundError, match=r"moved to configs/zeroshot/shapes_zeroshot_blip\.yaml"):
        load_config("configs/eval/shapes_zeroshot_blip.yaml")
    with pytest.raises(FileNotFoundError, match=r"moved to configs/rtd/cirr_rtd\.yaml"):
        load_config(CONFIG_ROOT / "projection" / "cirr_rtd.yaml")
    assert main(["eval", "--config", "configs/eval/shapes_zeroshot_clip.yaml"]) == 2  # a sentence, exit 2


def test_shipped_shapes_configs_point_where_the_demo_writes():
    """After `make demo`, `cirlab train --config configs/.../shapes_*.yaml` runs as written."""
    import inspect

    from cirlab.cli import demo

    source = inspect.getsource(demo)
    out = "runs/demo"
    assert '"runs/demo"' in source and 'args.out / "shapes"' in source
    for group, name in (("bidirectional", "shapes_text"), ("rerank", "shapes_filter"), ("zeroshot", "shapes_zeroshot_blip")):
        cfg = load_config(CONFIG_ROOT / group / f"{name}.yaml")
        assert cfg.data.root == f"{out}/shapes" and cfg.model.backbone == f"{out}/pretrain-blip/backbone"
    assert load_config(CONFIG_ROOT / "bidirectional" / "shapes_combiner.yaml").model.backbone == f"{out}/bi-text/model"
    reranker = load_config(CONFIG_ROOT / "rerank" / "shapes_reranker.yaml")
    assert reranker.model.backbone == f"{out}/spn-bank/model"  # the demo's chain: stage I -> SPN -> re-ranker
    assert reranker.method.reranker_init is None  # initialised from the first stage it re-ranks
    assert load_config(CONFIG_ROOT / "spn" / "shapes_bank.yaml").model.backbone == f"{out}/bi-text/model"
    for stage in ('"bi-text"', '"pretrain-blip"', '"spn-bank"', '"rerank-reranker"', '"pic2word"', '"rtd"'):
        assert stage in source


def test_demo_overrides_are_valid_fields_of_their_configs():
    """A typo in the demo's per-stage `--set`s would fail only minutes into `make demo`."""
    from cirlab.cli import demo

    configs = {"pretrain": ("pretrain", "shapes_blip"), "bi-text": ("bidirectional", "shapes_text"),
               "bi-combiner": ("bidirectional", "shapes_combiner"),
               "rerank-reranker": ("rerank", "shapes_reranker"), "spn-bank": ("spn", "shapes_bank"),
               "pic2word": ("projection", "shapes_pic2word"), "rtd": ("rtd", "shapes_rtd")}
    for overrides in (demo.QUICK, demo.DEMO):
        for stage, sets in overrides.items():
            if stage == "synth":  # `cirlab data synth` arguments, not config fields
                continue
            group, name = configs[stage]
            cfg = load_config(CONFIG_ROOT / group / f"{name}.yaml", sets)
            assert cfg != load_config(CONFIG_ROOT / group / f"{name}.yaml"), (stage, sets)
    reranker = load_config(CONFIG_ROOT / "rerank" / "shapes_reranker.yaml", demo.DEMO["rerank-reranker"])
    assert reranker.method.k == 10 and reranker.method.eval_queries == 250


def test_no_docstring_cites_a_file_users_do_not_have():
    root = Path(__file__).resolve().parents[1]
    for path in [*root.glob("src/**/*.py"), *root.glob("configs/**/*.yaml"), *root.glob("docs/**/*.md"),
                 root / "README.md"]:
        assert "REFERENCE" not in path.read_text(), path


def test_shipped_configs_are_package_data_and_their_repository_paths_work_from_any_folder(tmp_path, monkeypatch):
    """configs/ is a link to src/cirlab/configs (shipped in the wheel); `configs/...` paths as the docs
    give them load from any folder, so an installed cirlab runs them without a checkout."""
    root = Path(__file__).resolve().parents[1]
    assert CONFIG_ROOT.parent.name == "cirlab" and (root / "configs").resolve() == CONFIG_ROOT
    monkeypatch.chdir(tmp_path)
    assert load_config("configs/bidirectional/shapes_text.yaml") == load_config(
        CONFIG_ROOT / "bidirectional" / "shapes_text.yaml")
    with pytest.raises(FileNotFoundError, match=r"moved to configs/zeroshot/shapes_zeroshot_blip\.yaml"):
        load_config("configs/eval/shapes_zeroshot_blip.yaml")
    own = write(tmp_path / "configs" / "bidirectional" / "shapes_text.yaml",
                "defaults: {data: shapes}\nname: own\nmethod: {name: zeroshot}\n")
    assert load_config("configs/bidirectional/shapes_text.yaml").name == "own"  # a file that exists comes first
    assert own.is_file()
