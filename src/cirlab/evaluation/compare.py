"""Paired comparison of two evaluations on the same queries (``cirlab compare``).

Two rows evaluated on the same queries differ by less than their confidence intervals suggest
when those are taken one by one: most queries are hit (or missed) by both. Here each query's
value of every metric is read back from the rows' prediction files, the difference of the
means gets a bootstrap interval that resamples queries (both rows together, so the pairing
is kept), and every hit metric (R@K, Rs@K) gets the queries gained and lost and McNemar's exact
test on them: under "no difference" a query that only one row hits is equally likely to be
either row's, so ``min(gained, lost)`` follows Binomial(gained + lost, 1/2).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor

from cirlab.data.base import CIRSplit
from cirlab.data.registry import benchmark
from cirlab.evaluation.evaluate import row_tag
from cirlab.evaluation.protocols import combine_splits, query_values
from cirlab.evaluation.score import read_rankings
from cirlab.evaluation.submission import FILE_NAMES, read_predictions
from cirlab.utils.io import read_json

RESAMPLES = 10_000
CHUNK = 500  # resamples drawn at once: a (CHUNK, queries) weight matrix

Values = dict[str, Tensor]  # metric -> each query's value (1/0 hits, AP in [0, 1])


@dataclass(frozen=True)
class RowScores:
    """One row of one evaluation: ``values[i]`` holds each query's metric values on ``splits[i]``
    (split order; FashionIQ: one split per category)."""

    label: str
    splits: list[CIRSplit]
    values: list[Values]


@dataclass(frozen=True)
class MetricDiff:
    """One metric of both rows (percent), the interval of ``b - a``, and for a hit metric the
    queries only ``b`` hits (gained), only ``a`` hits (lost) and McNemar's exact p."""

    a: float
    b: float
    low: float
    high: float
    gained: int | None = None
    lost: int | None = None
    p: float | None = None

    @property
    def diff(self) -> float:
        """``b - a`` in percentage points."""
        return self.b - self.a


@dataclass(frozen=True)
class Comparison:
    """``metrics[name]`` of row ``b`` against row ``a`` on the ``queries`` both evaluated."""

    a: str
    b: str
    queries: int
    evaluated: tuple[int, int]
    resamples: int
    seed: int
    confidence: float
    metrics: dict[str, MetricDiff]


def mcnemar_exact(gained: int, lost: int) -> float:
    """Two-sided exact McNemar p: P(a Binomial(n, 1/2) count is at least as far from n/2 as the
    observed split), n = gained + lost discordant queries; exact integers, so no underflow."""
    n = gained + lost
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(gained, lost) + 1))
    return min(1.0, 2 * tail / 2 ** n)


def above_chance_p(hits: int, n: int, chance: float) -> float:
    """One-sided p of ``hits`` or more among ``n`` queries when each is a hit with probability
    ``chance`` (percent): is a row above a random ranking? Queries whose chance differs (several
    positives) make the true count less spread than this binomial, so the p is conservative."""
    if chance >= 100:
        return 1.0
    q = chance / 100
    if q <= 0:
        return 0.0 if hits else 1.0
    log = [math.lgamma(n + 1) - math.lgamma(x + 1) - math.lgamma(n - x + 1) + x * math.log(q) + (n - x) * math.log1p(-q)
           for x in range(hits, n + 1)]
    return min(1.0, sum(math.exp(v) for v in log))


def mean_above_p(values: Tensor, level: float, *, resamples: int = RESAMPLES, seed: int = 0) -> float:
    """One-sided bootstrap p that the mean of per-query ``values`` (fractions) is not above
    ``level`` (percent): for a metric that is not a hit (Avg), where no binomial applies."""
    boot = bootstrap_means((values.double() - level / 100)[:, None], resamples, torch.Generator().manual_seed(seed))
    return (boot <= 0).double().mean().item()


def is_hit_metric(name: str) -> bool:
    """R@K and Rs@K are per-query hits (0 or 1); Avg and mAP@K are not."""
    return name.rpartition("/")[2].partition("@")[0] in ("R", "Rs")


def bootstrap_means(diffs: Tensor, resamples: int, generator: torch.Generator) -> Tensor:
    """(resamples, metrics): the mean of ``diffs`` (queries, metrics) over queries drawn with
    replacement, in percent; drawn in chunks as count weights (no (resamples, queries, metrics) copy)."""
    n = diffs.shape[0]
    out = []
    for start in range(0, resamples, CHUNK):
        size = min(CHUNK, resamples - start)
        picks = torch.randint(n, (size, n), generator=generator)
        weights = torch.zeros(size, n, dtype=torch.double).scatter_add_(1, picks, torch.ones(size, n, dtype=torch.double))
        out.append(weights @ diffs / n * 100)
    return torch.cat(out)


