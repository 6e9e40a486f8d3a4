"""Broken input as users meet it: corrupt or oversized images, empty or short annotation files,
repeated keys in predictions files, truncated weights, and evaluation with images missing.
Every error must name the file (and the record or key)."""

import argparse
import io
import json
import struct
import warnings
import zlib
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch import nn

from cirlab.cli import data as data_cli
from cirlab.data.base import CIRSplit, PathTable, Query
from cirlab.data.check import check_splits, drop_missing, format_check
from cirlab.data.images import UnreadableImage, load_image
from cirlab.data.registry import load_split
from cirlab.data.torch_data import GalleryDataset
from cirlab.data.transforms import build_transform
from cirlab.evaluation.metrics import rank_gallery, rank_subset
from cirlab.evaluation.protocols import evaluate_similarity
from cirlab.evaluation.submission import read_predictions
from cirlab.models import build_small_blip, save_backbone
from cirlab.models.heads import read_head, save_head
from cirlab.models.loading import load_backbone
from cirlab.utils.io import read_json

TINY = dict(embed_dim=32, text_hidden=32, text_layers=1, text_heads=2, vision_hidden=32, stage_channels=(8, 8, 16, 16))


def write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def write_image(path: Path, size=(12, 12)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.effect_noise(size, 60).convert("RGB").save(path)
    return path


def truncated_png(path: Path) -> Path:
    write_image(path, (32, 32))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])
    return path


def png_claiming(path: Path, width: int, height: int) -> Path:
    """A 1x1 PNG whose IHDR claims ``width`` x ``height`` (CRC fixed), a few dozen bytes on disk."""
    buffer = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    data[16:24] = struct.pack(">II", width, height)  # after signature (8), length (4), b"IHDR" (4)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    path.write_bytes(bytes(data))
    return path


# --- 1. unreadable images ----------------------------------------------------------------------


def test_corrupt_images_raise_one_error_naming_the_file(tmp_path):
    bad = [truncated_png(tmp_path / "truncated.png"), tmp_path / "text.png",
           png_claiming(tmp_path / "huge.png", 30000, 30000)]
    bad[1].write_text("not an image at all\n")
    for path in bad:
        with pytest.raises(UnreadableImage, match=path.name) as info:
            load_image(path)
        assert isinstance(info.value, OSError)
    with pytest.raises(FileNotFoundError):
        load_image(tmp_path / "absent.png")
    assert load_image(write_image(tmp_path / "good.png")).size == (12, 12)


def test_the_decompression_bomb_warning_band_decodes_quietly_and_the_limit_refuses(tmp_path, monkeypatch):
    from cirlab.data import images

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    monkeypatch.setattr(images, "MAX_PIXELS", 200)  # Pillow's bomb limit: twice its warning level
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert load_image(write_image(tmp_path / "big.png", (12, 12))).size == (12, 12)  # 144 px: warning band
        with pytest.raises(UnreadableImage, match="huge.png"):
            load_image(write_image(tmp_path / "huge.png", (12, 20)))  # 240 px: over the limit
    assert not [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]


def test_datasets_skip_and_count_unreadable_images(tmp_path):
    relpaths = {"good": "good.png", "truncated": "truncated.png", "text": "text.png", "huge": "huge.png"}
    write_image(tmp_path / "good.png")
    truncated_png(tmp_path / "truncated.png")
    (tmp_path / "text.png").write_text("hello")
    png_claiming(tmp_path / "huge.png", 30000, 30000)
    split = CIRSplit("cirr", "val", [], list(relpaths), PathTable(tmp_path, relpaths), True)
    gallery = GalleryDataset(split, build_transform("resize", 4))
    assert [item is None for item in (gallery[i] for i in range(4))] == [False, True, True, True]
    assert gallery.missing.ids == {"truncated", "text", "huge"}
    assert gallery.missing.message().startswith("3 images missing or unreadable")


# --- 2. data check -------------------------------------------------------------------------------


@pytest.fixture
def cirr_root(tmp_path):
    root = tmp_path / "cirr_dataset"
    names = [f"dev-{i}" for i in range(6)]
    write_json(root / "cirr" / "image_splits" / "split.rc2.val.json", {n: f"./dev/{n}.png" for n in names})
    records = [{"pairid": p, "reference": names[r], "target_hard": names[r + 1], "target_soft": {},
                "caption": "c", "img_set": {"id": 0, "members": names}} for p, r in ((1, 0), (2, 2), (3, 4))]
    write_json(root / "cirr" / "captions" / "cap.rc2.val.json", records)
    for n in names:
        write_image(root / "dev" / f"{n}.png")
    return root


