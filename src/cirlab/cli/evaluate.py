"""``cirlab eval``: score a model on a split; prints the table, writes metrics.json and the
predictions in the benchmark's submission format (any split, val included: ``cirlab score``
reads them back to the same numbers).

* ``--model DIR``: an exported model folder (``<run>/model``), loaded with :func:`cirlab.load`;
* ``--config FILE``: a config whose stage produces composers (zero-shot: one row per mode, on
  ``model.backbone``) or scores itself (pretraining: scene caption retrieval of ``model.backbone``).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from cirlab.config import dataset_defaults, load_config

DATASET_HELP = "a registered benchmark: shapes, cirr, fashioniq, circo, or a plugin's (CIRLAB_PLUGINS)"


DESCRIPTION = """\
Score a model on a split: print the metrics table and write metrics.json, eval.json and the \
predictions in the benchmark's submission format into the output folder (--run-dir) for any \
split, val included (cirlab score reads them back to the same numbers).

What to evaluate: --model DIR, an exported model folder (<run-dir>/model of cirlab train) or a \
plain BLIP / CLIP folder (its zero-shot model), on --dataset / --root; or --config FILE, a \
zero-shot config (one row per mode, on model.backbone) or a pretraining config (scene caption \
retrieval of model.backbone), on the config's data.dataset / data.root.

