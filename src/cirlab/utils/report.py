"""Metrics as text for people: summaries and tables without float noise, columns that line up."""

from __future__ import annotations

import math
from numbers import Integral
from typing import Iterable, Mapping


def format_value(value: float) -> str:
    """Integers as they are, floats with 2 decimals (recalls are percentages): 15.000000596046448
    is ``15.00``. A float below 0.01 (a learning rate, a loss near 0) keeps 3 significant digits
    instead of reading as ``0.00``."""
    if isinstance(value, Integral) or not math.isfinite(value):
        return str(value)
    if value == 0 or abs(value) >= 0.01:
        return f"{value:.2f}"
    return f"{value:.3g}"


def format_metrics(metrics: Mapping[str, float], sep: str = "  ") -> str:
    """``name value`` pairs in the mapping's order, joined by ``sep`` (``"\\n"`` for one a line)."""
    return sep.join(f"{name} {format_value(value)}" for name, value in metrics.items())


_FAMILIES = ("mAP", "R", "Rs", "Avg", "avg")


def metric_order(name: str) -> tuple:
    """Sort key that reads like the papers' tables: per prefix (FashionIQ category), mAP@K, R@K,
    Rs@K with K ascending, then the averages; other names after, alphabetically. Metrics files
    are written with sorted keys (R@10 before R@5), so tables re-order their columns."""
    prefix, _, metric = name.rpartition("/")
    family, _, k = metric.partition("@")
    if family in _FAMILIES and (k.isdigit() or not k):
        return (prefix == "avg" or name == "avg", prefix, 0, _FAMILIES.index(family), int(k or 0), "")
    return (prefix == "avg", prefix, 1, 0, 0, metric)


def format_table(rows: Mapping[str, Mapping[str, float]]) -> str:
    """Rows = result names, columns = the union of metric names in :func:`metric_order`, ``-``
    where a row lacks one. Each column is as wide as its widest name or value, so the columns line
    up whatever the widths (FashionIQ's ``dress/R@10``, a recall of 100.00)."""
    columns = sorted({name for metrics in rows.values() for name in metrics}, key=metric_order)
    cells = [[format_value(m[c]) if c in m else "-" for c in columns] for m in rows.values()]
    widths = [max([len(c), *(len(row[j]) for row in cells)]) for j, c in enumerate(columns)]
    first = max((len(name) for name in rows), default=0)
    lines = ["  ".join([" " * first, *(c.rjust(w) for c, w in zip(columns, widths))])]
    for name, row in zip(rows, cells):
        lines.append("  ".join([name.ljust(first), *(v.rjust(w) for v, w in zip(row, widths))]))
    return "\n".join(lines)


def main_metric_names(names: Iterable[str], first: str | None = None) -> list[str]:
    """The headline metrics among ``names``: ``first`` (the select metric), then the top-level
    ones in their order. Breakdowns such as ``dress/R@10`` or ``backward/R@1`` are left out,
    FashionIQ's means over the categories (``avg/R@10``) are kept."""
    names = list(names)
    main = [n for n in names if n != first and ("/" not in n or n.startswith("avg/"))]
    return ([first] if first in names else []) + main


def format_markdown(header: list[str], rows: list[list[str]]) -> str:
    """A Markdown table whose columns also line up in a terminal (the first left-aligned, the
    others right-aligned): what the demo prints is what the README shows."""
    widths = [max(len(r[j]) for r in [header, *rows]) for j in range(len(header))]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.ljust(w) if j == 0 else c.rjust(w) for j, (c, w) in enumerate(zip(cells, widths))) + " |"

    rule = "|" + "|".join("-" * (w + 1) + ":" if j else ":" + "-" * (w + 1) for j, w in enumerate(widths)) + "|"
    return "\n".join([line(header), rule, *(line(r) for r in rows)])
