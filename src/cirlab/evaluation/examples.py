"""The same queries across rows of evaluations, as pictures: what each method retrieves
(``examples.png`` of ``cirlab demo`` and of ``cirlab eval --examples N``)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from cirlab.data.base import CIRSplit, Query
from cirlab.data.show import Example, draw_examples
from cirlab.evaluation.compare import evaluated_row
from cirlab.evaluation.submission import read_predictions

# (label in the picture, evaluation folder, row or None for the folder's only one)
RowRef = tuple[str, Path, "str | None"]


def spaced(items: Sequence, n: int) -> list:
    """``n`` items evenly spread over ``items`` (all of them when fewer): a fixed, reproducible pick."""
    return list(items) if len(items) <= n else [items[i * len(items) // n] for i in range(n)]


def _image(split: CIRSplit, image_id: str) -> Path:
    path = split.find_image(image_id)
    if path is None:
        raise FileNotFoundError(f"{split.name}: no image file for {image_id!r}")
    return path


def _example(split: CIRSplit, query: Query, ranked: dict[str, dict[str, list[str]]], k: int) -> Example:
    """One query with each row's top ``k`` (a hit is any image that counts as one: shapes, any of the target's scene)."""
    hits = set(query.positives or (query.target,))
    return Example(_image(split, query.reference), " / ".join(query.captions), _image(split, query.target),
                   {label: [(_image(split, i), i in hits) for i in lists[query.qid][:k]] for label, lists in ranked.items()})


def collect_examples(rows: Sequence[RowRef], n: int, k: int = 5) -> list[Example]:
    """The same ``n`` queries (evenly spread over those every row ranked) with each row's top ``k``."""
    ranked: dict[str, dict[str, list[str]]] = {}
    splits: list[CIRSplit] = []
    for label, folder, row in rows:
        where = evaluated_row(folder, row)
        ranked[label] = read_predictions(where.ranked)[1]
        splits = splits or where.splits
    queries = [(s, q) for s in splits for q in s.queries if q.target is not None
               and all(q.qid in lists for lists in ranked.values())]
    if not queries:
        raise ValueError(f"no query with a target is ranked by every row of {[str(f) for _, f, _ in rows]}")
    return [_example(split, query, ranked, k) for split, query in spaced(queries, n)]


def write_examples(rows: Sequence[RowRef], out_png: Path, n: int = 6, k: int = 5) -> Path:
    """:func:`collect_examples` drawn into ``out_png``; returns it."""
    draw_examples(collect_examples(rows, n, k), out_png)
    return out_png
