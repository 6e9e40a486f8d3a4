"""``cirlab eval``: score a model on a split; the table is printed and saved as metrics.json."""

from __future__ import annotations

import argparse
import importlib
from pathlib import Path

from cirlab.config import load_config


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="evaluate a method on a split (writes metrics.json into a run folder)")
    p.add_argument("--config", required=True, type=Path)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--run-dir", type=Path, help="output folder (default: <trainer.output_dir>/<name>-<time>)")
    p.set_defaults(func=evaluate)


def format_table(results: dict[str, dict[str, float]]) -> str:
    """Rows = result names, columns = the union of metric names, in first-seen order."""
    columns = list(dict.fromkeys(k for metrics in results.values() for k in metrics))
    width = max(len(r) for r in results) if results else 4
    lines = ["  ".join([" " * width, *(f"{c:>8}" for c in columns)])]
    for name, metrics in results.items():
        cells = (f"{metrics[c]:8.2f}" if c in metrics else f"{'-':>8}" for c in columns)
        lines.append("  ".join([name.ljust(width), *cells]))
    return "\n".join(lines)


def evaluate(args: argparse.Namespace) -> int:
    from cirlab.data.registry import load_splits
    from cirlab.evaluation.protocols import combine_splits
    from cirlab.methods import METHODS
    from cirlab.models import load_backbone
    from cirlab.training.run import RunDir
    from cirlab.utils.io import atomic_write_json

    cfg = load_config(args.config, args.overrides)
    name = cfg.method.get("name")
    if name not in METHODS:
        raise ValueError(f"{args.config}: method.name must be one of {sorted(METHODS)}, got {name!r}")
    if not cfg.model.backbone:
        raise ValueError(f"{args.config}: model.backbone must name a backbone folder to evaluate")
    backbone = load_backbone(cfg.model.backbone, kind=cfg.model.kind)
    categories = cfg.data.categories if cfg.data.dataset == "fashioniq" else None
    splits = load_splits(cfg.data.dataset, cfg.data.root, cfg.evaluation.split, categories=categories)
    method = importlib.import_module(METHODS[name])
    run = RunDir.create(cfg, args.run_dir)
    if not any(s.has_targets for s in splits):  # a test split: write the server's files instead
        return _predict(method, cfg, backbone, splits, run.path)
    # FashionIQ: one split per category
    per_split = [method.evaluate(cfg, backbone, split, out=run.path) for split in splits]
    results = {row: combine_splits(splits, [r[row] for r in per_split]) for row in per_split[0]}
    atomic_write_json(run.path / "metrics.json", results, indent=1)
    for split in splits:
        print(f"{split.name}: {len(split.queries)} queries, {len(split.gallery)} images")
    print(f"backbone {cfg.model.backbone}")
    print(format_table(results))
    print(f"metrics: {run.path / 'metrics.json'}")
    return 0


def _predict(method, cfg, backbone, splits, out: Path) -> int:
    """CIRR test1 (no targets): one pair of submission files per result row, named <name>-<row>."""
    from cirlab.evaluation.submission import write_cirr_submission

    if cfg.data.dataset != "cirr" or not hasattr(method, "predict"):
        raise ValueError(f"{cfg.data.dataset}/{cfg.evaluation.split} has no targets to score, and test "
                         f"submissions are written for CIRR by methods with predict() only")
    for row, (ranked, subset) in method.predict(cfg, backbone, splits[0], out=out).items():
        for path in write_cirr_submission(out, f"{cfg.name}-{row}".replace("+", "_").replace("@", "at"),
                                          ranked, subset, split=splits[0]):
            print(f"wrote {path}")
    return 0
