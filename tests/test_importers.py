"""``cirlab import``: every released checkpoint layout imports, round-trips and refuses bad files.

Each layout is a fixture of facts (tests/fixtures/layouts/<kind>.json: the file's top-level entries,
every key name and its shape at real size, recorded from the official code, see docs/compat.md).
The tests build a random checkpoint of that layout with the widths shrunk (768 -> 64, ...), import
it and check that every tensor the model uses arrives unchanged (found by its bytes), that a
missing, misshapen or unknown key and a truncated file are refused with the file and the key
named and nothing written, and that an imported folder evaluates, indexes and is served.
The equality of outputs with the official code at real size is measured outside the tests
(benchmarks/compat/compare_models.py; figures in docs/compat.md)."""

import hashlib
import json
from pathlib import Path

import pytest
import torch
from transformers import CLIPConfig, CLIPModel

import cirlab
from cirlab.cli import main
from cirlab.composers import GroundedComposer, RerankComposer, ZeroShotComposer
from cirlab.models import save_backbone
from cirlab.models.clip import ClipBackbone
from cirlab.retrieval.search import Query, Searcher

LAYOUTS = Path(__file__).parent / "fixtures" / "layouts"
# real widths -> test widths (BLIP/CLIP widths 768/1024 and their 4x, the 256-d embedding, the Combiner)
SHRINK = {768: 64, 1024: 64, 3072: 256, 4096: 256, 2304: 192, 1536: 128, 256: 32, 2560: 48, 5120: 96}
# what a layout holds that no cirlab model keeps (momentum copies, queues, the captioning decoder,
# learned temperatures, BERT position ids, Pic2Word's frozen CLIP copy)
UNUSED = ("_m.", "queue", "text_decoder.", "temp", "tau", "position_ids", "Pic2Word-CLIP")


def layout(kind: str) -> dict:
    return json.loads((LAYOUTS / f"{kind}.json").read_text())


def random_checkpoint(kind: str, path: Path, seed: int = 0, drop: str | None = None, reshape: str | None = None,
                      extra: str | None = None) -> dict[str, torch.Tensor]:
    """A random checkpoint of ``kind``'s layout, shrunk, saved at ``path``; returns its tensors by
    ``<top>/<key>``. ``drop``/``reshape`` a key (substring), ``extra``: add an unknown key."""
    spec = layout(kind)
    g = torch.Generator().manual_seed(seed)
    saved: dict = {k: {} if v in ("state_dict", "optimizer_state_dict") else (3 if v == "int" else "x")
                   for k, v in spec["top_level"].items()}
    tensors = {}
    for name, shape in spec["tensors"].items():
        if drop and drop in name:
            drop = None
            continue
        shape = [SHRINK.get(s, s) for s in shape]
        if reshape and reshape in name:
            shape, reshape = [s + 1 for s in shape], None
        t = (torch.arange(shape[-1]).expand(*shape).clone() if name.endswith("position_ids")
             else torch.randn(shape, generator=g))
        top, _, key = name.partition("/")
        saved[top][key] = tensors[name] = t
    if extra:
        top = next(k for k, v in spec["top_level"].items() if v == "state_dict")
        saved[top][extra] = torch.zeros(2)
    torch.save(saved, path)
    return tensors


def digests(module: torch.nn.Module) -> set[str]:
    return {hashlib.sha1(t.detach().float().contiguous().numpy().tobytes()).hexdigest() for t in module.state_dict().values()}


def assert_round_trip(tensors: dict[str, torch.Tensor], model: torch.nn.Module, skip=()) -> None:
    """Every used tensor of the checkpoint is one of the model's, bytes equal."""
    have = digests(model)
    used = {k: v for k, v in tensors.items() if not any(u in k for u in (*UNUSED, *skip))}
    lost = [k for k, v in used.items() if hashlib.sha1(v.float().contiguous().numpy().tobytes()).hexdigest() not in have]
    assert not lost, f"{len(lost)} of {len(used)} tensors did not arrive unchanged, e.g. {lost[:3]}"