def run_check(root: Path, *extra: str) -> int:
    parser = argparse.ArgumentParser()
    data_cli.register(parser.add_subparsers())
    args = parser.parse_args(["data", "check", "--dataset", "cirr", "--root", str(root), "--split", "val", *extra])
    return args.func(args)


def test_data_check_decode_finds_a_text_file_named_png(cirr_root, capsys):
    assert run_check(cirr_root) == 0
    (cirr_root / "dev" / "dev-3.png").write_text("this is text, not a PNG\n")
    assert run_check(cirr_root) == 1  # its header is read: not an image
    capsys.readouterr()
    assert run_check(cirr_root, "--decode") == 1
    out = capsys.readouterr().out
    assert "1 of 6 referenced images missing (1 unreadable)" in out
    assert "unreadable (the file exists but cannot be decoded): 1 (e.g. dev-3)" in out
    assert run_check(cirr_root, "--decode", "--json") == 1
    report = json.loads(capsys.readouterr().out)
    assert report["missing"] == report["unreadable"] == ["dev-3"]


def test_data_check_fails_when_images_are_missing_and_keeps_the_report(cirr_root, capsys):
    for path in (cirr_root / "dev").iterdir():
        path.unlink()
    assert run_check(cirr_root) == 1
    out = capsys.readouterr().out
    assert "cirr/val: 3 queries, 6 gallery images, 6 of 6 referenced images missing" in out
    assert out.rstrip().endswith("6 missing (e.g. dev-0, dev-1, dev-2, dev-3, dev-4, ...)")


def test_check_reads_the_file_the_datasets_read(tmp_path):
    """FashionIQ tries .png before .jpg: a broken .png hides a good .jpg from the loaders."""
    images = tmp_path / "images"
    write_image(images / "A.jpg")
    (images / "A.png").write_bytes(b"garbage")
    root = tmp_path
    write_json(root / "captions" / "cap.dress.val.json", [{"candidate": "A", "target": "A", "captions": ["a", "b"]}])
    write_json(root / "image_splits" / "split.dress.val.json", ["A"])
    report = check_splits([load_split("fashioniq", root, "val", category="dress")], decode=True)
    assert report["unreadable"] == ["A"]
    assert "1 of 1 referenced images missing (1 unreadable)" in format_check(report)


# --- 3. empty or short annotation files ----------------------------------------------------------


def test_empty_annotation_lists_are_errors_naming_the_file(cirr_root, tmp_path):
    (cirr_root / "cirr" / "captions" / "cap.rc2.val.json").write_text("[]")
    with pytest.raises(ValueError, match=r"cap\.rc2\.val\.json: no queries"):
        load_split("cirr", cirr_root, "val")

    fiq = tmp_path / "fiq"
    write_json(fiq / "captions" / "cap.dress.val.json", [])
    write_json(fiq / "image_splits" / "split.dress.val.json", ["A"])
    with pytest.raises(ValueError, match=r"cap\.dress\.val\.json: no queries"):
        load_split("fashioniq", fiq, "val", category="dress")

    circo = tmp_path / "CIRCO"
    write_json(circo / "annotations" / "val.json", [])
    with pytest.raises(ValueError, match=r"val\.json: no queries"):
        load_split("circo", circo, "val")


def test_empty_galleries_are_errors_naming_the_file(cirr_root, tmp_path):
    write_json(cirr_root / "cirr" / "image_splits" / "split.rc2.val.json", {})
    with pytest.raises(ValueError, match=r"split\.rc2\.val\.json: no gallery images"):
        load_split("cirr", cirr_root, "val")
    write_json(tmp_path / "captions" / "cap.dress.val.json", [{"candidate": "A", "target": "B", "captions": ["a", "b"]}])
    write_json(tmp_path / "image_splits" / "split.dress.val.json", [])
    with pytest.raises(ValueError, match=r"split\.dress\.val\.json: no gallery images"):
        load_split("fashioniq", tmp_path, "val", category="dress")


