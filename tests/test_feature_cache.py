"""The feature cache: encode once, reuse, rebuild on any change or damage, never serve junk."""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from cirlab.features import cache as feature_cache
from cirlab.features.cache import FeatureCacheWarning, cache_info, cached_features, prune_cache

KEY = {"backbone": "tiny-abc123", "transform": "targetpad-1.25-64", "dataset": "shapes/test"}
IDS = [f"img{i}" for i in range(10)]


class Encoder:
    """A deterministic fake backbone (features depend only on the id) that records its calls."""

    def __init__(self, tokens: bool = True, fail_at: int | None = None):
        self.calls: list[list[str]] = []
        self.tokens = tokens
        self.fail_at = fail_at

    def features(self, id_: str) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(int(id_.removeprefix("img")))
        out = {"embeds": torch.randn(8, generator=g)}
        if self.tokens:
            out["tokens"] = torch.randn(5, 6, generator=g) * 3
        return out

    def __call__(self, batch: list[str]) -> dict[str, torch.Tensor]:
        self.calls.append(list(batch))
        if self.fail_at is not None and len(self.calls) > self.fail_at:
            raise RuntimeError("backbone exploded")
        per_id = [self.features(i) for i in batch]
        return {name: torch.stack([f[name] for f in per_id]) for name in per_id[0]}


def expected(enc: Encoder, ids: list[str], name: str) -> torch.Tensor:
    return torch.stack([enc.features(i)[name] for i in ids])


def get(tmp_path, enc, key=KEY, ids=IDS, **kw):
    return cached_features(tmp_path, key=key, ids=ids, encode=enc, batch_size=4, progress=False, **kw)


def entries(cache_dir: Path) -> list[str]:
    return sorted(p.name for p in cache_dir.iterdir())


def test_second_call_loads_without_encoding(tmp_path):
    enc = Encoder()
    first = get(tmp_path, enc)
    assert enc.calls == [IDS[0:4], IDS[4:8], IDS[8:10]]  # batches, in order
    torch.testing.assert_close(first["embeds"], expected(enc, IDS, "embeds"), rtol=0, atol=0)

    again = Encoder()
    second = get(tmp_path, again)
    assert again.calls == []
    assert second.path == first.path and second.ids == IDS and second.key == KEY
    for name in ("embeds", "tokens"):
        assert torch.equal(second[name], first[name])
    assert second.index_of("img7") == 7
    torch.testing.assert_close(second.get("embeds", [7, 2]), expected(enc, ["img7", "img2"], "embeds"),
                               rtol=0, atol=0)
    assert second.get("tokens", [1], dtype=torch.bfloat16).dtype == torch.bfloat16
    with pytest.raises(KeyError, match="nope"):
        second.index_of("nope")


@pytest.mark.parametrize("change", [
    {"key": {**KEY, "backbone": "tiny-def456"}},
    {"key": {**KEY, "transform": "squarepad-64"}},
    {"ids": IDS[:-1]},
    {"ids": IDS[::-1]},
    {"dtype": {"tokens": torch.float32}},
])
def test_any_change_rebuilds(tmp_path, change):
    old = get(tmp_path, Encoder())
    enc = Encoder()
    new = get(tmp_path, enc, **change)
    assert enc.calls, "a changed key, id list or storage dtype must not be served from the old entry"
    assert new.path != old.path
    ids = change.get("ids", IDS)
    assert new.ids == ids
    torch.testing.assert_close(new["embeds"], expected(enc, ids, "embeds"), rtol=0, atol=0)
    assert len([i for i in cache_info(tmp_path) if i["complete"]]) == 2


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 40])


def _flip_bytes(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-7] ^= 0xFF  # inside the last row of data: same size, valid header
    path.write_bytes(bytes(data))


def _wrong_shape(manifest: Path) -> None:
    m = json.loads(manifest.read_text())
    m["fields"]["tokens"]["shape"] = [len(IDS), 6, 5]
    manifest.write_text(json.dumps(m))


