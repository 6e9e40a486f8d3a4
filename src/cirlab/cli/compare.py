"""``cirlab compare``: two evaluations of the same queries, paired (bootstrap intervals of each
metric's difference, McNemar's exact test on the hits, the queries gained and lost)."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("compare", help="paired comparison of two evaluations on the same queries")
    p.add_argument("run_a", type=Path, metavar="RUN_A", help="a `cirlab eval` folder (--run-dir): the baseline")
    p.add_argument("run_b", type=Path, metavar="RUN_B", help="a `cirlab eval` folder: compared against RUN_A (B - A)")
    p.add_argument("--row-a", help="RUN_A's row (e.g. image, forward, rerank@10); default: its only row with predictions")
    p.add_argument("--row-b", help="RUN_B's row; default: its only row with predictions")
    p.add_argument("--resamples", type=int, default=10_000, help="bootstrap resamples of the queries (default 10000)")
    p.add_argument("--confidence", type=float, default=0.95, help="confidence of the intervals (default 0.95)")
    p.add_argument("--seed", type=int, default=0, help="seed of the bootstrap resampling (default 0)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.set_defaults(func=compare)


def compare(args: argparse.Namespace) -> int:
    from cirlab.evaluation.compare import as_json, compare_runs, format_comparison
    from cirlab.utils.io import dump_json

    if args.resamples < 1 or not 0 < args.confidence < 1:
        raise ValueError("--resamples must be at least 1 and --confidence between 0 and 1")
    result = compare_runs(args.run_a, args.run_b, args.row_a, args.row_b, resamples=args.resamples,
                          seed=args.seed, confidence=args.confidence)
    print(dump_json(as_json(result), indent=1) if args.json else format_comparison(result))
    return 0
