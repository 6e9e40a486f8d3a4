"""``cirlab data synth|show|check``: make the shapes benchmark, look at it, check a dataset on disk."""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

DATASET_HELP = "a registered benchmark: shapes, cirr, fashioniq, circo, or a plugin's (CIRLAB_PLUGINS)"


def register(sub: argparse._SubParsersAction) -> None:
    data = sub.add_parser("data", help="make, show and check datasets")
    dsub = data.add_subparsers(dest="data_command", required=True)

    p = dsub.add_parser("synth", help="generate the built-in shapes benchmark (CIRR file layout)")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--train-scenes", type=int)
    p.add_argument("--val-scenes", type=int)
    p.add_argument("--test-scenes", type=int)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-holdout", action="store_true", help="let every (shape, colour) pair into train")
    p.add_argument("--workers", type=int, default=2)
    p.set_defaults(func=synth)

    p = dsub.add_parser("show", help="draw a grid of (reference, text, target) triplets")
    p.add_argument("--root", required=True, type=Path)
    p.add_argument("--split", default="train")
    p.add_argument("--dataset", default="shapes", help=DATASET_HELP)
    p.add_argument("--category", help="FashionIQ category")
    p.add_argument("--n", type=int, default=8, help="number of triplets")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, type=Path, help="the PNG file to write")
    p.set_defaults(func=show)

    p = dsub.add_parser("check", help="count queries, gallery and missing images; exit 1 when any is missing")
    p.add_argument("--dataset", required=True, help=DATASET_HELP)
    p.add_argument("--root", required=True, type=Path)
    p.add_argument("--split", default="val")
    p.add_argument("--category", help="a benchmark with categories (FashionIQ: dress, shirt, toptee); all when omitted")
    p.add_argument("--decode", action="store_true",
                   help="also decode every image, to find truncated or non-image files (slower)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=check)


def synth(args: argparse.Namespace) -> int:
    from cirlab.data.shapes import format_stats, synthesize

    scales = {k: v for k, v in (("train_scenes", args.train_scenes), ("val_scenes", args.val_scenes),
                                ("test_scenes", args.test_scenes)) if v is not None}
    start = time.perf_counter()
    stats = synthesize(args.out, image_size=args.image_size, seed=args.seed, holdout=not args.no_holdout,
                       workers=args.workers, **scales)
    print(format_stats(stats))
    print(f"wrote {args.out} in {time.perf_counter() - start:.1f} s")
    return 0


def show(args: argparse.Namespace) -> int:
    from cirlab.data.registry import load_split
    from cirlab.data.show import draw_triplets

    if args.out.is_dir():
        raise ValueError(f"--out {args.out} is a folder; give the picture's file name, e.g. {args.out / 'triplets.png'}")
    split = load_split(args.dataset, args.root, args.split, category=args.category)
    queries = [q for q in split.queries if q.target is not None] or split.queries
    picked = random.Random(args.seed).sample(queries, min(args.n, len(queries)))
    rows = []
    for q in picked:
        ref, tgt = split.find_image(q.reference), q.target and split.find_image(q.target)
        if ref is None or not tgt:
            continue
        rows.append((ref, " / ".join(q.captions), tgt))
    if not rows:
        raise ValueError(f"{split.name}: no triplet with both images on disk under {args.root}")
    draw_triplets(rows, args.out)
    print(f"wrote {args.out} ({len(rows)} triplets from {split.name})")
    return 0


def check(args: argparse.Namespace) -> int:
    from cirlab.data.check import check_splits, format_check
    from cirlab.data.registry import load_splits

    categories = [args.category] if args.category else None
    report = check_splits(load_splits(args.dataset, args.root, args.split, categories=categories),
                          decode=args.decode)
    print(json.dumps(report) if args.json else format_check(report))
    return 1 if report["missing"] else 0  # a job on this split would skip or fail on them
