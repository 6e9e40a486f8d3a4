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
    dsub = data.add_subparsers(dest="data_command", required=True, metavar="COMMAND")

    p = dsub.add_parser("synth", help="generate the built-in shapes benchmark (CIRR file layout)",
                        description="Generate the built-in shapes benchmark: scenes of coloured shapes, "
                        "composed queries that edit one scene into another, in CIRR's file layout. "
                        "Read it with --dataset shapes --root OUT.")
    p.add_argument("--out", required=True, type=Path, help="the folder to write the benchmark into")
    p.add_argument("--train-scenes", type=int, default=4000,
                   help="scenes of the training split (default: %(default)s; `cirlab demo` uses 2000)")
    p.add_argument("--val-scenes", type=int, default=400, help="scenes of the validation split (default: %(default)s)")
    p.add_argument("--test-scenes", type=int, default=800, help="scenes of the test split (default: %(default)s)")
    p.add_argument("--image-size", type=int, default=64, help="image side in pixels, at least 16 (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="random seed: the same seed writes the same benchmark "
                   "(default: %(default)s)")
    p.add_argument("--no-holdout", action="store_true", help="let every (shape, colour) pair into train "
                   "(default: four pairs appear only in val and test, to measure generalisation to unseen pairs)")
    p.add_argument("--workers", type=int, default=2, help="processes drawing images (default: %(default)s)")
    p.set_defaults(func=synth)

    p = dsub.add_parser("show", help="draw a grid of (reference, text, target) triplets")
    p.add_argument("--root", required=True, type=Path, help="the dataset root, as for `cirlab data check`")
    p.add_argument("--split", default="train", help="the split to draw from (default: %(default)s)")
    p.add_argument("--dataset", default="shapes", help=DATASET_HELP + " (default: %(default)s)")
    p.add_argument("--category", help="FashionIQ: the category (dress, shirt, toptee)")
    p.add_argument("--n", type=int, default=8, help="number of triplets (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random pick of triplets (default: %(default)s)")
    p.add_argument("--out", required=True, type=Path, help="the PNG file to write")
    p.set_defaults(func=show)

    p = dsub.add_parser("check", help="count queries, gallery and missing images; exit 1 when any is missing",
                        description="Count a split's queries and gallery images and check that every image "
                        "they refer to is on disk and readable (its header is read; --decode decodes it). "
                        "Exit status 0 when all are, 1 when any is missing. When every image is missing, "
                        "it names the folder next to --root that holds them (a root one level too deep "
                        "or too shallow).")
    p.add_argument("--dataset", required=True, help=DATASET_HELP)
    p.add_argument("--root", required=True, type=Path, help="the dataset root: the folder holding the annotations "
                   "and images (CIRR: cirr_dataset/, with cirr/captions/ and dev/; FashionIQ: the folder with "
                   "captions/, image_splits/ and images/; docs/data.md)")
    p.add_argument("--split", default="val", help="the split to check, e.g. train, val, test (default: %(default)s)")
    p.add_argument("--category", help="a benchmark with categories (FashionIQ: dress, shirt, toptee); all when omitted")
    p.add_argument("--decode", action="store_true",
                   help="also decode every image, to find truncated or non-image files (slower)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=check)


def synth(args: argparse.Namespace) -> int:
    from cirlab.data.shapes import format_stats, synthesize

    start = time.perf_counter()
    stats = synthesize(args.out, train_scenes=args.train_scenes, val_scenes=args.val_scenes,
                       test_scenes=args.test_scenes, image_size=args.image_size, seed=args.seed,
                       holdout=not args.no_holdout, workers=args.workers)
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
    try:
        splits = load_splits(args.dataset, args.root, args.split, categories=categories)
    except FileNotFoundError as e:  # no annotations there: maybe one folder up or down
        other = _root_with_annotations(args, categories)
        if other is None:
            raise
        raise FileNotFoundError(f"{e}; {other} has them: try --root {other}") from None
    report = check_splits(splits, decode=args.decode, root=args.root)
    print(json.dumps(report) if args.json else format_check(report))
    return 1 if report["missing"] else 0  # a job on this split would skip or fail on them


def _root_with_annotations(args: argparse.Namespace, categories: list[str] | None) -> Path | None:
    """The folder one level from ``--root`` (parent or subfolder) whose annotations load."""
    from cirlab.data.check import neighbour_folders
    from cirlab.data.registry import load_splits

    for folder in neighbour_folders(args.root):
        try:
            load_splits(args.dataset, folder, args.split, categories=categories)
        except (OSError, ValueError, KeyError):
            continue
        return folder
    return None