@pytest.mark.parametrize("damage,target,reason", [
    (_truncate, "tokens.npy", "truncated"),
    (_flip_bytes, "tokens.npy", "checksum mismatch"),
    (_flip_bytes, "embeds.npy", "checksum mismatch"),
    (Path.unlink, "manifest.json", "incomplete entry"),
    (Path.unlink, "embeds.npy", "file missing"),
    (_wrong_shape, "manifest.json", r"manifest.json says float16\[10, 6, 5\]"),
    (lambda p: p.write_text("{"), "manifest.json", "not valid JSON"),
])
def test_damaged_entry_is_detected_and_rebuilt(tmp_path, damage, target, reason):
    entry = get(tmp_path, Encoder()).path
    damage(entry / target)

    enc = Encoder()
    with pytest.warns(FeatureCacheWarning, match=reason) as record:
        fs = get(tmp_path, enc)
    assert target in str(record[0].message)
    assert enc.calls, "the damaged entry must be rebuilt"
    assert fs.path == entry and entries(tmp_path) == [entry.name]  # replaced in place, no leftovers
    torch.testing.assert_close(fs["embeds"], expected(enc, IDS, "embeds"), rtol=0, atol=0)
    torch.testing.assert_close(fs["tokens"].float(), expected(enc, IDS, "tokens"), rtol=1e-3, atol=1e-3)

    with warnings.catch_warnings(action="error", category=FeatureCacheWarning):
        get(tmp_path, Encoder())  # and the rebuilt entry is valid


def test_sampled_checksum_for_big_files(tmp_path, monkeypatch):
    monkeypatch.setattr(feature_cache, "FULL_CHECK_BYTES", 256)
    monkeypatch.setattr(feature_cache, "SAMPLE_BLOCK_BYTES", 64)
    monkeypatch.setattr(feature_cache, "SAMPLE_BLOCKS", 3)
    entry = get(tmp_path, Encoder()).path
    manifest = json.loads((entry / "manifest.json").read_text())
    assert manifest["fields"]["tokens"]["checksum"]["mode"] == "sampled"
    assert manifest["fields"]["embeds"]["checksum"]["mode"] == "sampled"  # 10 x 8 x 4 B + header > 256 B

    _flip_bytes(entry / "tokens.npy")  # the last block is always sampled
    with pytest.warns(FeatureCacheWarning, match="checksum mismatch"):
        get(tmp_path, Encoder())


def test_failure_inside_encode_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError, match="exploded"):
        get(tmp_path, Encoder(fail_at=2))
    assert entries(tmp_path) == []

    enc = Encoder()
    with warnings.catch_warnings(action="error", category=FeatureCacheWarning):
        fs = get(tmp_path, enc)
    assert len(enc.calls) == 3
    torch.testing.assert_close(fs["embeds"], expected(enc, IDS, "embeds"), rtol=0, atol=0)


def test_leftovers_of_a_killed_build_are_ignored_and_pruned(tmp_path):
    fs = get(tmp_path, Encoder())
    leftover = tmp_path / f".{fs.path.name}.x1y2.tmp"  # what a SIGKILL mid-build leaves
    leftover.mkdir()
    np.save(leftover / "embeds.npy", np.zeros((10, 8), np.float32))
    enc = Encoder()
    assert torch.equal(get(tmp_path, enc)["embeds"], fs["embeds"]) and enc.calls == []

    info = {i["name"]: i for i in cache_info(tmp_path)}
    assert not info[leftover.name]["complete"]
    assert info[fs.path.name]["complete"] and info[fs.path.name]["key"] == KEY
    assert info[fs.path.name]["fields"]["tokens"] == {"shape": [10, 5, 6], "dtype": "float16"}

    assert prune_cache(tmp_path) == [leftover]
    assert prune_cache(tmp_path, keep=lambda i: i["key"]["backbone"] != KEY["backbone"]) == [fs.path]
    assert entries(tmp_path) == []


