"""Benchmarks by name: their splits, categories and training-split extensions.

Every loader turns a benchmark's own file layout (as published: FashionIQ, CIRR rc2 in
Cuberick-Orion/CIRR, CIRCO in miccunifi/CIRCO) into :class:`CIRSplit` records and registers its
:class:`~cirlab.data.base.Benchmark` (``register_benchmark``); errors name the file, the record and
the field, because a half-downloaded or hand-edited annotation file is the usual way these loaders fail.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Sequence

from cirlab.data.base import BENCHMARKS, Benchmark, CIRSplit


def benchmark(dataset: str) -> Benchmark:
    """The registered benchmark ``dataset``; an unknown name is an error listing the known ones."""
    found = BENCHMARKS.get(dataset)
    if found is None:
        raise ValueError(f"unknown dataset {dataset!r}; expected one of {benchmark_names()}")
    return found


def benchmark_names() -> list[str]:
    return sorted(BENCHMARKS.keys())


def load_split(dataset: str, root: str | Path, split: str, *, category: str | None = None) -> CIRSplit:
    """One split of ``dataset`` under ``root``; a benchmark with categories (FashionIQ) also needs its ``category``."""
    bench = benchmark(dataset)
    if category is not None and not bench.categories:
        raise ValueError(f"category={category!r} does not apply to {dataset!r}, which has no categories")
    return bench.load(Path(root), split, category)


def load_splits(dataset: str, root: str | Path, split: str, categories: Sequence[str] | None = None) -> list[CIRSplit]:
    """One split per category (all when None), each evaluated separately (FashionIQ, as CLIP4Cir's
    validation, ABaldrati/CLIP4Cir); a benchmark without categories: a one-element list."""
    bench = benchmark(dataset)
    if not bench.categories:
        if categories:
            raise ValueError(f"categories do not apply to {dataset!r}, which has none")
        return [load_split(dataset, root, split)]
    return [load_split(dataset, root, split, category=c) for c in (categories or bench.categories)]


def extend_split(split: CIRSplit, path: str | Path) -> CIRSplit:
    """``split`` plus the training triplets of an extension file in the dataset's own caption
    format (SPN's generated positives); for FashionIQ ``{category}`` in ``path`` is replaced by the
    split's category. Every image the new triplets name must be one of the split's."""
    bench = benchmark(split.dataset)
    if bench.read_extension is None:
        raise ValueError(f"{path}: {split.dataset} has no training split to extend")
    path, added = bench.read_extension(Path(path), split)
    known = set(split.gallery)
    unknown = sorted({i for q in added for i in (q.reference, q.target) if i not in known})
    if unknown:
        raise ValueError(f"{path}: {len(unknown)} images are not in {split.name}, e.g. {unknown[:3]}")
    clash = {q.qid for q in split.queries} & {q.qid for q in added}
    if clash:
        raise ValueError(f"{path}: query ids already used by {split.name}, e.g. {sorted(clash)[:3]}")
    return replace(split, queries=[*split.queries, *added], name=f"{split.name}+{path.stem}")