def run(*args: str) -> int:
    return main(["import", *map(str, args)])


@pytest.fixture(scope="module")
def blip_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("blip") / "model_base.pth"
    return path, random_checkpoint("blip", path, seed=1)


@pytest.fixture(scope="module")
def stage1_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("rerank1") / "blip_mean.pt"
    return path, random_checkpoint("rerank-stage1", path, seed=3)


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    """A CLIP folder whose text side has the shrunk RTD layout's shapes (and the real CLIP vocabulary size)."""
    from cirlab.models import minilm_tokenizer

    text = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=12, num_attention_heads=4,
                max_position_embeddings=77, vocab_size=49408, eos_token_id=102, bos_token_id=101, pad_token_id=0)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32,
                  patch_size=16)
    torch.manual_seed(0)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=64)).eval()
    return save_backbone(ClipBackbone(model, minilm_tokenizer()), tmp_path_factory.mktemp("clip") / "clip")


def test_blip_model_base_imports_as_a_backbone_whose_load_is_zero_shot(blip_file, tmp_path):
    path, tensors = blip_file
    assert run("blip", path, "--out", tmp_path / "blip") == 0
    model = cirlab.load(tmp_path / "blip")
    assert isinstance(model, ZeroShotComposer) and model.mode == "sum" and model.backbone.image_size == 384
    assert model.backbone.enc_token_id == 30523
    # everything but the position embedding (resized 197 -> 577 positions) arrives unchanged
    assert_round_trip(tensors, model.backbone.model, skip=("pos_embed",))
    pos = model.backbone.model.vision_model.embeddings.position_embedding
    assert pos.shape == (1, 577, 64) and torch.equal(pos[0, 0], tensors["model/visual_encoder.pos_embed"][0, 0])


def test_bi_blip4cir_imports_stage_one_and_the_combiner(blip_file, tmp_path):
    stage1 = random_checkpoint("bi-blip4cir-stage1", tmp_path / "tuned_blip_mean.pt", seed=2)
    combiner = random_checkpoint("bi-blip4cir-combiner", tmp_path / "combiner_mean.pt", seed=4)
    assert run("bi-blip4cir", tmp_path / "tuned_blip_mean.pt", "--blip", blip_file[0], "--out", tmp_path / "s1") == 0
    assert run("bi-blip4cir", tmp_path / "tuned_blip_mean.pt", "--blip", blip_file[0], "--combiner",
               tmp_path / "combiner_mean.pt", "--out", tmp_path / "s2") == 0
    sum_model, combiner_model = cirlab.load(tmp_path / "s1"), cirlab.load(tmp_path / "s2")
    assert (sum_model.kind, combiner_model.kind) == ("sum", "combiner")
    assert sum_model.recipe.direction == "compat" and sum_model.recipe.max_text_length == 77
    assert_round_trip(stage1, sum_model.backbone.model)
    assert_round_trip(combiner, combiner_model.combiner)
    # the image side is model_base's (the ViT blocks, vision_proj)
    assert_round_trip({k: v for k, v in blip_file[1].items() if "visual_encoder.blocks" in k or "vision_proj." in k},
                      sum_model.backbone.model)
    provenance = json.loads((tmp_path / "s2" / "composer.json").read_text())["provenance"]
    assert provenance["imported"] == "bi-blip4cir" and len(provenance["combiner"]["sha256"]) == 64


