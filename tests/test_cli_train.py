"""`cirlab pretrain` end to end on a tiny model: reproducible from the seed, resumable, exports a
loadable backbone that `cirlab eval` scores."""

import pytest
import torch

from cirlab.cli import main
from cirlab.data.shapes import synthesize
from cirlab.config import CONFIG_ROOT
from cirlab.methods.pretrain import Pretrainer
from cirlab.models import load_backbone
from cirlab.training.checkpoint import load_checkpoint, load_model_state
from cirlab.utils.io import read_json

TINY = "{embed_dim: 16, text_hidden: 32, text_layers: 1, text_heads: 2, vision_hidden: 16, stage_channels: [8, 8, 8, 8]}"


def pretrain(root, run_dir, seed, *sets):
    return main(["pretrain", "--config", str(CONFIG_ROOT / "pretrain" / "shapes_blip.yaml"), "--run-dir", str(run_dir),
                 "--set", f"data.root={root}", "--set", f"model.small={TINY}", "--set", "model.init_text=random",
                 "--set", "trainer.max_steps=2", "--set", "trainer.batch_size=16", "--set", "trainer.num_workers=0",
                 "--set", "method.eval_images=12", "--set", f"seed={seed}", *(x for s in sets for x in ("--set", s))])


def test_same_seed_same_weights_and_a_loadable_export(tmp_path):
    root = tmp_path / "shapes"
    synthesize(root, train_scenes=8, val_scenes=1, test_scenes=2, workers=1)
    assert pretrain(root, tmp_path / "a", 0) == 0
    assert pretrain(root, tmp_path / "b", 0) == 0
    assert pretrain(root, tmp_path / "c", 1) == 0
    a, b, c = (load_model_state(tmp_path / r / "latest.pt") for r in "abc")
    assert all(torch.equal(a[k], b[k]) for k in a)  # initialisation and training both follow the seed
    assert not all(torch.equal(a[k], c[k]) for k in a)
    # the export is the checkpoint trainer.select_metric chose (one evaluation, at the end: the final weights)
    backbone = load_backbone(tmp_path / "a" / "backbone")
    best = load_checkpoint(tmp_path / "a" / "best.pt")
    assert best["step"] == 2
    assert all(torch.equal(v, best["model"][f"backbone.{k}"]) for k, v in backbone.state_dict().items())
    assert all(torch.equal(v, a[f"backbone.{k}"]) for k, v in backbone.state_dict().items())

    # `cirlab eval` of the export: scene caption retrieval over all images and over the 2 references
    config, export = CONFIG_ROOT / "pretrain" / "shapes_blip.yaml", tmp_path / "a" / "backbone"
    assert main(["eval", "--config", str(config), "--run-dir", str(tmp_path / "eval"),
                 "--set", f"data.root={root}", "--set", f"model.backbone={export}"]) == 0
    metrics = read_json(tmp_path / "eval" / "metrics.json", "metrics")
    assert set(metrics) == {"all images", "reference scenes"}
    for row in metrics.values():
        assert set(row) == {"i2t_R@1", "i2t_R@5", "t2i_R@1", "t2i_R@5"}
    assert metrics["reference scenes"]["i2t_R@5"] == 100.0  # 2 distinct captions: top 5 holds both


def test_an_interrupted_pretraining_resumes_to_the_weights_of_an_uninterrupted_one(tmp_path, monkeypatch):
    root = tmp_path / "shapes"
    synthesize(root, train_scenes=8, val_scenes=1, test_scenes=2, workers=1)
    sets = ("trainer.max_steps=4", "trainer.checkpoint_every_steps=2")  # ITM draws random negatives every step
    assert pretrain(root, tmp_path / "straight", 0, *sets) == 0

    step, calls = Pretrainer.training_step, []

    def crash_at_step_3(self, batch):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return step(self, batch)

    monkeypatch.setattr(Pretrainer, "training_step", crash_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        pretrain(root, tmp_path / "cut", 0, *sets)
    monkeypatch.setattr(Pretrainer, "training_step", step)
    assert load_model_state(tmp_path / "cut" / "latest.pt") is not None
    assert main(["pretrain", "--resume", "--run-dir", str(tmp_path / "cut")]) == 0

    straight, resumed = (load_model_state(tmp_path / r / "latest.pt") for r in ("straight", "cut"))
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