def test_float16_tokens_round_trip_memory_mapped(tmp_path):
    enc = Encoder()
    get(tmp_path, enc)
    fs = get(tmp_path, Encoder())
    assert fs["embeds"].dtype == torch.float32 and fs["tokens"].dtype == torch.float16
    assert fs["tokens"].shape == (10, 5, 6)
    torch.testing.assert_close(fs["tokens"].float(), expected(enc, IDS, "tokens"), rtol=1e-3, atol=1e-3)
    assert (fs.path / "tokens.npy").stat().st_size < 10 * 5 * 6 * 4  # half of float32 (+ header)

    if sys.platform == "linux":  # zero-copy: the tensor's memory is a mapping of the file itself
        for name in ("embeds", "tokens"):
            ptr = fs[name].data_ptr()
            maps = [line.split() for line in Path("/proc/self/maps").read_text().splitlines()]
            assert any(len(m) >= 6 and m[5] == str(fs.path / f"{name}.npy")
                       and int(m[0].split("-")[0], 16) <= ptr < int(m[0].split("-")[1], 16) for m in maps)


def test_bad_inputs_are_refused(tmp_path):
    with pytest.raises(ValueError, match="float16"):
        get(tmp_path, Encoder(), dtype={"tokens": torch.bfloat16})
    with pytest.raises(ValueError, match="duplicate image id 'img1'"):
        get(tmp_path, Encoder(), ids=["img0", "img1", "img1"])
    with pytest.raises(TypeError, match="JSON-able"):
        get(tmp_path, Encoder(), key={"backbone": object()})

    def huge(batch):
        return {"embeds": torch.full((len(batch), 4), 1e6)}

    with pytest.raises(ValueError, match="overflows float16"):
        get(tmp_path, huge, dtype={"embeds": torch.float16})

    def short(batch):
        return {"embeds": torch.zeros(len(batch) - 1, 4)}

    with pytest.raises(ValueError, match=r"'embeds' has shape \(3, 4\), expected \(4, 4\)"):
        get(tmp_path, short)
    assert entries(tmp_path) == []



def test_a_changed_image_under_the_same_id_is_re_encoded(tmp_path, monkeypatch):
    """The cache is keyed on the image files, not the dataset's name and ids: a shapes set
    regenerated with another seed (same ids, other pictures) must not be served the old features."""
    import os

    from PIL import Image

    from cirlab.data.base import CIRSplit, PathTable
    from cirlab.data.transforms import build_transform
    from cirlab.models import build_small_blip
    from cirlab.features.encode import default_cache_dir, image_features

    monkeypatch.setenv("CIRLAB_CACHE", str(tmp_path / "cache"))
    assert default_cache_dir() == tmp_path / "cache"
    for i, colour in enumerate(((255, 0, 0), (0, 255, 0))):
        Image.new("RGB", (16, 16), colour).save(tmp_path / f"im{i}.png")
    split = CIRSplit("shapes", "test", [], ["im0", "im1"], PathTable(tmp_path, {"im0": "im0.png", "im1": "im1.png"}),
                     exclude_reference=True)
    torch.manual_seed(0)
    backbone = build_small_blip(embed_dim=16, text_hidden=32, text_layers=1, text_heads=2, vision_hidden=16,
                                stage_channels=(8, 8, 8, 8)).eval()
    transform = build_transform("targetpad", backbone.image_size)
    first = image_features(backbone, split, transform, "targetpad", ids=["im0", "im1"])
    again = image_features(backbone, split, transform, "targetpad", ids=["im0", "im1"])
    assert again.path == first.path
    Image.new("RGB", (16, 16), (0, 0, 255)).save(tmp_path / "im1.png")  # same id, new picture
    os.utime(tmp_path / "im1.png", ns=(1, 1))  # even with an old modification time: the size or time differs
    changed = image_features(backbone, split, transform, "targetpad", ids=["im0", "im1"])
    assert changed.path != first.path
    assert torch.equal(changed["embeds"][0], first["embeds"][0])
    assert not torch.equal(changed["embeds"][1], first["embeds"][1])
