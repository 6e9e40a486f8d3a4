"""``cirlab score``: score a predictions file on a split with annotations (e.g. val)."""

from __future__ import annotations

import argparse
from pathlib import Path

DATASET_HELP = "a registered benchmark: shapes, cirr, fashioniq, circo, or a plugin's (CIRLAB_PLUGINS)"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("score", help="score a predictions / submission file against a split's annotations")
    p.add_argument("--dataset", required=True, help=DATASET_HELP)
    p.add_argument("--root", required=True, type=Path, help="the dataset root, as for `cirlab data check`")
    p.add_argument("--split", default="val", help="the split the predictions are for; it must have annotations "
                   "(default: %(default)s)")
    p.add_argument("--predictions", required=True, type=Path,
                   help="CIRR recall_submission_*.json, CIRCO or FashionIQ predictions")
    p.add_argument("--subset-predictions", type=Path,
                   help="CIRR recall_subset_submission_*.json (adds Rs@1/2/3 and Avg)")
    p.add_argument("--category", help="a benchmark with categories (FashionIQ: dress, shirt, toptee); all when omitted")
    p.add_argument("--skip-missing-images", action="store_true",
                   help="leave out the queries whose images are missing on disk, as `cirlab eval` does")
    p.add_argument("--json", action="store_true", help="print one JSON object {metric: percent}")
    p.set_defaults(func=score)


def score(args: argparse.Namespace) -> int:
    from cirlab.data.registry import load_splits
    from cirlab.evaluation.score import format_scores, score_predictions
    from cirlab.utils.io import dump_json

    categories = [args.category] if args.category else None
    splits = load_splits(args.dataset, args.root, args.split, categories=categories)
    if args.skip_missing_images:
        from cirlab.data.check import drop_missing

        splits = [drop_missing(s)[0] for s in splits]
    metrics = score_predictions(splits, args.predictions, args.subset_predictions)
    print(dump_json(metrics) if args.json else format_scores(splits, metrics))
    return 0
