"""Every shipped experiment config builds, trains one step and evaluates, on tiny data in each
benchmark's layout (tiny shapes, and the same images written as CIRR and FashionIQ), with tiny
backbones in place of the real-size ones. A crash at the first evaluation (as FashionIQ
re-ranking had) fails here rather than after hours of training."""

import json
import os
import shutil

import pytest
import torch
import yaml

from cirlab.cli import main
from cirlab.config import CONFIG_ROOT, load_config, stage_key
from cirlab.models import build_small_clip, save_backbone

def _experiments() -> list:
    """Every shipped experiment config: each YAML under configs/ with a method section (the group
    files hold none), wherever it sits, so a new method's configs are found without a list."""
    found = []
    for path in sorted(CONFIG_ROOT.rglob("*.yaml")):
        raw = yaml.safe_load(path.read_text())
        if isinstance(raw, dict) and isinstance(raw.get("method"), dict):
            found.append(path)
    return found


EXPERIMENTS = _experiments()
TINY_SMALL = "{embed_dim: 16, text_hidden: 32, text_layers: 1, text_heads: 2, vision_hidden: 16, stage_channels: [8, 8, 8, 8]}"


def test_every_registered_stage_has_a_shipped_config():
    """A stage of cirlab.methods with no shipped config would go untested here: name it."""
    from cirlab.registry import STAGES

    builtin = {key for key, spec in STAGES.items()
               if (spec.build or spec.composers or spec.run).__module__.startswith("cirlab.methods.")}
    covered = {stage_key(load_config(p).method) for p in EXPERIMENTS}
    assert builtin - covered == set()
    assert len(EXPERIMENTS) >= len(builtin)


def _link_images(src, dst):
    dst.mkdir(parents=True, exist_ok=True)
    for path in src.rglob("*.png"):
        target = dst / path.relative_to(src)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.link(path, target)


@pytest.fixture(scope="module")
def roots(tiny_shapes, tmp_path_factory):
    """``{dataset: root}``: tiny shapes, and its triplets in the CIRR and FashionIQ layouts."""
    base = tmp_path_factory.mktemp("layouts")
    cirr = base / "cirr_dataset"
    _link_images(tiny_shapes / "images", cirr / "images")
    for kind in ("captions", "image_splits"):
        (cirr / "cirr" / kind).mkdir(parents=True)
        for path in (tiny_shapes / kind).glob("*.json"):
            split = path.name.split(".")[-2]
            if split in ("train", "val"):
                shutil.copyfile(path, cirr / "cirr" / kind / path.name.replace(".shapes.", ".rc2."))
    fiq = base / "fashionIQ_dataset"
    _link_images(tiny_shapes / "images", fiq / "images")
    for image in list((fiq / "images").rglob("*.png")):
        image.rename(fiq / "images" / image.name)  # FashionIQ: images/<id>.png
    (fiq / "captions").mkdir()
    (fiq / "image_splits").mkdir()
    for split in ("train", "val"):
        triplets = json.loads((tiny_shapes / "captions" / f"cap.shapes.{split}.json").read_text())
        records = [{"candidate": t["reference"], "target": t["target_hard"],
                    "captions": [t["caption"], t["caption_reversed"]]} for t in triplets]
        gallery = sorted(json.loads((tiny_shapes / "image_splits" / f"split.shapes.{split}.json").read_text()))
        for category in ("dress", "shirt", "toptee"):
            (fiq / "captions" / f"cap.{category}.{split}.json").write_text(json.dumps(records))
            (fiq / "image_splits" / f"split.{category}.{split}.json").write_text(json.dumps(gallery))
    return {"shapes": tiny_shapes, "cirr": cirr, "fashioniq": fiq}


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    torch.manual_seed(0)
    clip = build_small_clip(embed_dim=32, text_hidden=32, text_layers=1, text_heads=2, vision_hidden=32,
                            stage_channels=(8, 8, 16, 16))
    return save_backbone(clip, tmp_path_factory.mktemp("tiny-clip") / "clip")


def _spn_base(config, tiny_pretrained_blip, tiny_clip, folder):
    """The first-stage model an SPN config names in its comment: sum, filter or projection."""
    from cirlab.composers import GroundedComposer, ProjectionComposer, QueryRecipe, SumComposer
    from cirlab.models import load_backbone
    from cirlab.models.phi import Phi

    if "zeroshot" in config.stem:
        clip = load_backbone(tiny_clip)
        return ProjectionComposer(clip, QueryRecipe(prompt="a photo of $ that {text}"),
                                  Phi("searle", clip.embed_dim, clip.token_dim)).save(folder)
    kind = GroundedComposer if "filter" in config.stem else SumComposer
    return kind(load_backbone(tiny_pretrained_blip), QueryRecipe()).save(folder)


