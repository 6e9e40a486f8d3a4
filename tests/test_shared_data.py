"""The loaders and ``data check`` on the real FashionIQ val and CIRR val annotation files.

The files live in ../shared/data (never copied into the repository); the tests copy them into
a temporary dataset layout with a placeholder image for every id, and skip without ../shared.
"""

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from cirlab.data.check import check_splits
from cirlab.data.registry import load_split, load_splits

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
REPO = Path(__file__).resolve().parents[1]

pytestmark = [
    pytest.mark.shared,
    pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data is absent (only on the project machines)"),
]


def _image_bytes(fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (1, 1), (127, 127, 127)).save(buffer, format=fmt)
    return buffer.getvalue()


def _place(paths: list[Path], fmt: str, scratch: Path) -> None:
    """One tiny image of format ``fmt`` at every path, hard-linked (thousands in milliseconds)."""
    source = scratch / f"placeholder.{fmt.lower()}"
    source.write_bytes(_image_bytes(fmt))
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(source, path)
        except OSError:  # no hard links on this filesystem
            shutil.copyfile(source, path)


@pytest.fixture(scope="module")
def fiq_root(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fiq")
    root = tmp / "fashionIQ_dataset"
    shutil.copytree(SHARED / "fashioniq", root)
    ids = set()
    for path in (root / "image_splits").glob("split.*.val.json"):
        ids.update(json.loads(path.read_text()))
    for path in (root / "captions").glob("cap.*.val.json"):
        for r in json.loads(path.read_text()):
            ids.update((r["candidate"], r["target"]))
    ids = sorted(ids)
    _place([root / "images" / f"{i}.png" for i in ids[::2]], "PNG", tmp)  # both extensions circulate
    _place([root / "images" / f"{i}.jpg" for i in ids[1::2]], "JPEG", tmp)
    return root


@pytest.fixture
def cirr_root(tmp_path):
    root = tmp_path / "cirr_dataset"
    shutil.copytree(SHARED / "cirr", root / "cirr")  # the official layout: annotations under cirr/
    relpaths = json.loads((root / "cirr" / "image_splits" / "split.rc2.val.json").read_text())
    _place([root / rel for rel in relpaths.values()], "PNG", tmp_path)
    return root


def test_fashioniq_val_counts(fiq_root):
    splits = load_splits("fashioniq", fiq_root, "val")
    assert [s.name for s in splits] == ["fashioniq/dress/val", "fashioniq/shirt/val", "fashioniq/toptee/val"]
    assert [len(s.queries) for s in splits] == [2017, 2038, 1961]
    assert [len(s.gallery) for s in splits] == [3817, 6346, 5373]
    for s in splits:
        assert all(q.target is not None and len(q.captions) == 2 for q in s.queries)
    report = check_splits(splits)
    assert (report["queries"], report["gallery"], report["missing"]) == (6016, 15536, [])
    found = {splits[0].find_image(q.reference).suffix for q in splits[0].queries}
    assert found == {".png", ".jpg"}


def test_cirr_val_counts_and_subsets(cirr_root):
    split = load_split("cirr", cirr_root, "val")
    assert (len(split.queries), len(split.gallery)) == (4181, 2297)
    assert len({q.qid for q in split.queries}) == 4181
    for q in split.queries:
        assert len(q.subset) == 6 and q.reference in q.subset
        assert q.positives == (q.target,)
    assert check_splits([split])["missing"] == []


def test_check_reports_exactly_the_deleted_images(cirr_root):
    split = load_split("cirr", cirr_root, "val")
    deleted = sorted(split.gallery[::230])[:10]
    assert len(deleted) == 10
    for image_id in deleted:
        split.find_image(image_id).unlink()
    report = check_splits([split])
    assert report["missing"] == deleted
    assert (report["queries"], report["gallery"]) == (4181, 2297)


@pytest.mark.skipif(
    not (REPO / "src" / "cirlab" / "cli" / "data.py").is_file(), reason="cirlab/cli/data.py not written yet"
)
def test_cli_data_check_json_on_cirr_val(cirr_root):
    split = load_split("cirr", cirr_root, "val")
    deleted = sorted(split.gallery[:3])
    for image_id in deleted:
        split.find_image(image_id).unlink()
    proc = subprocess.run(
        [sys.executable, "-m", "cirlab", "data", "check", "--dataset", "cirr", "--root", str(cirr_root),
         "--split", "val", "--json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    report = json.loads(proc.stdout)
    assert (report["queries"], report["gallery"], report["missing"]) == (4181, 2297, deleted), proc.stderr
