"""Score a predictions file against a split's annotations: a local stand-in for the
CIRR and CIRCO test servers (on val splits) and the scorer for FashionIQ predictions."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from cirlab.data.base import CIRSplit
from cirlab.data.registry import benchmark
from cirlab.evaluation.protocols import category_of, chance_levels, combine_splits, evaluate_rankings
from cirlab.evaluation.submission import check_coverage, read_predictions


def _check_metric(meta: Mapping[str, str], expected: str, path: Path) -> None:
    """Catch swapped CIRR files: a file that names its metric must name the right one."""
    if "metric" in meta and meta["metric"] != expected:
        raise ValueError(f"{path}: holds metric {meta['metric']!r}, expected {expected!r}")


def _read(path: Path, splits: Sequence[CIRSplit], metric: str) -> dict[str, list[str]]:
    meta, ranked = read_predictions(path)
    _check_metric(meta, metric, path)
    categories = benchmark(splits[0].dataset).categories
    if categories:  # one file may hold categories not scored this time
        others = tuple(f"{c}-" for c in set(categories) - {category_of(s) for s in splits})
        ranked = {k: v for k, v in ranked.items() if not k.startswith(others)} if others else ranked
    check_coverage(path, ranked, [q.qid for s in splits for q in s.queries])
    return ranked


SplitRankings = tuple[dict[str, list[str]], dict[str, list[str]] | None]


def read_rankings(splits: Sequence[CIRSplit], predictions: str | os.PathLike,
                  subset_predictions: str | os.PathLike | None = None) -> list[SplitRankings]:
    """Per split, the (ranked, subset ranked) ids of one predictions file covering every query
    of ``splits`` (a FashionIQ file may hold more categories than ``splits``)."""
    ranked = _read(Path(predictions), splits, "recall")
    subset = None if subset_predictions is None else _read(Path(subset_predictions), splits, "recall_subset")
    out = []
    for split in splits:
        own = {q.qid for q in split.queries}
        out.append(({k: v for k, v in ranked.items() if k in own},
                    None if subset is None else {k: v for k, v in subset.items() if k in own}))
    return out


def score_predictions(splits: Sequence[CIRSplit], predictions: str | os.PathLike,
                      subset_predictions: str | os.PathLike | None = None) -> dict[str, float]:
    """Metrics (percent) of one predictions file covering every query of ``splits``.

    Without ``subset_predictions`` the Rs@K metrics and Avg are left out. A FashionIQ file
    (a benchmark with categories) may hold every category when fewer are scored.
    """
    labels = (str(predictions), str(subset_predictions))
    results = [evaluate_rankings(split, ranked, subset, labels=labels)
               for split, (ranked, subset) in zip(splits, read_rankings(splits, predictions, subset_predictions))]
    return combine_splits(splits, results)


def format_scores(splits: Sequence[CIRSplit], metrics: Mapping[str, float]) -> str:
    """A table of the metrics next to their chance level (a uniformly random ranking)."""
    chance = combine_splits(splits, [chance_levels(s) for s in splits])
    lines = [", ".join(f"{s.name}: {len(s.queries)} queries, {len(s.gallery)} gallery images" for s in splits),
             f"{'metric':<12}{'score':>8}{'chance':>9}"]
    lines += [f"{name:<12}{value:>8.2f}{chance[name]:>9.2f}" for name, value in metrics.items()]
    return "\n".join(lines)