def test_rerank_stages_import_as_the_filter_and_the_dual_encoder(stage1_file, tmp_path):
    path, tensors = stage1_file
    assert run("rerank-stage1", path, "--out", tmp_path / "filter") == 0
    filt = cirlab.load(tmp_path / "filter")
    assert isinstance(filt, GroundedComposer) and filt.recipe.max_text_length == 512
    assert_round_trip(tensors, filt.backbone.model)
    stage2 = random_checkpoint("rerank-stage2", tmp_path / "stage2.pt", seed=5)
    state = torch.load(tmp_path / "stage2.pt")
    state["BLIP_NLVR"].update({k.partition("/")[2]: v for k, v in tensors.items() if "visual_encoder." in k})
    torch.save(state, tmp_path / "stage2.pt")  # the official recipe: both stages hold model_base's frozen ViT
    assert run("rerank-stage2", tmp_path / "stage2.pt", "--stage1", path, "--k", 100, "--out", tmp_path / "rr") == 0
    rerank = cirlab.load(tmp_path / "rr")
    assert isinstance(rerank, RerankComposer) and (rerank.k, rerank.beyond_k) == (100, "official")
    assert_round_trip({k: v for k, v in stage2.items() if "visual_encoder." not in k}, rerank.reranker)
    assert_round_trip(tensors, rerank.backbone.model)
    # the two branches: self0/dense0/LayerNormA are branch 0 (z_t), self1/dense1/LayerNormB branch 1
    layer = rerank.reranker.layers[7]
    for theirs, ours in (("crossattention.self1.key.weight", layer.crossattention[1].self.key.weight),
                         ("attention.output.LayerNormA.bias", layer.attention[0].output.LayerNorm.bias),
                         ("crossattention.output.dense0.weight", layer.crossattention[0].output.dense.weight),
                         ("crossattention.output.merge_layer.weight", layer.merge_layer.weight)):
        assert torch.equal(ours, stage2[f"BLIP_NLVR/text_encoder.encoder.layer.7.{theirs}"]), theirs
    assert rerank.reranker.layers[5].merge_layer is None  # layers 0-5 average the branches


def test_spn_blip4cir_imports_as_a_filter(tmp_path):
    tensors = random_checkpoint("spn-blip4cir", tmp_path / "best.pt", seed=6)
    assert run("spn-blip4cir", tmp_path / "best.pt", "--out", tmp_path / "spn") == 0
    model = cirlab.load(tmp_path / "spn")
    assert isinstance(model, GroundedComposer)
    assert_round_trip(tensors, model.backbone.model)


@pytest.mark.parametrize("method, phi_kind, recipe", [
    ("pic2word", "pic2word", ("a photo of $ , {text}", "pic2word", "resize")),
    ("searle", "searle", ("a photo of $ that {text}", "both", "targetpad")),
    ("lincir", "lincir", ("a photo of $ that {text}", "both", "resize")),
])
def test_the_zero_shot_phis_import_over_a_clip_folder(clip_dir, tmp_path, method, phi_kind, recipe):
    tensors = random_checkpoint(phi_kind, tmp_path / "phi.pt", seed=7)
    assert run(method, tmp_path / "phi.pt", "--clip", clip_dir, "--out", tmp_path / "m") == 0
    model = cirlab.load(tmp_path / "m")
    assert (model.recipe.prompt, model.recipe.caption_orders, model.recipe.transform) == recipe
    assert_round_trip({k: v for k, v in tensors.items() if not k.startswith("state_dict/")}, model.phi)


def test_rtd_replaces_the_text_side_rounded_to_fp16_as_its_evaluation(clip_dir, tmp_path):
    random_checkpoint("lincir", tmp_path / "phi_best.pt", seed=8)
    tensors = random_checkpoint("rtd", tmp_path / "text_encoder_best.pt", seed=9)
    assert run("rtd", tmp_path / "text_encoder_best.pt", "--phi", tmp_path / "phi_best.pt", "--clip", clip_dir,
               "--out", tmp_path / "rtd") == 0
    model = cirlab.load(tmp_path / "rtd")
    rounded = {k: v.half().float() for k, v in tensors.items()}
    assert_round_trip(rounded, model.backbone.model)
    image = {k: v for k, v in cirlab.load(clip_dir).backbone.model.state_dict().items() if k.startswith("vision_model.")}
    assert all(torch.equal(model.backbone.model.state_dict()[k], v) for k, v in image.items())


