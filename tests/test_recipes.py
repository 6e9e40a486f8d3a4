"""The three recipes of docs/architecture.md, each followed end to end on tiny data.

Each test writes a user's plugin module into a temporary folder, exactly as a user would keep
it outside cirlab, names it in ``CIRLAB_PLUGINS`` and drives the ``cirlab`` command:

* add a method: a trainable stage (``register_stage``, ``composer_stage``), ``cirlab train`` then
  ``cirlab eval --model <run>/model``;
* add a benchmark: a user's own catalogue (``register_benchmark``), ``cirlab eval --dataset``;
* add a backbone: a new adapter kind (``register_backbone``), ``cirlab.load``, ``cirlab index
  build``, a search and an evaluation.

The ``plugins`` fixture leaves cirlab as it found it: the registries, the backbone tables and
the module table are restored after each test.
"""

from __future__ import annotations

import importlib
import json
import shutil
import sys
import textwrap

import pytest
import torch

import cirlab
from cirlab.cli import main
from cirlab.composers import QueryRecipe, ZeroShotComposer
from cirlab.config import load_config, method_section
from cirlab.models import load_backbone, loading
from cirlab.registry import BENCHMARKS, STAGES

CIRR_METRICS = {"R@1", "R@5", "R@10", "R@50", "Rs@1", "Rs@2", "Rs@3", "Avg"}


@pytest.fixture
def plugins(tmp_path, monkeypatch):
    """``write(name, source)``: a plugin module in ``tmp_path/plugins``, named in ``CIRLAB_PLUGINS``.

    The registries are discovered first (so that the copies below hold every built-in entry) and
    replaced by copies for the test; so are the backbone tables."""
    STAGES.keys(), BENCHMARKS.keys()
    monkeypatch.setattr(STAGES, "_entries", dict(STAGES._entries))
    monkeypatch.setattr(BENCHMARKS, "_entries", dict(BENCHMARKS._entries))
    monkeypatch.setattr(loading, "ADAPTERS", dict(loading.ADAPTERS))
    monkeypatch.setattr(loading, "MODEL_TYPES", dict(loading.MODEL_TYPES))
    folder = tmp_path / "plugins"
    folder.mkdir()
    monkeypatch.syspath_prepend(str(folder))
    names: list[str] = []

    def write(name: str, source: str) -> None:
        (folder / f"{name}.py").write_text(textwrap.dedent(source))
        importlib.invalidate_caches()
        names.append(name)
        monkeypatch.setenv("CIRLAB_PLUGINS", ",".join(names))

    yield write
    for name in names:
        sys.modules.pop(name, None)


# -- recipe 1: add a method ----------------------------------------------------------------------------

TOY_METHOD = '''
    """A toy method: the text projection of a BLIP backbone learns to move the reference image's
    embedding onto the target's (query = normalize(R + t)); everything else is frozen."""

    from typing import Literal

    from torch import nn

    from cirlab.composers import SumComposer
    from cirlab.config import ExperimentConfig, Strict
    from cirlab.data.torch_data import FeatureTriplets
    from cirlab.methods.common import (Stage, composer_stage, image_table, recipe_of, stage_backbone,
                                       training_splits, triplet_ids)
    from cirlab.methods.stages import register_stage
    from cirlab.training.losses import info_nce


    class ToyConfig(Strict):
        name: Literal["toy"] = "toy"
        logit_scale: float = 10.0
        max_text_length: int = 77


    class ToyModel(nn.Module):
        def __init__(self, backbone, image_embeds, cfg: ToyConfig):
            super().__init__()
            self.backbone, self.cfg = backbone, cfg
            backbone.requires_grad_(False)
            backbone.text_proj.requires_grad_(True)
            self.register_buffer("image_embeds", image_embeds, persistent=False)

        def training_step(self, batch: dict) -> dict:
            ref, tgt = self.image_embeds[batch["reference"]], self.image_embeds[batch["target"]]
            enc = self.backbone.tokenize(batch["text"], max_length=self.cfg.max_text_length)
            text = self.backbone.encode_text(enc.input_ids, enc.attention_mask)
            return {"loss": info_nce(ref + text, tgt, self.cfg.logit_scale)}


    @register_stage("toy", config=ToyConfig)
    def build(cfg: ExperimentConfig) -> Stage:
        backbone = stage_backbone(cfg, "method toy")
        recipe = recipe_of(cfg, cfg.method)
        splits = training_splits(cfg)
        table, rows = image_table(SumComposer(backbone, recipe), splits, cfg, triplet_ids)
        data = FeatureTriplets(splits[0], rows, lambda q: q.captions[0])
        model = ToyModel(backbone, table["embeds"], cfg.method)
        return composer_stage(cfg, model, data, lambda m: SumComposer(m.backbone, recipe))
'''


