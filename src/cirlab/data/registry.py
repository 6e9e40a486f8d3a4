"""Dataset names -> loaders.

Every loader turns a benchmark's own file layout (as published: FashionIQ, CIRR rc2 in
Cuberick-Orion/CIRR, CIRCO in miccunifi/CIRCO) into :class:`CIRSplit` records; errors name
the file, the record and the field, because a half-downloaded or hand-edited annotation file
is the usual way these loaders fail.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from cirlab.data import circo, cirr, fashioniq
from cirlab.data.base import CIRSplit

DATASETS = ("fashioniq", "cirr", "circo", "shapes")


def load_split(dataset: str, root: str | Path, split: str, *, category: str | None = None) -> CIRSplit:
    """One split of ``dataset`` under ``root``; FashionIQ also needs its ``category``."""
    root = Path(root)
    if dataset == "fashioniq":
        if category is None:
            raise ValueError(f"FashionIQ needs a category, one of {list(fashioniq.CATEGORIES)}")
        return fashioniq.load_fashioniq(root, split, category)
    if category is not None:
        raise ValueError(f"category={category!r} only applies to FashionIQ, not {dataset!r}")
    if dataset == "cirr":
        return cirr.load_cirr(root, split)
    if dataset == "shapes":
        return cirr.load_shapes(root, split)
    if dataset == "circo":
        return circo.load_circo(root, split)
    raise ValueError(f"unknown dataset {dataset!r}; expected one of {list(DATASETS)}")


def load_splits(
    dataset: str, root: str | Path, split: str, categories: list[str] | None = None
) -> list[CIRSplit]:
    """FashionIQ: one split per category (all three when None), evaluated separately
    (as CLIP4Cir's validation, ABaldrati/CLIP4Cir); every other dataset: a one-element list."""
    if dataset != "fashioniq":
        if categories:
            raise ValueError(f"categories only apply to FashionIQ, not {dataset!r}")
        return [load_split(dataset, root, split)]
    return [load_split(dataset, root, split, category=c) for c in (categories or fashioniq.CATEGORIES)]


def extend_split(split: CIRSplit, path: str | Path) -> CIRSplit:
    """``split`` plus the training triplets of an extension file in the dataset's own caption
    format (SPN's generated positives). For FashionIQ, ``{category}`` in ``path`` is replaced by
    the split's category. Every image the new triplets name must be one of the split's."""
    if split.dataset == "fashioniq":
        category = split.name.split("/")[1]
        path = Path(str(path).replace("{category}", category))
        added = fashioniq.read_extension(path, category)
    elif split.dataset in ("cirr", "shapes"):
        path = Path(path)
        added = cirr.read_extension(path, split.dataset)
    else:
        raise ValueError(f"{path}: {split.dataset} has no training split to extend")
    known = set(split.gallery)
    unknown = sorted({i for q in added for i in (q.reference, q.target) if i not in known})
    if unknown:
        raise ValueError(f"{path}: {len(unknown)} images are not in {split.name}, e.g. {unknown[:3]}")
    clash = {q.qid for q in split.queries} & {q.qid for q in added}
    if clash:
        raise ValueError(f"{path}: query ids already used by {split.name}, e.g. {sorted(clash)[:3]}")
    return replace(split, queries=[*split.queries, *added], name=f"{split.name}+{path.stem}")