@pytest.mark.parametrize("kind, args, fault, message", [
    ("rerank-stage1", [], dict(drop="text_proj.weight"), r"not a re-ranking stage-I .* missing key 'text_proj.weight'"),
    ("rerank-stage1", [], dict(reshape="vision_proj.bias"), r"key 'vision_proj.bias' has shape \(33,\)"),
    ("rerank-stage1", [], dict(extra="mystery.weight"), r"key 'mystery.weight' is not part of"),
    ("spn-blip4cir", [], dict(drop="crossattention.self.key.bias"), r"missing key 'text_encoder.encoder.layer.0.crossattention"),
    ("bi-blip4cir-combiner", None, dict(reshape="output_layer.weight"), r"key 'output_layer.weight' has shape"),
    ("lincir", None, dict(drop="layers.3.weight"), r"missing key 'layers.3.weight'"),
])
def test_a_bad_checkpoint_is_refused_naming_file_and_key_and_nothing_is_written(blip_file, tmp_path, capsys, kind, args,
                                                                                fault, message):
    import re

    file = tmp_path / f"{kind}.pt"
    random_checkpoint(kind, file, seed=10, **fault)
    if kind == "bi-blip4cir-combiner":
        random_checkpoint("bi-blip4cir-stage1", tmp_path / "s1.pt", seed=11)
        command = ["bi-blip4cir", tmp_path / "s1.pt", "--blip", blip_file[0], "--combiner", file]
    elif kind == "lincir":
        command = ["lincir", file, "--clip", tmp_path / "no-clip-needed-first"]
    else:
        command = [kind, file, *args]
    assert run(*command, "--out", tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert str(file) in err and re.search(message, err), err
    assert "Traceback" not in err and not (tmp_path / "out").exists()


def test_a_truncated_checkpoint_is_refused_naming_the_file(stage1_file, tmp_path, capsys):
    data = stage1_file[0].read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    assert run("rerank-stage1", tmp_path / "cut.pt", "--out", tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'cut.pt'}: not a readable" in err and not (tmp_path / "out").exists()


def test_an_imported_folder_evaluates_indexes_and_is_served(stage1_file, tiny_shapes, tmp_path, monkeypatch, capsys):
    from fastapi.testclient import TestClient

    from cirlab.config import ServeConfig
    from cirlab.importers import zoo
    from cirlab.serving.app import create_app

    assert run("rerank-stage1", stage1_file[0], "--out", tmp_path / "filter") == 0
    # a release cirlab knows by its file's SHA-1: eval prints the reported numbers beside its own
    sha1 = hashlib.sha1(stage1_file[0].read_bytes()).hexdigest()
    release = zoo.Release("a filter", "shapes", {"blip_mean.pt": sha1}, "a test", reported={"R@1": 12.5},
                          reported_by="nobody")
    monkeypatch.setattr(zoo, "RELEASES", [release])
    assert main(["eval", "--model", str(tmp_path / "filter"), "--dataset", "shapes", "--root", str(tiny_shapes),
                 "--run-dir", str(tmp_path / "eval")]) == 0
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())["filter"]
    assert {"R@1", "Rs@1"} <= set(metrics)
    out = capsys.readouterr().out
    assert "a filter on shapes, released in a test; reported by nobody" in out
    assert "reported (val)" in out and "12.50" in out and f"{metrics['R@1']:.2f}" in out.split("reported (val)")[1]
    images = tiny_shapes / "images" / "test"
    assert main(["index", "build", "--model", str(tmp_path / "filter"), "--images", str(images),
                 "--out", str(tmp_path / "index")]) == 0
    searcher = Searcher.open(tmp_path / "index")
    with TestClient(create_app(searcher, ServeConfig())) as client:
        first = sorted(p.relative_to(images).with_suffix("").as_posix() for p in images.rglob("*.png"))[0]
        r = client.post("/search", data={"id": first, "text": "add a red circle", "k": 3})
        assert r.status_code == 200 and len(r.json()["results"]) == 3