Images missing on disk are left out, and the report says how many."""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="evaluate a model on a split (metrics.json + predictions files)",
                       description=DESCRIPTION)
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--model", type=Path, help="an exported model folder (<run>/model)")
    what.add_argument("--config", type=Path, help="a zero-shot or pretraining config")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="--config only: override a config field")
    p.add_argument("--dataset", help="--model: " + DATASET_HELP + " (default shapes)")
    p.add_argument("--root", type=Path, help="--model: the dataset root (default runs/demo/shapes)")
    p.add_argument("--split", help="the split to evaluate (default: --model test; --config evaluation.split)")
    p.add_argument("--categories", nargs="+", help="a benchmark with categories: these only (FashionIQ: dress, shirt, toptee)")
    p.add_argument("--batch-size", type=int, help="queries per batch (default 64; --config: evaluation.batch_size)")
    p.add_argument("--rerank-k", type=int, nargs="+", help="re-ranking models: rows rerank@K for these K")
    p.add_argument("--fusion", type=float, help="re-ranking models: also rows re-ranker + W x stage-I cosine")
    p.add_argument("--beyond-k", choices=["official", "first-stage"], help="re-ranking models: below the top K, "
                   "nothing (official: every metric counts hits inside the K) or the first stage's order "
                   "(default: the model's own setting, method.beyond_k)")
    p.add_argument("--token-dtype", choices=["float16", "float32"], help="storage of cached image token sequences "
                   "(default: the data config's token_dtype: float32 for CIRR, FashionIQ and CIRCO as the official code, float16 for shapes)")
    p.add_argument("--max-queries", type=int, help="evaluate the first N queries only (CPU budget)")
    p.add_argument("--examples", type=int, metavar="N", help="also draw N queries (evenly spread over the split) "
                   "with each row's top 5, hits outlined, into examples.png in the output folder")
    p.add_argument("--decode", action="store_true", help="decode every image first and leave out the unreadable "
                   "ones (as missing ones always are)")
    p.add_argument("--run-dir", type=Path, help="output folder (default: runs/eval/<name>-<split>-<time>)")
    p.set_defaults(func=evaluate)


def evaluate(args: argparse.Namespace) -> int:
    if args.model is not None:
        if args.overrides:
            raise ValueError("--set applies to --config only")
        return _evaluate_model(args)
    return _evaluate_config(args)


def _out_dir(args: argparse.Namespace, name: str, split: str) -> Path:
    """The output folder, created only once everything has loaded (a refused command leaves none)."""
    out = args.run_dir or Path("runs/eval") / f"{name}-{split}-{time.strftime('%Y%m%d-%H%M%S')}"
    if (out / "metrics.json").exists():
        raise FileExistsError(f"{out} already holds an evaluation; pick another --run-dir")
    out.mkdir(parents=True, exist_ok=True)
    return out


def _evaluate_model(args: argparse.Namespace) -> int:
    import cirlab

    dataset = args.dataset or "shapes"
    root = args.root or Path("runs/demo/shapes")
    split_name = args.split or "test"
    splits = _splits(dataset, root, split_name, args.categories, args.decode)
    composer = cirlab.load(args.model)
    folder = args.model.resolve()
    name = folder.parent.name if folder.name == "model" else folder.name  # <run>/model: the run's name
    out = _out_dir(args, name, split_name)
    options = dict(batch_size=args.batch_size or 64, rerank_ks=args.rerank_k, fusion_weight=args.fusion,
                   beyond_k=args.beyond_k, max_queries=args.max_queries,
                   token_dtype=args.token_dtype or dataset_defaults(dataset).token_dtype)
    metrics = _run([composer], splits, out, name, options,
                   {"model": str(args.model.resolve()), "dataset": dataset, "root": str(root), "split": split_name})
    _print_reported(args.model, dataset, metrics)
    _draw_examples(out, dataset, args.examples)
    return 0


def _print_reported(model: Path, dataset: str, metrics: dict[str, dict[str, float]]) -> None:
    """An imported release that cirlab recognises (by its files' SHA-1): the authors' numbers beside."""
    from cirlab.composers import read_manifest
    from cirlab.importers.zoo import release_of
    from cirlab.utils.report import format_table

    if not (model / "composer.json").is_file():
        return
    release = release_of(read_manifest(model).get("provenance"))
    if release is None or release.dataset != dataset or not release.reported:
        return
    row = next(iter(metrics.values()), {})
    table = {f"reported ({release.split})": release.reported,
             "this evaluation": {k: row[k] for k in release.reported if k in row}}
    print(f"{release.method} on {dataset}, released in {release.published}; reported by {release.reported_by}:")
    print(format_table(table))


def _evaluate_config(args: argparse.Namespace) -> int:
    from cirlab.methods import spec_of

    cfg = load_config(args.config, args.overrides)
    spec = spec_of(cfg, str(args.config))
    if args.dataset or args.root:
        raise ValueError("--config takes the dataset from data.dataset / data.root (use --set)")
    split_name = args.split or cfg.evaluation.split
    from cirlab.data.registry import benchmark

    categories = args.categories or benchmark(cfg.data.dataset).category_filter(cfg.data.categories)
    splits = _splits(cfg.data.dataset, cfg.data.root, split_name, categories, args.decode)
    meta = {"config": cfg.model_dump(mode="json"), "split": split_name}
    if spec.evaluate is not None:  # a stage that scores itself (pretraining: scene caption retrieval)
        return _evaluate_own(args, cfg, spec.evaluate(cfg, splits), splits, meta)
    if spec.composers is None:
        raise ValueError(f"{args.config}: method {spec.label} is trained: evaluate its exported model "
                         f"with cirlab eval --model <run>/{spec.produces}")
    composers = spec.composers(cfg)
    out = _out_dir(args, cfg.name, split_name)
    options = dict(batch_size=args.batch_size or cfg.evaluation.batch_size, max_queries=args.max_queries,
                   token_dtype=args.token_dtype or cfg.data.token_dtype)
    _run(composers, splits, out, cfg.name, options, meta)
    _draw_examples(out, cfg.data.dataset, args.examples)
    return 0


def _draw_examples(out: Path, dataset: str, n: int | None) -> None:
    """--examples N: the same N queries across every row with predictions, drawn (needs targets)."""
    if not n:
        return
    if not (out / "metrics.json").is_file():
        print("examples: the split has no targets to outline; nothing drawn")
        return
    from cirlab.evaluation.compare import predicted_rows
    from cirlab.evaluation.examples import write_examples

    rows = predicted_rows(out, dataset)
    print(f"examples: {write_examples([(row, out, row) for row in rows], out / 'examples.png', n=n)}")


def _splits(dataset: str, root: Path | str, split: str, categories: list[str] | None, decode: bool = False):
    """The splits without their missing (``decode``: or undecodable) images, reported once."""
    from cirlab.data.check import drop_missing, suggest_root
    from cirlab.data.registry import load_splits

    kept = []
    for s in load_splits(dataset, root, split, categories=categories):
        try:
            s, dropped = drop_missing(s, decode=decode)
        except ValueError as e:  # nothing left: a root one level off holds every image?
            other = suggest_root([s], root)
            if other is None:
                raise
            raise ValueError(f"{e} The images are under {other}: try it as the dataset root.") from None
        if dropped.images:
            print(dropped)
        kept.append(s)
    return kept


def _run(composers, splits, out: Path, name: str, options: dict, meta: dict) -> dict[str, dict[str, float]]:
    """Evaluate each composer, print one table, write metrics.json, eval.json and the predictions;
    returns the metrics per row."""
    from cirlab.evaluation.evaluate import TOPK_DEPTHS, evaluate_composer, write_predictions
    from cirlab.retrieval.topk import save_topk
    from cirlab.training.run import environment
    from cirlab.utils.io import atomic_write_json
    from cirlab.utils.report import format_table

    metrics: dict[str, dict[str, float]] = {}
    written: list[Path] = []
    fields = sorted({f for c in composers for f in (c.gallery_field, c.reference_field)})  # one cache entry
    for composer in composers:
        grounded = composer.kind == "grounded"
        result = evaluate_composer(composer, splits, topk_depths=TOPK_DEPTHS if grounded else None,
                                   topk_k=200 if grounded else None, extra_fields=fields, **options)
        metrics.update(result.metrics)
        for row in result.rankings:
            written += write_predictions(out, name, result, row)
        for split, topk in zip(result.splits, result.topk):
            topk.backbone = composer.backbone.fingerprint()  # the file names the filter that ranked
            written.append(save_topk(out / f"topk_{split.name.replace('/', '_')}.pt", topk))
    atomic_write_json(out / "eval.json", {**meta, "options": options, "environment": environment(0)}, indent=1)
    for split in splits:
        print(f"{split.name}: {len(split.queries)} queries, {len(split.gallery)} images")
    if metrics:
        atomic_write_json(out / "metrics.json", metrics, indent=1)
        print(format_table(metrics))
        print(f"metrics: {out / 'metrics.json'}")
    print("predictions: " + ", ".join(str(p) for p in written))
    return metrics


def _evaluate_own(args, cfg, results: dict[str, dict[str, float]], splits, meta) -> int:
    from cirlab.utils.io import atomic_write_json
    from cirlab.utils.report import format_table

    out = _out_dir(args, cfg.name, splits[0].split)
    atomic_write_json(out / "metrics.json", results, indent=1)
    atomic_write_json(out / "eval.json", meta, indent=1)
    print(format_table(results))
    print(f"metrics: {out / 'metrics.json'}")
    return 0
