"""CIRCO: multiple ground truths per query over the COCO 2017 unlabeled gallery (Baldrati et al.,
Zero-Shot Composed Image Retrieval with Textual Inversion, ICCV 2023; dataset: miccunifi/CIRCO;
evaluation code: miccunifi/SEARLE).

Layout (``root`` = ``CIRCO/``)::

    annotations/{val,test}.json   [{"id", "reference_img_id", "target_img_id", "relative_caption",
                                     "shared_concept", "gt_img_ids"}]   (test: no target/gt)
    COCO2017_unlabeled/annotations/image_info_unlabeled2017.json   {"images": [{"id", "file_name"}]}
    COCO2017_unlabeled/unlabeled2017/<file_name>

Ids are integers in the JSON; cirlab uses ``str(id)`` for every image id and qid. The
reference stays in the ranking: SEARLE's ``circo_compute_val_metrics`` takes the top 50 of the
whole gallery without removing it (LinCIR and RTD inherit that code). ``shared_concept`` is
kept in ``extra`` but the zero-shot repos do not put it in the query text.
"""

from __future__ import annotations

from pathlib import Path

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

SPLITS = ("val", "test")
IMAGE_INFO = Path("COCO2017_unlabeled/annotations/image_info_unlabeled2017.json")
IMAGE_DIR = Path("COCO2017_unlabeled/unlabeled2017")


def load_circo(root: str | Path, split: str) -> CIRSplit:
    root = Path(root)
    check_split_name(split, SPLITS, "CIRCO")
    path = root / "annotations" / f"{split}.json"
    queries = []
    for i, r in enumerate(read_records(path, "CIRCO annotation file")):
        target, positives = None, ()
        if split != "test":
            target = str(field(r, "target_img_id", path, i, (int, str)))
            # '' entries are the collate padding some copies carry; not ground truths.
            positives = tuple(str(g) for g in field(r, "gt_img_ids", path, i, list) if g != "")
        queries.append(
            Query(
                qid=str(field(r, "id", path, i, (int, str))),
                reference=str(field(r, "reference_img_id", path, i, (int, str))),
                captions=(field(r, "relative_caption", path, i, str),),
                target=target,
                positives=positives,
                extra={"shared_concept": field(r, "shared_concept", path, i, str)},
            )
        )
    check_unique_qids(queries, path)
    relpaths = _gallery(root / IMAGE_INFO)
    check_gallery(list(relpaths), root / IMAGE_INFO)
    return CIRSplit(
        dataset="circo",
        split=split,
        queries=queries,
        gallery=list(relpaths),
        image_paths=PathTable(root / IMAGE_DIR, relpaths),
        exclude_reference=False,
    )


def _gallery(path: Path) -> dict[str, str]:
    """``str(image id) -> file_name`` in file order, from COCO's image-info JSON."""
    info = read_json(path, "COCO unlabeled image info")
    images = info.get("images") if isinstance(info, dict) else None
    if not isinstance(images, list):
        raise ValueError(f"{path}: expected an object with an 'images' list")
    relpaths = {}
    for i, image in enumerate(images):
        if not isinstance(image, dict):
            raise ValueError(f"{path}: images[{i}] is not an object")
        relpaths[str(field(image, "id", path, i, (int, str)))] = field(image, "file_name", path, i, str)
    return relpaths


register_benchmark(Benchmark(
    "circo", lambda root, split, category: load_circo(root, split),
    Protocol(recall_ks=(1, 5, 10, 50), map_ks=(5, 10, 25, 50), recall_on_target=True), submission="circo"))