def test_a_backbone_folder_indexes_and_serves_with_no_training(tiny_pretrained_blip, tiny_shapes, tmp_path):
    """``cirlab index build --model <BLIP folder> --images <folder>``: the backbone's zero-shot model."""
    images = tiny_shapes / "images" / "test"
    assert main(["index", "build", "--model", str(tiny_pretrained_blip), "--images", str(images),
                 "--out", str(tmp_path / "index")]) == 0
    searcher = Searcher.open(tmp_path / "index")
    assert isinstance(searcher.composer, ZeroShotComposer) and searcher.composer.mode == "sum"
    first = sorted(p.relative_to(images).with_suffix("").as_posix() for p in images.rglob("*.png"))[0]
    hits, = searcher.search([Query("add a red circle", id=first)], k=5)
    assert len(hits) == 5 and first not in {h.id for h in hits}


def _imported(kind: str, tmp: Path, blip_file, stage1_file, clip_dir) -> Path:
    """An imported folder of ``kind``, from random checkpoints of its layout."""
    out = tmp / kind
    if kind == "blip":
        run("blip", blip_file[0], "--out", out)
    elif kind == "bi-blip4cir":
        random_checkpoint("bi-blip4cir-stage1", tmp / "s1.pt", seed=2)
        random_checkpoint("bi-blip4cir-combiner", tmp / "c.pt", seed=4)
        run("bi-blip4cir", tmp / "s1.pt", "--blip", blip_file[0], "--combiner", tmp / "c.pt", "--out", out)
    elif kind in ("rerank-stage1", "rerank-stage2"):
        run("rerank-stage1", stage1_file[0], "--out", out)
        if kind == "rerank-stage2":
            random_checkpoint("rerank-stage2", tmp / "s2.pt", seed=5)
            run("rerank-stage2", tmp / "s2.pt", "--stage1", stage1_file[0], "--k", 5, "--out", out)
    elif kind == "spn-blip4cir":
        random_checkpoint("spn-blip4cir", tmp / "best.pt", seed=6)
        run("spn-blip4cir", tmp / "best.pt", "--out", out)
    elif kind == "rtd":
        random_checkpoint("lincir", tmp / "phi.pt", seed=8)
        random_checkpoint("rtd", tmp / "te.pt", seed=9)
        run("rtd", tmp / "te.pt", "--phi", tmp / "phi.pt", "--clip", clip_dir, "--out", out)
    else:
        random_checkpoint(kind, tmp / "phi.pt", seed=7)
        run(kind, tmp / "phi.pt", "--clip", clip_dir, "--out", out)
    return out


@pytest.mark.parametrize("kind", ["blip", "bi-blip4cir", "rerank-stage1", "rerank-stage2", "spn-blip4cir", "pic2word",
                                  "searle", "lincir", "rtd"])
def test_every_imported_kind_evaluates_indexes_and_is_served(kind, blip_file, stage1_file, clip_dir, tiny_shapes,
                                                             tmp_path):
    from fastapi.testclient import TestClient

    from cirlab.config import ServeConfig
    from cirlab.serving.app import create_app

    folder = _imported(kind, tmp_path, blip_file, stage1_file, clip_dir)
    assert main(["eval", "--model", str(folder), "--dataset", "shapes", "--root", str(tiny_shapes),
                 "--run-dir", str(tmp_path / "eval")]) == 0
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert all({"R@1", "Rs@1"} <= set(row) for row in metrics.values()), metrics
    images = tiny_shapes / "images" / "test"
    assert main(["index", "build", "--model", str(folder), "--images", str(images), "--out", str(tmp_path / "index")]) == 0
    first = sorted(p.relative_to(images).with_suffix("").as_posix() for p in images.rglob("*.png"))[0]
    with TestClient(create_app(Searcher.open(tmp_path / "index"), ServeConfig())) as client:
        r = client.post("/search", data={"id": first, "text": "add a red circle", "k": 3})
        assert r.status_code == 200 and len(r.json()["results"]) == 3, r.text
