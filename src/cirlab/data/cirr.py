"""CIRR, and cirlab's built-in shapes benchmark, which is written in CIRR's layout.

CIRR (``root`` = ``cirr_dataset/``)::

    cirr/captions/cap.rc2.<split>.json        [{"pairid", "reference", "target_hard", "target_soft",
                                                "caption", "img_set": {"id", "members": [6 ids]}}]
    cirr/image_splits/split.rc2.<split>.json  {image id: "./dev/dev-...png"}  (relative to root)

Splits train, val, test1 ("test" is accepted for test1, which has no targets). The
annotations may also sit directly under ``root`` (``root/captions``, ``root/image_splits``).
The gallery is the split file; the reference is removed from each ranking and the 6
``img_set.members`` give Recall_subset@K (as the CIRR evaluation server and CLIP4Cir's
validation, ABaldrati/CLIP4Cir; dataset: Cuberick-Orion/CIRR). Positives are ``target_hard``
only, as the evaluation server counts.

shapes (``root`` = the generated benchmark): ``captions/cap.shapes.<split>.json`` and
``image_splits/split.shapes.<split>.json``, splits train, val, test, same record format.
One difference: positives are *every* id in ``target_soft`` with score 1.0, i.e. every
image showing the target's scene, because CSS (Vo et al., Composing Text and Image for Image
Retrieval - An Empirical Odyssey, CVPR 2019) counts any image with the target's label as a
hit. ``img_set`` is optional there.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cirlab.data.base import (
    Benchmark,
    CIRSplit,
    PathTable,
    Protocol,
    Query,
    check_gallery,
    check_split_name,
    check_unique_qids,
    field,
    read_records,
    register_benchmark,
)
from cirlab.utils.io import read_json

CIRR_SPLITS = ("train", "val", "test1")
SHAPES_SPLITS = ("train", "val", "test")
_EXTRA = ("target_soft", "caption_reversed", "reference_caption", "target_caption", "operation")


def load_cirr(root: str | Path, split: str) -> CIRSplit:
    split = "test1" if split == "test" else split
    check_split_name(split, CIRR_SPLITS, "CIRR")
    return _load(Path(root), split, version="rc2", dataset="cirr")


def load_shapes(root: str | Path, split: str) -> CIRSplit:
    check_split_name(split, SHAPES_SPLITS, "shapes")
    return _load(Path(root), split, version="shapes", dataset="shapes")


def read_extension(path: str | Path, dataset: str) -> list[Query]:
    """Training triplets added to a CIRR-style split (SPN's generated positives): records in the
    caption file's own format, read as that split's are."""
    path = Path(path)
    queries = [_query(r, path, i, True, scene_positives=dataset == "shapes")
               for i, r in enumerate(read_records(path, f"{dataset} extension file"))]
    check_unique_qids(queries, path)
    return queries


def _annotation_dir(root: Path, version: str, split: str) -> Path:
    """``root/cirr`` (the official layout) or ``root`` itself, whichever holds the captions."""
    name = f"cap.{version}.{split}.json"
    for base in (root / "cirr", root):
        if (base / "captions" / name).is_file():
            return base
    raise FileNotFoundError(
        f"caption file {name} not found in {root / 'cirr' / 'captions'} or {root / 'captions'}"
    )


def _load(root: Path, split: str, version: str, dataset: str) -> CIRSplit:
    base = _annotation_dir(root, version, split)
    cap_path = base / "captions" / f"cap.{version}.{split}.json"
    split_path = base / "image_splits" / f"split.{version}.{split}.json"
    relpaths = read_json(split_path, f"{dataset} image split file")
    if not isinstance(relpaths, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in relpaths.items()
    ):
        raise ValueError(f"{split_path}: expected a JSON object mapping image id -> relative path")
    check_gallery(list(relpaths), split_path)

    has_targets = not split.startswith("test") or dataset == "shapes"
    queries = [
        _query(r, cap_path, i, has_targets, scene_positives=dataset == "shapes")
        for i, r in enumerate(read_records(cap_path, f"{dataset} caption file"))
    ]
    check_unique_qids(queries, cap_path)
    return CIRSplit(
        dataset=dataset,
        split=split,
        queries=queries,
        gallery=list(relpaths),
        image_paths=PathTable(root, relpaths),
        exclude_reference=True,
    )


def _query(r: dict[str, Any], path: Path, i: int, has_targets: bool, scene_positives: bool) -> Query:
    pairid = field(r, "pairid", path, i, (int, str))
    try:
        qid = str(int(pairid))
    except ValueError:
        raise ValueError(f"{path}: record {i} has pairid={pairid!r}, expected an integer") from None
    extra = {k: r[k] for k in _EXTRA if k in r}

    subset = None
    if "img_set" in r or not scene_positives:  # CIRR always has img_set; shapes may not
        img_set = field(r, "img_set", path, i, dict)
        members = img_set.get("members")
        if not isinstance(members, list) or not all(isinstance(m, str) for m in members):
            raise ValueError(f"{path}: record {i} lacks 'img_set.members' as a list of image ids")
        subset = tuple(members)
        if "id" in img_set:
            extra["img_set_id"] = img_set["id"]

    target, positives = None, ()
    if has_targets:
        target = field(r, "target_hard", path, i, str)
        positives = (target,)
        if scene_positives:
            soft = field(r, "target_soft", path, i, dict)
            positives += tuple(k for k, score in soft.items() if score == 1.0 and k != target)

    captions = (field(r, "caption", path, i, str),)
    if r.get("generated"):  # SPN's generated triplets: every template's text, one drawn per training sample
        extra["generated"] = True
        captions = tuple(field(r, "captions", path, i, list))
        if not captions or not all(isinstance(c, str) for c in captions):
            raise ValueError(f"{path}: record {i} has captions={list(captions)!r:.80}, expected a list of strings")
    return Query(
        qid=qid,
        reference=field(r, "reference", path, i, str),
        captions=captions,
        target=target,
        positives=positives,
        subset=subset,
        extra=extra,
    )


def _no_category(load):
    def load_split(root: Path, split: str, category: str | None) -> CIRSplit:
        return load(root, split)
    return load_split


def _generated_record(*, pairid: int, reference: str, target: str, texts: list[str], captioned: dict,
                      target_copies: list[str]) -> dict:
    """A generated triplet in CIRR's caption format (every copy of the target a soft positive)."""
    return {"pairid": pairid, "reference": reference, "target_hard": target,
            "target_soft": {c: 1.0 for c in target_copies}, "caption": texts[0], "captions": texts,
            "img_set": {"id": -1, "members": []}, "generated": True, "captioned": captioned}


CIRR_PROTOCOL = Protocol(recall_ks=(1, 5, 10, 50), subset_ks=(1, 2, 3))
register_benchmark(Benchmark("cirr", _no_category(load_cirr), CIRR_PROTOCOL, submission="cirr",
                             read_extension=lambda path, split: (path, read_extension(path, "cirr")),
                             generated_record=_generated_record))
register_benchmark(Benchmark("shapes", _no_category(load_shapes), CIRR_PROTOCOL, submission="cirr",
                             read_extension=lambda path, split: (path, read_extension(path, "shapes")),
                             generated_record=_generated_record, backward_rows=True))