@pytest.mark.slow
@pytest.mark.parametrize("config", EXPERIMENTS, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_every_shipped_config_trains_a_step_and_evaluates(config, roots, tiny_pretrained_blip, tiny_clip, tmp_path,
                                                          stub_chat):
    cfg = load_config(config)
    dataset, method = cfg.data.dataset, cfg.method
    backbone = tiny_clip if cfg.model.kind == "clip" else tiny_pretrained_blip
    if method.name == "spn":
        backbone = _spn_base(config, tiny_pretrained_blip, tiny_clip, tmp_path / "base")
    if getattr(method, "stage", None) == "generate":  # `cirlab train` runs the generate stage; the file loads as training data
        from cirlab.data.registry import extend_split, load_splits

        out = tmp_path / "gen" / ("cap.{category}.extend.json" if dataset == "fashioniq" else "extend.json")
        sets = [f"data.root={roots[dataset]}", f"model.backbone={backbone}", f"method.out={out}",
                "method.window=[1,20]", f"method.captioner.url=http://127.0.0.1:{stub_chat.server_address[1]}/v1"]
        if dataset == "fashioniq":
            sets.append("data.categories=[dress,shirt]")
        assert main(["train", "--config", str(config), *(x for s in sets for x in ("--set", s))]) == 0
        categories = ["dress", "shirt"] if dataset == "fashioniq" else None
        for split in load_splits(dataset, roots[dataset], "train", categories=categories):
            extended = extend_split(split, out)
            assert len(extended.queries) > len(split.queries)
        return
    if method.name == "rtd":  # RTD starts from a projection model (a base's export)
        from cirlab.composers import ProjectionComposer, QueryRecipe
        from cirlab.models import load_backbone
        from cirlab.models.phi import Phi

        clip = load_backbone(tiny_clip)
        backbone = ProjectionComposer(clip, QueryRecipe(prompt="a photo of $ that {text}"),
                                      Phi("searle", clip.embed_dim, clip.token_dim)).save(tmp_path / "base")
    sets = [f"data.root={roots[dataset]}", "evaluation.batch_size=16"]
    if method.name in ("projection", "rtd") and dataset != "shapes":  # real-size text inputs: tiny shapes' own
        from cirlab.data.registry import load_split
        from cirlab.data.text_triplets import shapes_triplets

        triplets = shapes_triplets(load_split("shapes", roots["shapes"], "train"))
        if getattr(method, "captions", None):
            (tmp_path / "captions.txt").write_text("\n".join(t.reference_caption for t in triplets))
            sets.append(f"method.captions={tmp_path / 'captions.txt'}")
        if method.name == "rtd":
            (tmp_path / "triplets.json").write_text(json.dumps([t.__dict__ for t in triplets]))
            sets.append(f"method.triplets={tmp_path / 'triplets.json'}")
    if dataset == "fashioniq":
        sets.append("data.categories=[dress,shirt]")
    if method.name == "pretrain":
        sets += [f"model.small={TINY_SMALL}", "model.init_text=random", "method.eval_images=12"]
    else:
        sets.append(f"model.backbone={backbone}")
    if method.name in ("bidirectional", "rerank", "pretrain", "projection", "rtd", "spn"):
        sets += ["trainer.max_steps=1", "trainer.epochs=1", "trainer.batch_size=4", "trainer.num_workers=0",
                 "trainer.eval_every_epochs=1", "trainer.checkpoint_every_steps=null"]
    if getattr(method, "stage", None) == "combiner":
        sets += ["method.projection_dim=16", "method.hidden_dim=16"]
    if getattr(method, "stage", None) == "reranker":
        sets += ["method.reranker_init=null", "method.eval_queries=4", "method.k=5"]
    args = [x for s in sets for x in ("--set", s)]
    run = tmp_path / "run"
    if method.name == "zeroshot":
        assert main(["eval", "--config", str(config), "--split", "val", "--run-dir", str(run), *args]) == 0
        assert set(json.loads((run / "metrics.json").read_text())) == set(method.modes)
        return
    command = "pretrain" if method.name == "pretrain" else "train"
    assert main([command, "--config", str(config), "--run-dir", str(run), *args]) == 0
    evals = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any(r["event"] == "eval" and cfg.trainer.select_metric in r for r in evals)
    if method.name == "pretrain":
        assert main(["eval", "--config", str(config), "--run-dir", str(tmp_path / "eval"), "--set",
                     f"data.root={roots[dataset]}", "--set", f"model.backbone={run / 'backbone'}"]) == 0
        return
    out = tmp_path / "eval"
    categories = ["--categories", "dress", "shirt"] if dataset == "fashioniq" else []
    assert main(["eval", "--model", str(run / "model"), "--dataset", dataset, "--root", str(roots[dataset]),
                 "--split", "val", "--run-dir", str(out), "--max-queries", "6", *categories]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    if dataset == "fashioniq":
        assert all({"dress/R@10", "shirt/R@50", "avg"} <= set(row) for row in metrics.values())