def _means(splits: Sequence[CIRSplit], values: Sequence[Values]) -> dict[str, float]:
    """Each metric as its evaluation reports it (FashionIQ: combined over the categories)."""
    per_split = [{name: v.mean().item() * 100 for name, v in vals.items()} for vals in values]
    for split_means, vals in zip(per_split, values):
        if "Avg" in vals:  # as the scorer: from the two means (equal up to float rounding)
            split_means["Avg"] = (split_means["R@5"] + split_means["Rs@1"]) / 2
    return combine_splits(splits, per_split)


def _common(a: RowScores, b: RowScores) -> tuple[list[Values], list[Values], int]:
    """Both rows' values restricted to the queries both evaluated, in A's order; their count."""
    if len(a.splits) != len(b.splits) or any(sa.dataset != sb.dataset or sa.split != sb.split
                                             for sa, sb in zip(a.splits, b.splits)):
        raise ValueError(f"{a.label} and {b.label} are not evaluations of the same split: "
                         f"{[s.name for s in a.splits]} against {[s.name for s in b.splits]}")
    va, vb, n = [], [], 0
    for sa, sb, vals_a, vals_b in zip(a.splits, b.splits, a.values, b.values):
        where_b = {q.qid: i for i, q in enumerate(sb.queries)}
        kept = [(i, where_b[q.qid]) for i, q in enumerate(sa.queries) if q.qid in where_b]
        if not kept:
            raise ValueError(f"{a.label} and {b.label} share no query of {sa.name}")
        ia, ib = (torch.tensor(x) for x in zip(*kept))
        shared = [m for m in vals_a if m in vals_b]
        va.append({m: vals_a[m][ia] for m in shared})
        vb.append({m: vals_b[m][ib] for m in shared})
        n += len(kept)
    return va, vb, n


def compare_scores(a: RowScores, b: RowScores, *, resamples: int = RESAMPLES, seed: int = 0,
                   confidence: float = 0.95) -> Comparison:
    """Row ``b`` against row ``a`` on the queries both evaluated: each metric's two values, the
    percentile bootstrap interval of ``b - a`` (queries resampled together, within each split:
    FashionIQ's categories keep their sizes; ``seed`` makes it repeatable) and, for hit metrics,
    the queries gained and lost with McNemar's exact p."""
    va, vb, n = _common(a, b)
    generator = torch.Generator().manual_seed(seed)
    draws = []
    for vals_a, vals_b in zip(va, vb):
        names = list(vals_a)
        boot = bootstrap_means(torch.stack([vals_b[m] - vals_a[m] for m in names], dim=1), resamples, generator)
        draws.append({m: boot[:, j] for j, m in enumerate(names)})
    for split_draws, vals_a in zip(draws, va):
        if "Avg" in vals_a:
            split_draws["Avg"] = (split_draws["R@5"] + split_draws["Rs@1"]) / 2
    combined = combine_splits(a.splits, draws)
    mean_a, mean_b = _means(a.splits, va), _means(a.splits, vb)
    q = torch.tensor([(1 - confidence) / 2, (1 + confidence) / 2], dtype=torch.double)
    metrics = {}
    for name in mean_a:
        low, high = torch.quantile(combined[name], q).tolist()
        metrics[name] = MetricDiff(mean_a[name], mean_b[name], low, high, **_discordant(name, va, vb))
    return Comparison(a.label, b.label, n, (_count(a), _count(b)), resamples, seed, confidence, metrics)


def _count(row: RowScores) -> int:
    """How many queries a row was evaluated on."""
    return sum(len(s.queries) for s in row.splits)


def _discordant(name: str, va: list[Values], vb: list[Values]) -> dict[str, int | float]:
    """gained, lost and McNemar's p of a hit metric of one split (none for the others)."""
    own = [(a[name], b[name]) for a, b in zip(va, vb) if name in a]
    if not is_hit_metric(name) or len(own) != 1:
        return {}
    hits_a, hits_b = (x.bool() for x in own[0])
    gained, lost = int((hits_b & ~hits_a).sum()), int((hits_a & ~hits_b).sum())
    return {"gained": gained, "lost": lost, "p": mcnemar_exact(gained, lost)}


# --- reading an evaluation folder (`cirlab eval --run-dir`) ------------------------------------


def _eval_field(meta: dict, key: str) -> str:
    """dataset / root of an eval.json: its own (--model), else its config's (--config)."""
    return meta[key] if key in meta else meta["config"]["data"][key]


def evaluated_splits(meta: dict, predictions: Path) -> list[CIRSplit]:
    """The splits an evaluation scored (its eval.json's dataset, root and split), restricted to the
    queries its predictions file ranks: those ``cirlab eval`` kept (images on disk,
    ``--max-queries``, ``--categories``), found without opening an image."""
    from cirlab.data.registry import load_splits

    ranked = set(read_predictions(predictions)[1])
    splits = [dataclasses.replace(s, queries=[q for q in s.queries if q.qid in ranked])
              for s in load_splits(_eval_field(meta, "dataset"), _eval_field(meta, "root"), meta["split"])]
    return [s for s in splits if s.queries]


