"""Seeded ablations on shapes: train + evaluate variants of a method, print mean +- std tables.

    python experiments/ablate.py bidirectional --data runs/demo/shapes --backbone runs/demo/pretrain-blip/backbone
    python experiments/ablate.py rerank --data runs/demo/shapes --backbone runs/demo/pretrain-blip/backbone

Every run is an ordinary ``cirlab train`` run folder (its exported ``<run>/model``) or
``cirlab eval --model`` folder under ``--out`` (config, seed, versions and metrics recorded there);
a finished run is reused, so an interrupted ablation continues. Evaluations are on shapes test.
The collected rows go to ``<out>/results.json``; the bidirectional ablation also draws
``<out>/r1_vs_w.png`` (R@1 against the reversed-loss weight w).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
from pathlib import Path

from cirlab.cli import main as cirlab
from cirlab.config import CONFIG_ROOT
from cirlab.utils.io import atomic_write_json, read_json


def run_train(config: Path, run: Path, sets: list[str]) -> Path:
    """Train unless ``run`` already holds its exported model; returns ``<run>/model``."""
    if not (run / "model").exists():
        if run.exists():  # interrupted earlier: start that run again
            shutil.rmtree(run)
        if cirlab(["train", "--config", str(config), "--run-dir", str(run), *(x for s in sets for x in ("--set", s))]):
            raise SystemExit(f"training failed: {run}")
    return run / "model"


def run_eval(run: Path, args: list[str]) -> dict[str, dict[str, float]]:
    """``cirlab eval`` into ``run`` (``args``: ``--model DIR ...`` or ``--config FILE --set ...``),
    unless it already holds its metrics."""
    if not (run / "metrics.json").is_file():
        if run.exists():  # interrupted earlier: an evaluation folder without metrics is refused again
            shutil.rmtree(run)
        if cirlab(["eval", "--run-dir", str(run), *args]):
            raise SystemExit(f"evaluation failed: {run}")
    return read_json(run / "metrics.json", "metrics")


def eval_model(model: Path, run: Path, data: Path, *extra: str) -> dict[str, dict[str, float]]:
    """``cirlab eval --model`` of an exported model on shapes test."""
    return run_eval(run, ["--model", str(model), "--dataset", "shapes", "--root", str(data), "--split", "test", *extra])


def summarise(results: dict[str, list[dict[str, float]]], columns: list[str]) -> str:
    """Markdown table: one row per variant, mean +- std over seeds per column."""
    lines = ["| variant | seeds | " + " | ".join(columns) + " |", "|---|---|" + "---|" * len(columns)]
    for name, runs in results.items():
        cells = []
        for c in columns:
            values = [r[c] for r in runs if c in r]
            if not values:
                cells.append("-")
            elif len(values) == 1:
                cells.append(f"{values[0]:.2f}")
            else:
                cells.append(f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}")
        lines.append(f"| {name} | {len(runs)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def bidirectional(args: argparse.Namespace) -> dict[str, list[dict[str, float]]]:
    bi = CONFIG_ROOT / "bidirectional"
    base = [f"data.root={args.data}"]
    out: dict[str, list[dict[str, float]]] = {}
    zs = run_eval(args.out / "zeroshot", ["--config", str(CONFIG_ROOT / "eval" / "shapes_zeroshot_blip.yaml"),
                                          "--set", f"data.root={args.data}", "--set", f"model.backbone={args.backbone}",
                                          "--set", "evaluation.split=test"])
    out["sum baseline (zero-shot)"] = [zs["sum"]]
    stage1 = {f"w={w}": [f"method.reverse_weight={w}"] for w in args.weights}
    stage1["compat prefix, w=0.4"] = ["method.reverse_weight=0.4", "method.direction=compat"]
    for seed in args.seeds:
        for name, sets in stage1.items():
            tag = name.replace(" ", "_").replace(",", "").replace("=", "")
            model = run_train(bi / "shapes_text.yaml", args.out / f"text-{tag}-s{seed}",
                              [*base, f"model.backbone={args.backbone}", f"seed={seed}", *sets, *args.stage1_set])
            m = eval_model(model, args.out / f"eval-text-{tag}-s{seed}", args.data)  # the model holds its recipe
            row = {**m["forward"], **{f"back R@{k}": m["backward"][f"R@{k}"] for k in (1, 5)}}
            out.setdefault(f"stage I, {'forward only' if name == 'w=0.0' else name}", []).append(row)
        stage1_bi = run_train(bi / "shapes_text.yaml", args.out / f"text-w0.4-s{seed}",
                              [*base, f"model.backbone={args.backbone}", f"seed={seed}", "method.reverse_weight=0.4",
                               *args.stage1_set])
        for w in (0.0, 0.5):
            combiner = run_train(bi / "shapes_combiner.yaml", args.out / f"combiner-w{w}-s{seed}",
                                 [*base, f"model.backbone={stage1_bi}", f"seed={seed}", f"method.reverse_weight={w}",
                                  *args.stage2_set])
            m = eval_model(combiner, args.out / f"eval-combiner-w{w}-s{seed}", args.data)
            row = {**m["forward"], **{f"back R@{k}": m["backward"][f"R@{k}"] for k in (1, 5)}}
            out.setdefault(f"stage II on bi stage I (w=0.4), {'forward only' if w == 0 else f'bi w={w}'}", []).append(row)
    plot_weights(out, args.weights, args.out / "r1_vs_w.png")
    return out


def plot_weights(out: dict[str, list[dict[str, float]]], weights: list[float], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot")
        return
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for metric, label in (("R@1", "forward R@1"), ("back R@1", "backward R@1")):
        means, stds = [], []
        for w in weights:
            runs = out[f"stage I, {'forward only' if w == 0 else f'w={w}'}"]
            values = [r[metric] for r in runs]
            means.append(statistics.mean(values))
            stds.append(statistics.stdev(values) if len(values) > 1 else 0.0)
        ax.errorbar(weights, means, yerr=stds, marker="o", capsize=3, label=label)
    ax.set_xlabel("reversed-loss weight w (stage I)")
    ax.set_ylabel("R@1 on shapes test (%)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def rerank(args: argparse.Namespace) -> dict[str, list[dict[str, float]]]:
    rr = CONFIG_ROOT / "rerank"
    base = [f"data.root={args.data}"]
    out: dict[str, list[dict[str, float]]] = {}
    for seed in args.seeds:
        filt = run_train(rr / "shapes_filter.yaml", args.out / f"filter-s{seed}",
                         [*base, f"model.backbone={args.backbone}", f"seed={seed}", *args.stage1_set])
        for merge in ("official", "average"):
            reranker = run_train(rr / "shapes_reranker.yaml", args.out / f"reranker-{merge}-s{seed}",
                                 [*base, f"model.backbone={filt}", f"method.reranker_init={args.backbone}",
                                  f"seed={seed}", f"method.merge={merge}", *args.stage2_set])
            m = eval_model(reranker, args.out / f"eval-reranker-{merge}-s{seed}", args.data,
                           "--rerank-k", *map(str, args.ks), "--fusion", str(args.fusion_weight),
                           "--max-queries", str(args.eval_queries))
            for row, metrics in m.items():
                if row == "stage1":
                    if merge == "official":
                        out.setdefault("stage I alone", []).append(metrics)
                    continue
                out.setdefault(f"{row} ({merge} merge)", []).append(metrics)
    return out


def cli() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("method", choices=["bidirectional", "rerank"])
    p.add_argument("--data", type=Path, required=True, help="shapes root")
    p.add_argument("--backbone", type=Path, required=True, help="the pretrained small BLIP folder")
    p.add_argument("--out", type=Path, help="default: runs/ablation-<method>")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--weights", type=float, nargs="+", default=[0.0, 0.1, 0.4, 1.0])
    p.add_argument("--ks", type=int, nargs="+", default=[10, 50, 100])
    p.add_argument("--eval-queries", type=int, default=500)
    p.add_argument("--fusion-weight", type=float, default=1.0, help="rows rerank@K+fusion: re-ranker + W x stage-I cosine")
    p.add_argument("--stage1-set", nargs="*", default=[], help="extra overrides of every stage-I training")
    p.add_argument("--stage2-set", nargs="*", default=[], help="extra overrides of every stage-II training")
    args = p.parse_args()
    args.out = args.out or Path(f"runs/ablation-{args.method}")
    results = (bidirectional if args.method == "bidirectional" else rerank)(args)
    atomic_write_json(args.out / "results.json", results, indent=1)
    columns = ["R@1", "R@5", "R@10", "R@50", "Rs@1", "Avg"]
    if args.method == "bidirectional":
        columns += ["back R@1", "back R@5"]
    print(summarise(results, columns))


if __name__ == "__main__":
    cli()
