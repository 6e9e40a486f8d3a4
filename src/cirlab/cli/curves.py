"""``cirlab curves``: the training and validation curves of one or more runs, as one PNG."""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cirlab.training.run import RunDir

Series = dict[tuple[str, str], tuple[list[int], list[float]]]  # (event, name) -> (steps, values)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("curves", help="plot the training and validation curves of runs (metrics.jsonl) as a PNG")
    p.add_argument("--run-dir", dest="run_dirs", type=Path, action="append", required=True,
                   help="a run directory; repeat it to compare runs (one line each)")
    p.add_argument("--out", type=Path, default=Path("curves.png"), help="the PNG to write (default: curves.png)")
    p.add_argument("--metrics", help="comma-separated names, e.g. loss,R@1 (default: every training scalar "
                                     "and the headline validation metrics)")
    p.set_defaults(func=curves)


def curves(args: argparse.Namespace) -> int:
    from cirlab.training.run import RunDir

    names = [n.strip() for n in args.metrics.split(",") if n.strip()] if args.metrics else None
    print(f"wrote {plot_curves([RunDir.open(p) for p in args.run_dirs], args.out, names)}")
    return 0


def read_series(records: list[dict[str, Any]]) -> Series:
    """Every numeric value of the ``train`` and ``eval`` events against the step."""
    series: Series = {}
    for r in records:
        if r.get("event") not in ("train", "eval"):
            continue
        for name, value in r.items():
            if name in ("event", "epoch", "step") or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            steps, values = series.setdefault((r["event"], name), ([], []))
            steps.append(r["step"])
            values.append(value)
    return series


def plot_curves(runs: list[RunDir], out: Path, metrics: list[str] | None = None) -> Path:
    """One panel per (event, metric), one line per run; ``metrics`` names them (a name logged by
    both events gets both panels), by default every training scalar and the headline validation
    metrics (:func:`~cirlab.utils.report.main_metric_names`)."""
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    from cirlab.utils.io import atomic_path
    from cirlab.utils.report import main_metric_names

    per_run = {run: read_series(run.read_metrics()) for run in runs}
    for run, series in per_run.items():
        if not series:
            raise ValueError(f"{run.metrics_path}: no train or eval events to plot")
    available = list(dict.fromkeys(key for series in per_run.values() for key in series))
    by_event = {e: [n for ev, n in available if ev == e] for e in ("train", "eval")}
    if metrics is None:
        panels = [("train", n) for n in by_event["train"]] + [("eval", n) for n in main_metric_names(by_event["eval"])]
    else:
        unknown = [m for m in metrics if not any(name == m for _, name in available)]
        if unknown:
            listing = "; ".join(f"{e}: {', '.join(names) or '-'}" for e, names in by_event.items())
            raise ValueError(f"--metrics {','.join(unknown)}: not logged in "
                             f"{', '.join(str(r.metrics_path) for r in runs)}; available: {listing}")
        panels = [(e, m) for m in metrics for e in ("train", "eval") if (e, m) in available]

    labels = [run.path.name for run in runs]
    if len(set(labels)) < len(labels):  # same folder names in different places
        labels = [str(run.path) for run in runs]
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig = Figure(figsize=(4.5 * cols, 3.2 * rows), layout="constrained")  # Agg canvas, no pyplot state
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, (event, name) in zip(axes, panels):
        for i, (label, series) in enumerate(zip(labels, per_run.values())):
            if (event, name) in series:
                steps, values = series[event, name]
                ax.plot(steps, values, color=f"C{i}", label=label, marker="o" if event == "eval" else None,
                        markersize=3, linewidth=1.2)
        ax.set_title(f"{'training' if event == 'train' else 'validation'} {name}", fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    handles = [Line2D([], [], color=f"C{i}", label=label) for i, label in enumerate(labels)]
    fig.legend(handles=handles, loc="outside lower center", ncols=min(len(runs), 4), fontsize=9)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    return out