def test_add_a_method(plugins, tiny_shapes, tiny_random_blip, tmp_path):
    plugins("toy_method", TOY_METHOD)
    config = tmp_path / "toy.yaml"
    config.write_text(textwrap.dedent(f"""\
        defaults:
          data: shapes
          trainer: default
          evaluation: shapes
        name: toy-shapes
        data:
          root: {tiny_shapes}
        model:
          kind: blip
          backbone: {tiny_random_blip}
        method:
          name: toy
        trainer:
          max_steps: 4
          batch_size: 16
          select_metric: Avg
          optimizer: {{lr: 1.0e-3}}
        """))

    # the registry finds the stage through CIRLAB_PLUGINS; the method section is its config
    spec = STAGES[("toy", "toy")]
    assert spec.produces == "model" and spec.build is not None
    assert type(method_section({"name": "toy"})) is spec.config
    assert type(load_config(config).method) is spec.config

    run = tmp_path / "run"
    assert main(["train", "--config", str(config), "--run-dir", str(run)]) == 0
    evals = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any(r["event"] == "eval" and "Avg" in r for r in evals)
    manifest = json.loads((run / "model" / "composer.json").read_text())
    assert manifest["kind"] == "sum" and manifest["provenance"]["checkpoint"] == "best.pt"

    # only the text projection trained: the image side (and so the feature cache) is the start's
    start, trained = cirlab.load(tiny_random_blip), cirlab.load(run / "model")
    assert trained.backbone.image_fingerprint() == start.backbone.image_fingerprint()
    assert not torch.equal(trained.backbone.text_proj.weight, start.backbone.text_proj.weight)

    out = tmp_path / "eval"
    assert main(["eval", "--model", str(run / "model"), "--root", str(tiny_shapes), "--run-dir", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert list(metrics) == ["forward"] and set(metrics["forward"]) == CIRR_METRICS


# -- recipe 2: add a benchmark ---------------------------------------------------------------------------

CATALOG = '''
    """A user's own catalogue: <root>/<split>.json holds [{"id", "reference", "target", "caption"}],
    <root>/images/<image id>.png the images; every image is in the gallery."""

    from pathlib import Path

    from cirlab.data.base import (Benchmark, CIRSplit, PathTable, Protocol, Query, check_gallery,
                                  check_unique_qids, field, read_records, register_benchmark)


    def load_catalog(root: Path, split: str, category: str | None) -> CIRSplit:
        path = root / f"{split}.json"
        queries = [Query(qid=str(field(r, "id", path, i, (int, str))), reference=field(r, "reference", path, i, str),
                         captions=(field(r, "caption", path, i, str),), target=field(r, "target", path, i, str))
                   for i, r in enumerate(read_records(path, "catalog triplet file"))]
        check_unique_qids(queries, path)
        gallery = sorted(p.stem for p in (root / "images").glob("*.png"))
        check_gallery(gallery, root / "images")
        files = PathTable(root / "images", {i: f"{i}.png" for i in gallery})
        return CIRSplit("catalog", split, queries, gallery, files, exclude_reference=True)


    # CIRCO's predictions format fits any ids and needs no member sets (CIRR's needs both)
    register_benchmark(Benchmark("catalog", load_catalog, Protocol(recall_ks=(1, 5, 10)), submission="circo"))
'''


def _catalog(root, images: dict, triplets: list[dict], split: str = "test"):
    """A catalogue folder: ``images`` maps ids to the image files to copy."""
    (root / "images").mkdir(parents=True)
    for image_id, path in images.items():
        shutil.copyfile(path, root / "images" / f"{image_id}.png")
    (root / f"{split}.json").write_text(json.dumps(triplets))
    return root


def _eval_catalog(model, root, out) -> dict:
    # a plugin has no configs/data/<dataset>.yaml: eval takes the data defaults
    assert main(["eval", "--model", str(model), "--dataset", "catalog", "--root", str(root), "--split", "test",
                 "--run-dir", str(out)]) == 0
    return json.loads((out / "metrics.json").read_text())


def test_add_a_benchmark(plugins, tiny_shapes, tiny_random_blip, tmp_path):
    plugins("catalog_benchmark", CATALOG)
    assert BENCHMARKS["catalog"].protocol.recall_ks == (1, 5, 10)

    # the tiny shapes test triplets, as a catalogue
    records = json.loads((tiny_shapes / "captions" / "cap.shapes.test.json").read_text())
    files = json.loads((tiny_shapes / "image_splits" / "split.shapes.test.json").read_text())
    root = _catalog(tmp_path / "catalog", {i: tiny_shapes / rel for i, rel in files.items()},
                    [{"id": r["pairid"], "reference": r["reference"], "target": r["target_hard"],
                      "caption": r["caption"]} for r in records])
    # a plain backbone folder: cirlab.load gives its zero-shot (sum) model
    out = tmp_path / "eval"
    metrics = _eval_catalog(tiny_random_blip, root, out)
    assert list(metrics) == ["sum"] and set(metrics["sum"]) == {"R@1", "R@5", "R@10"}
    assert all(0 <= v <= 100 for v in metrics["sum"].values())
    submission = json.loads(next(out.glob("circo_submission_*.json")).read_text())
    assert set(submission) == {str(r["pairid"]) for r in records}

    # a hand-made case: each of four images also sits in the gallery as an exact copy ("<id>-copy").
    # The image-only model ranks the copy of the reference first (the reference itself is left out),
    # so the two queries whose target is that copy hit at rank 1 and the two others cannot: R@1 = 50.
    a, b, c, d = (f"test-{scene:06d}-0" for scene in range(4))
    images = {i: tiny_shapes / files[i] for i in (a, b, c, d)}
    assert len({path.read_bytes() for path in images.values()}) == 4  # four different pictures
    images.update({f"{i}-copy": path for i, path in images.items()})
    triplets = [{"id": 1, "reference": a, "target": f"{a}-copy", "caption": "the same"},
                {"id": 2, "reference": b, "target": f"{b}-copy", "caption": "the same"},
                {"id": 3, "reference": c, "target": d, "caption": "another scene"},
                {"id": 4, "reference": d, "target": c, "caption": "another scene"}]
    hand = _catalog(tmp_path / "hand", images, triplets)
    image_only = ZeroShotComposer(load_backbone(tiny_random_blip), QueryRecipe(), "image")
    metrics = _eval_catalog(image_only.save(tmp_path / "image-only"), hand, tmp_path / "eval-hand")
    assert metrics["image"]["R@1"] == 50.0
    assert metrics["image"]["R@10"] == 100.0  # 7 candidates: all in the top 10


# -- recipe 3: add a backbone ----------------------------------------------------------------------------

TOY_BACKBONE = '''
    """A toy backbone kind: cirlab's small CLIP under its own model_type and adapter kind."""

    from transformers import AutoConfig, AutoModel

    from cirlab.models import ClipBackbone, SmallClipConfig, SmallClipModel, register_backbone


    class ToyClipConfig(SmallClipConfig):
        model_type = "cirlab_test_toyclip"


    class ToyClipModel(SmallClipModel):
        config_class = ToyClipConfig


    class ToyClipBackbone(ClipBackbone):
        kind = "toyclip"
        default_transform = "resize"  # the preprocessing of its zero-shot model (cirlab.load)


    # saved folders load like any HF model (the tokenizer loader reads config.json's model_type too)
    AutoConfig.register(ToyClipConfig.model_type, ToyClipConfig, exist_ok=True)
    AutoModel.register(ToyClipConfig, ToyClipModel, exist_ok=True)
    register_backbone(ToyClipBackbone, {ToyClipConfig.model_type: ToyClipModel})
'''


def test_add_a_backbone(plugins, tiny_shapes, tmp_path):
    from cirlab.data.registry import load_splits
    from cirlab.evaluation.evaluate import evaluate_composer
    from cirlab.models import build_backbone, save_backbone, small_clip_config
    from cirlab.retrieval.search import Query, Searcher

    plugins("toy_backbone", TOY_BACKBONE)
    toy = importlib.import_module("toy_backbone")  # the plugin's classes build a folder of the new model_type
    assert loading.MODEL_TYPES["cirlab_test_toyclip"] == ("toyclip", toy.ToyClipModel)

    torch.manual_seed(0)
    sizes = small_clip_config(embed_dim=16, text_hidden=32, text_layers=1, text_heads=2, vision_hidden=16,
                              stage_channels=(8, 8, 8, 8)).to_dict()
    config = toy.ToyClipConfig(**{k: sizes[k] for k in ("text_config", "vision_config", "projection_dim")})
    folder = save_backbone(build_backbone(config), tmp_path / "toyclip")
    assert json.loads((folder / "config.json").read_text())["model_type"] == "cirlab_test_toyclip"

    # as in a new process: nothing knows the plugin until a folder of its model_type is loaded
    sys.modules.pop("toy_backbone")
    del loading.MODEL_TYPES["cirlab_test_toyclip"], loading.ADAPTERS["toyclip"]
    composer = cirlab.load(folder)
    toy = sys.modules["toy_backbone"]
    assert isinstance(composer, ZeroShotComposer) and isinstance(composer.backbone, toy.ToyClipBackbone)
    assert composer.recipe.transform == "resize"

    index = tmp_path / "index"
    assert main(["index", "build", "--model", str(folder), "--dataset", "shapes", "--root", str(tiny_shapes),
                 "--split", "test", "--out", str(index)]) == 0
    searcher = Searcher.open(index)
    reference = json.loads((tiny_shapes / "captions" / "cap.shapes.test.json").read_text())[0]
    hits, = searcher.search([Query("make it red", id=reference["reference"])], k=5)
    assert len(hits) == 5 and reference["reference"] not in {h.id for h in hits}
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)

    result = evaluate_composer(composer, load_splits("shapes", tiny_shapes, "test"))
    assert set(result.metrics["sum"]) == CIRR_METRICS