def _file_tags(folder: Path, dataset: str) -> list[str]:
    """The ``<name>-<row>`` tag of every row with prediction files in ``folder``."""
    prefix, suffix = FILE_NAMES[benchmark(dataset).submission]("\0")[0].split("\0")
    return [p.name[len(prefix):len(p.name) - len(suffix)] for p in sorted(folder.glob(f"{prefix}*{suffix}"))]


def predicted_rows(folder: Path, dataset: str) -> list[str]:
    """The rows of metrics.json that have prediction files (every row but shapes' backward ones)."""
    tags = _file_tags(folder, dataset)
    rows = read_json(folder / "metrics.json", "metrics file")
    return [r for r in rows if any(t.endswith("-" + row_tag(r)) for t in tags)]


def row_files(folder: Path, dataset: str, row: str | None) -> tuple[str, Path, Path | None]:
    """The row (given, or the folder's only one with predictions) and its prediction files."""
    rows = predicted_rows(folder, dataset)
    if row is None:
        if len(rows) != 1:
            raise ValueError(f"{folder} holds the rows {', '.join(rows)}: name one (--row-a / --row-b)")
        row = rows[0]
    tags = [t for t in _file_tags(folder, dataset) if t.endswith("-" + row_tag(row))]
    if row not in rows or len(tags) != 1:
        raise ValueError(f"{folder}: no single prediction file of row {row!r}; rows with predictions: "
                         f"{', '.join(rows) or 'none'}")
    ranked, subset = FILE_NAMES[benchmark(dataset).submission](tags[0])
    return row, folder / ranked, None if subset is None else folder / subset


@dataclass(frozen=True)
class EvaluatedRow:
    """Where one row of a ``cirlab eval`` folder lies: its prediction files and the splits (the
    queries it ranked) they answer."""

    label: str
    splits: list[CIRSplit]
    ranked: Path
    subset: Path | None


def evaluated_row(folder: str | Path, row: str | None = None) -> EvaluatedRow:
    """One row of an evaluation folder (``row``: by name, or the folder's only one with predictions)."""
    folder = Path(folder)
    meta = read_json(folder / "eval.json", "evaluation record (cirlab eval's eval.json)")
    row, ranked, subset = row_files(folder, _eval_field(meta, "dataset"), row)
    return EvaluatedRow(f"{folder} ({row})", evaluated_splits(meta, ranked), ranked, subset)


def load_row(folder: str | Path, row: str | None = None) -> RowScores:
    """Each query's metric values of one row of a ``cirlab eval`` folder, from its prediction
    files and the split's annotations (the split is loaded again, as eval.json names it)."""
    where = evaluated_row(folder, row)
    labels = (str(where.ranked), str(where.subset))
    values = [query_values(split, r, s, labels=labels)
              for split, (r, s) in zip(where.splits, read_rankings(where.splits, where.ranked, where.subset))]
    return RowScores(where.label, where.splits, values)


def compare_runs(a: str | Path, b: str | Path, row_a: str | None = None, row_b: str | None = None,
                 **options) -> Comparison:
    """:func:`compare_scores` of two evaluation folders' rows (``options``: resamples, seed, confidence)."""
    return compare_scores(load_row(a, row_a), load_row(b, row_b), **options)


def format_comparison(c: Comparison) -> str:
    """The comparison as a table for people: one line per metric, signed differences."""
    from cirlab.utils.report import metric_order

    lines = [f"A: {c.a}", f"B: {c.b}",
             f"{c.queries:,} queries in both (A evaluated {c.evaluated[0]:,}, B {c.evaluated[1]:,}); "
             f"{c.confidence:.0%} intervals from {c.resamples:,} paired bootstrap resamples of the queries (seed {c.seed})",
             f"{'metric':<12}{'A':>8}{'B':>8}{'B - A':>8}  {'interval':<18}{'gained':>7}{'lost':>6}{'McNemar p':>11}"]
    for name in sorted(c.metrics, key=metric_order):
        m = c.metrics[name]
        tested = "" if m.p is None else f"{m.gained:>7}{m.lost:>6}{format_p(m.p):>11}"
        lines.append(f"{name:<12}{m.a:>8.2f}{m.b:>8.2f}{m.diff:>+8.2f}  {format_interval(m):<18}{tested}".rstrip())
    return "\n".join(lines)


def format_interval(m: MetricDiff) -> str:
    """``[low, high]`` of the difference, signed (an interval that holds 0 reads at a glance)."""
    return f"[{m.low:+.2f}, {m.high:+.2f}]"


def format_p(p: float) -> str:
    """A p-value with the digits that matter (``<0.0001`` below)."""
    return "<0.0001" if p < 1e-4 else f"{p:.4f}" if p < 0.01 else f"{p:.3f}"


def as_json(c: Comparison) -> dict:
    """The comparison as plain data (``cirlab compare --json``)."""
    return {"a": c.a, "b": c.b, "queries": c.queries, "evaluated": list(c.evaluated), "resamples": c.resamples,
            "seed": c.seed, "confidence": c.confidence,
            "metrics": {name: {**{k: v for k, v in vars(m).items() if v is not None}, "diff": m.diff}
                        for name, m in c.metrics.items()}}