@pytest.mark.parametrize("captions", [["only one"], ["one", "two", "three"], []])
def test_fashioniq_records_need_exactly_two_captions(tmp_path, captions):
    records = [{"candidate": "A", "target": "B", "captions": ["a", "b"]},
               {"candidate": "B", "target": "A", "captions": captions}]
    write_json(tmp_path / "captions" / "cap.shirt.val.json", records)
    write_json(tmp_path / "image_splits" / "split.shirt.val.json", ["A", "B"])
    with pytest.raises(ValueError, match=r"cap\.shirt\.val\.json: record 1 has captions=.*expected a list of 2 strings"):
        load_split("fashioniq", tmp_path, "val", category="shirt")


def test_repeated_query_ids_are_errors(cirr_root):
    path = cirr_root / "cirr" / "captions" / "cap.rc2.val.json"
    records = json.loads(path.read_text())
    records[2]["pairid"] = "1"
    path.write_text(json.dumps(records))
    with pytest.raises(ValueError, match=r"cap\.rc2\.val\.json: records 0 and 2 have the same query id '1'"):
        load_split("cirr", cirr_root, "val")


# --- 4. repeated keys in predictions files -------------------------------------------------------


def test_predictions_with_a_repeated_query_key_are_refused(tmp_path):
    path = tmp_path / "recall_submission_x.json"
    path.write_text('{"version": "rc2", "metric": "recall", "12": ["a", "b"], "3": ["c"], "12": ["b", "a"]}')
    with pytest.raises(ValueError, match=r"recall_submission_x\.json holds the key '12' more than once"):
        read_predictions(path)
    path.write_text('{"version": "rc2", "metric": "recall", "metric": "recall_subset", "12": ["a"]}')
    with pytest.raises(ValueError, match="key 'metric' more than once"):
        read_predictions(path)


def test_read_json_keeps_last_value_wins_by_default(tmp_path):
    path = tmp_path / "x.json"
    path.write_text('{"a": 1, "a": 2}')
    assert read_json(path) == {"a": 2}


# --- 5. truncated weights ------------------------------------------------------------------------


def test_truncated_backbone_weights_name_the_file(tmp_path):
    torch.manual_seed(0)
    folder = save_backbone(build_small_blip(**TINY), tmp_path / "blip")
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ValueError, match=rf"{weights}.* is not a readable safetensors file \(truncated\?\)"):
        load_backbone(folder)


def test_truncated_head_weights_name_the_file(tmp_path):
    folder = save_head(nn.Linear(4, 4), tmp_path / "combiner", "combiner", {"dim": 4})
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:40])
    with pytest.raises(ValueError, match=rf"{weights} is not a readable safetensors file"):
        read_head(folder, "combiner")


# --- 6. float64 scores ---------------------------------------------------------------------------


def test_float64_scores_keep_their_resolution():
    sim = torch.tensor([[1.0 + 1e-12, 1.0, 1.0 + 2e-12, 0.5]], dtype=torch.float64)
    assert torch.equal(torch.tensor(1.0 + 1e-12, dtype=torch.float32), torch.tensor(1.0))  # below fp32 resolution
    assert rank_gallery(sim, 3).tolist() == [[2, 0, 1]]
    assert rank_gallery(sim, 3, exclude=torch.tensor([2])).tolist() == [[0, 1, 3]]
    assert rank_subset(sim, torch.tensor([[1, 0, 2]])).tolist() == [[2, 0, 1]]
    half = sim.to(torch.bfloat16)
    assert rank_gallery(half, 4)[0, -1].item() == 3  # lower precision still ranks (in float32)


# --- 7. evaluation without the missing images ----------------------------------------------------


def make_split(tmp_path: Path, dataset: str, queries: list[Query], gallery: list[str], present: list[str],
               exclude: bool = True) -> CIRSplit:
    for image_id in present:
        write_image(tmp_path / f"{image_id}.png", (4, 4))
    relpaths = {i: f"{i}.png" for i in {*gallery, *(q.reference for q in queries)}}
    return CIRSplit(dataset, "val", queries, gallery, PathTable(tmp_path, relpaths), exclude)


