"""`cirlab pretrain` end to end on a tiny model: reproducible from the seed, and exports a loadable backbone."""

import torch

from cirlab.cli import main
from cirlab.data.shapes import synthesize
from cirlab.config import CONFIG_ROOT
from cirlab.models import load_backbone
from cirlab.training.checkpoint import load_model_state

TINY = "{embed_dim: 16, text_hidden: 32, text_layers: 1, text_heads: 2, vision_hidden: 16, stage_channels: [8, 8, 8, 8]}"


def pretrain(root, run_dir, seed):
    return main(["pretrain", "--config", str(CONFIG_ROOT / "pretrain" / "shapes_blip.yaml"), "--run-dir", str(run_dir),
                 "--set", f"data.root={root}", "--set", f"model.small={TINY}", "--set", "model.init_text=random",
                 "--set", "trainer.max_steps=2", "--set", "trainer.batch_size=16", "--set", "trainer.num_workers=0",
                 "--set", "method.eval_images=12", "--set", f"seed={seed}"])


def test_same_seed_same_weights_and_a_loadable_export(tmp_path):
    root = tmp_path / "shapes"
    synthesize(root, train_scenes=8, val_scenes=1, test_scenes=2, workers=1)
    assert pretrain(root, tmp_path / "a", 0) == 0
    assert pretrain(root, tmp_path / "b", 0) == 0
    assert pretrain(root, tmp_path / "c", 1) == 0
    a, b, c = (load_model_state(tmp_path / r / "latest.pt") for r in "abc")
    assert all(torch.equal(a[k], b[k]) for k in a)  # initialisation and training both follow the seed
    assert not all(torch.equal(a[k], c[k]) for k in a)
    backbone = load_backbone(tmp_path / "a" / "backbone")
    assert all(torch.equal(v, a[f"backbone.{k}"]) for k, v in backbone.state_dict().items())