def test_drop_missing_on_cirr_drops_queries_with_a_missing_subset_member(tmp_path):
    gallery = ["a", "b", "c", "d", "e", "f"]
    queries = [
        Query("1", "a", ("t",), "b", ("b",), ("a", "b", "c", "d", "e")),
        Query("2", "c", ("t",), "f", ("f",), ("a", "b", "c", "d", "e")),  # target missing
        Query("3", "a", ("t",), "b", ("b",), ("a", "b", "c", "d", "e", "f")),  # a member missing
        Query("4", "x", ("t",), "b", ("b",), ("x", "b", "c", "d", "e")),  # reference missing
    ]
    split = make_split(tmp_path, "cirr", queries, gallery, present=["a", "b", "c", "d", "e"])
    kept, dropped = drop_missing(split)
    assert [q.qid for q in kept.queries] == ["1"] and kept.gallery == ["a", "b", "c", "d", "e"]
    assert kept.name == "cirr/val" and len(split.queries) == 4  # the input is left as it was
    assert dropped.images == ("f", "x") and dropped.queries == ("2", "3", "4") and dropped.gallery == ("f",)
    assert str(dropped) == ("cirr/val: 2 images missing or unreadable (e.g. f, x); evaluating without "
                            "1 of 6 gallery images and 3 of 4 queries (e.g. 2, 3, 4)")
    assert "\n" not in str(dropped)
    sim = torch.rand(len(kept.queries), len(kept.gallery))
    assert set(evaluate_similarity(kept, sim)) >= {"R@1", "Rs@1", "Avg"}


def test_drop_missing_trims_missing_positives_of_kept_queries(tmp_path):
    gallery = ["g1", "g2", "g3", "g4"]
    queries = [
        Query("10", "g1", ("t",), "g2", ("g2", "g4")),  # one of two ground truths missing: kept
        Query("11", "g1", ("t",), "g4", ("g4",)),  # its only ground truth is missing
        Query("12", "g3", ("t",), "g2", ("g2", "g3")),
    ]
    split = make_split(tmp_path, "circo", queries, gallery, present=["g1", "g2", "g3"], exclude=False)
    kept, dropped = drop_missing(split)
    assert [(q.qid, q.positives) for q in kept.queries] == [("10", ("g2",)), ("12", ("g2", "g3"))]
    assert dropped.positives_trimmed == 1 and str(dropped).endswith("; 1 queries lost some of their positives")
    assert set(evaluate_similarity(kept, torch.rand(2, 3))) >= {"mAP@5", "R@1"}


def test_drop_missing_on_a_test_split_and_with_decode(tmp_path):
    gallery = ["a", "b", "c"]
    queries = [Query("1", "a", ("t",)), Query("2", "b", ("t",)), Query("3", "z", ("t",))]
    split = make_split(tmp_path, "cirr", queries, gallery, present=["a", "b", "c"])
    kept, dropped = drop_missing(split)
    assert [q.qid for q in kept.queries] == ["1", "2"] and kept.gallery == gallery
    (tmp_path / "b.png").write_text("text")
    assert drop_missing(split)[1].images == ("b", "z")  # without decoding, its header tells
    kept, dropped = drop_missing(split, decode=True)
    assert [q.qid for q in kept.queries] == ["1"] and kept.gallery == ["a", "c"] and dropped.images == ("b", "z")


def test_drop_missing_with_nothing_or_everything_missing(tmp_path):
    queries = [Query("1", "a", ("t",), "b", ("b",))]
    split = make_split(tmp_path, "cirr", queries, ["a", "b"], present=["a", "b"])
    kept, dropped = drop_missing(split)
    assert kept is split and not dropped.images and str(dropped) == "cirr/val: every referenced image is on disk"
    for path in tmp_path.glob("*.png"):
        path.unlink()
    with pytest.raises(ValueError, match="cirr/val: 2 images missing.*nothing left to evaluate"):
        drop_missing(split)


def test_drop_missing_on_a_loaded_fashioniq_split(tmp_path):
    write_json(tmp_path / "captions" / "cap.toptee.val.json",
               [{"candidate": "A", "target": "B", "captions": ["a", "b"]},
                {"candidate": "C", "target": "A", "captions": ["a", "b"]}])
    write_json(tmp_path / "image_splits" / "split.toptee.val.json", ["A", "B", "C", "D"])
    for name in ("A.jpg", "B.png", "D.png"):
        write_image(tmp_path / "images" / name)
    kept, dropped = drop_missing(load_split("fashioniq", tmp_path, "val", category="toptee"))
    assert [q.qid for q in kept.queries] == ["toptee-0"] and kept.gallery == ["A", "B", "D"]
    assert kept.name == "fashioniq/toptee/val" and dropped.queries == ("toptee-1",)
