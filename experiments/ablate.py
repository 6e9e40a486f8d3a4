"""Seeded ablations on shapes: train + evaluate variants of a method, 3 seeds, mean ± std.

    python experiments/ablate.py bidirectional --data runs/demo/shapes --backbone runs/demo/pretrain-blip/backbone
    python experiments/ablate.py rerank --data runs/demo/shapes --backbone runs/demo/pretrain-blip/backbone
    python experiments/ablate.py rtd --data runs/demo/shapes --backbone runs/demo/pretrain-clip/backbone
    python experiments/ablate.py spn --data runs/demo/shapes --backbone runs/demo/pretrain-blip/backbone
    python experiments/ablate.py chain --data runs/demo/shapes --backbone runs/demo/pretrain-blip/backbone
    python experiments/ablate.py report docs/ablations/rerank.json --plot docs/ablations/rerank.png

Every run is an ordinary ``cirlab train`` run folder (its exported ``<run>/model``) or a
``cirlab eval --model`` folder under ``--out`` (config, seed, versions and metrics recorded there);
a finished run is reused, so an interrupted ablation continues. Evaluations are on all shapes
test queries. The summary goes to ``--json`` in the format of docs/ablations (rows with
``{"mean", "std"}`` per metric, plus each row's validation curve, mean over seeds); ``report``
prints its markdown table and draws its plot, which is how docs/results.md is made.
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import statistics
import sys
from pathlib import Path

from cirlab.cli import main as cirlab
from cirlab.config import CONFIG_ROOT
from cirlab.training.run import RunDir
from cirlab.utils.io import atomic_write_json, read_json

BI, RR, PJ, SPN = (CONFIG_ROOT / g for g in ("bidirectional", "rerank", "projection", "spn"))

# Stage-I variants: name -> overrides. "forward" is the w = 0 baseline (the paper's BLIP4CIR+Sum).
BI_STAGE1 = {
    "forward": ["method.reverse_weight=0"],
    "bi w=0.1": ["method.reverse_weight=0.1"],
    "bi w=0.4": ["method.reverse_weight=0.4"],
    "bi w=1": ["method.reverse_weight=1"],
    "forward, text_proj lr x10": ["method.reverse_weight=0", "method.text_proj_lr_scale=10"],
    "bi w=0.4, text_proj lr x10": ["method.reverse_weight=0.4", "method.text_proj_lr_scale=10"],
    "bi w=0.4, paired sampler": ["method.reverse_weight=0.4", "trainer.sampler=paired_reference"],
    "forward, paired sampler": ["method.reverse_weight=0", "trainer.sampler=paired_reference"],
    "bi w=0.4, reversed text": ["method.reverse_weight=0.4", "method.backward_text=reversed"],
    "bi w=0.4, reference negatives": ["method.reverse_weight=0.4", "method.reversed_negatives=references"],
    "bi w=0.1, reference negatives": ["method.reverse_weight=0.1", "method.reversed_negatives=references"],
    "forward, 10%": ["method.reverse_weight=0", "data.train_fraction=0.1"],
    "bi w=0.4, 10%": ["method.reverse_weight=0.4", "data.train_fraction=0.1"],
    "forward, 25%": ["method.reverse_weight=0", "data.train_fraction=0.25"],
    "bi w=0.4, 25%": ["method.reverse_weight=0.4", "data.train_fraction=0.25"],
    "bi w=0.4, reference negatives, 10%": ["method.reverse_weight=0.4", "method.reversed_negatives=references",
                                           "data.train_fraction=0.1"],
    "bi w=0.4, reference negatives, 25%": ["method.reverse_weight=0.4", "method.reversed_negatives=references",
                                           "data.train_fraction=0.25"],
}
# Stage-II variants, each over the stage-I model of the variant named first.
BI_STAGE2 = {
    "stage II forward": ("bi w=0.4", ["method.reverse_weight=0"]),
    "stage II bi w=0.5": ("bi w=0.4", ["method.reverse_weight=0.5"]),
    **{f"stage II {arm}, {pct}%": (f"bi w=0.4, {pct}%", [f"method.reverse_weight={w}", f"data.train_fraction={pct / 100}"])
       for pct in (10, 25) for arm, w in (("forward", 0), ("bi w=0.5", 0.5))},
}
# Filter (stage I) variants: "filter" is the shapes config; the others change one choice of its recipe.
FILTERS = {
    "filter": [],
    "filter, frozen vision_proj": ["method.train_vision_proj=false"],  # as the official stage I
    "filter, paired sampler": ["trainer.sampler=paired_reference"],  # CSS-style batches: pairs share a reference
}
# Re-ranker variants over each seed's filter; the shapes config's default is "filter init, topk, residual,
# difference". The other rows give the re-ranker the candidate's own tokens, as the paper does.
IMAGE = "method.candidate_input=image"
RERANKERS = {
    "filter init, topk, residual, difference": [],
    "filter init, topk, residual": [IMAGE],
    "official": ["method.reranker_init=@backbone", "method.loss=in_batch", "method.residual=false", IMAGE],
    "filter init, topk": ["method.residual=false", IMAGE],
    "filter init, mixed, residual": ["method.loss=mixed", IMAGE],
    "filter init, in_batch, residual": ["method.loss=in_batch", IMAGE],
    "filter init, topk, difference": ["method.residual=false"],
}

# Projection bases (Phi trained here) and RTD variants over them: name -> (base, overrides).
BASES = {"lincir": PJ / "shapes_lincir.yaml", "pic2word": PJ / "shapes_pic2word.yaml"}
RTD = {
    "lincir + rtd": ("lincir", []),
    "pic2word + rtd": ("pic2word", []),
    "lincir + rtd, no anchor": ("lincir", ["method.anchor=false"]),
    "lincir + rtd, no refined sampling": ("lincir", ["method.refined_sampling=false"]),
    "lincir + rtd, s=0": ("lincir", ["method.noise=0"]),
    "lincir + rtd, s=0.25": ("lincir", ["method.noise=0.25"]),
    "lincir + rtd, s=1": ("lincir", ["method.noise=1"]),
    "lincir + rtd, rule triplets": ("lincir", ["method.triplets=rules"]),
}

# SPN stage-2 variants over each seed's stage-1 model (Bi-BLIP4CIR stage I, w = 0.4, on
# --spn-fraction of the triplets): name -> (generated positives: a generation variant or None,
# stage-2 overrides). Every stage 2 runs the same number of steps (--stage2-set), so "+ generated"
# is more positives at equal compute, and "stage 2, in-batch" is the control for "+ bank": the
# same continued training with only the batch's targets as negatives.
SPN_GENERATE = {"w[0,5)": ["method.window=[0,5]"], "w[1,50)": ["method.window=[1,50]"],
                "w[50,500)": ["method.window=[50,500]"],
                "w[500,5000)": ["method.window=[500,5000]"], "uniform": ["method.window=null"]}
SPN_VARIANTS = {
    "stage 2, in-batch": (None, ["method.negatives=in_batch"]),
    "+ bank": (None, []),
    "+ generated, in-batch": ("w[1,50)", ["method.negatives=in_batch"]),
    "+ bank + generated": ("w[1,50)", []),
    "+ bank + generated w[0,5)": ("w[0,5)", []),
    "+ bank + generated w[50,500)": ("w[50,500)", []),
    "+ bank + generated w[500,5000)": ("w[500,5000)", []),
    "+ bank + generated uniform": ("uniform", []),
    "+ bank, 100 negatives": (None, ["method.neg_num=100"]),
    "+ bank, 1000 negatives": (None, ["method.neg_num=1000"]),
}


# The composed chain, first stage -> SPN bank stage -> re-ranker of its top K: name -> (first-stage
# config, its overrides, its selection metric, the SPN stage's overrides). The filter's SPN stage
# learns tau (SPN's BLIP4CIR variant); sum fusion keeps SPN's fixed 0.02 (its CLIP4CIR setting).
CHAIN_FIRST = {
    "filter": (RR / "shapes_filter.yaml", [], "R@1", ["method.learn_tau=true"]),
    "Bi-BLIP4CIR stage I (bi w=0.4)": (BI / "shapes_text.yaml", BI_STAGE1["bi w=0.4"], "Avg", []),
    "Bi-BLIP4CIR stage I (bi w=0.4, reference negatives)": (BI / "shapes_text.yaml",
                                                             BI_STAGE1["bi w=0.4, reference negatives"], "Avg", []),
}

def run_train(config: Path, run: Path, sets: list[str]) -> Path:
    """Train unless ``run`` already holds its exported model; returns ``<run>/model``."""
    if not (run / "model").exists():
        if run.exists():  # interrupted earlier: start that run again
            shutil.rmtree(run)
        if cirlab(["train", "--config", str(config), "--run-dir", str(run), *(x for s in sets for x in ("--set", s))]):
            raise SystemExit(f"training failed: {run}")
    return run / "model"


def run_eval(run: Path, args: list[str]) -> dict[str, dict[str, float]]:
    """``cirlab eval`` into ``run`` unless it already holds its metrics."""
    if not (run / "metrics.json").is_file():
        if run.exists():
            shutil.rmtree(run)
        if cirlab(["eval", "--run-dir", str(run), *args]):
            raise SystemExit(f"evaluation failed: {run}")
    return read_json(run / "metrics.json", "metrics")


def eval_model(model: Path, run: Path, data: Path, *extra: str) -> dict[str, dict[str, float]]:
    return run_eval(run, ["--model", str(model), "--dataset", "shapes", "--root", str(data), "--split", "test", *extra])


def curve(run: Path, metric: str) -> list[list[float]]:
    """[[step, validation metric], ...] of a training run."""
    return [[e["step"], e[metric]] for e in RunDir.open(run).read_metrics() if e.get("event") == "eval" and metric in e]


def tag(name: str) -> str:
    return "".join(c if c.isalnum() or c in ".-" else "_" for c in name).strip("_")


class Table:
    """Per-row metric values over seeds, and validation curves."""

    def __init__(self) -> None:
        self.values: dict[str, list[dict[str, float]]] = {}
        self.curves: dict[str, list[list[list[float]]]] = {}

    def add(self, name: str, metrics: dict[str, float], run: Path | None = None, metric: str = "") -> None:
        self.values.setdefault(name, []).append(metrics)
        if run is not None:
            self.curves.setdefault(name, []).append(curve(run, metric))

    def summary(self, args: argparse.Namespace) -> dict:
        rows = []
        for name, runs in self.values.items():
            row: dict = {"name": name, "runs": len(runs)}
            for m in dict.fromkeys(k for r in runs for k in r):
                vals = [r[m] for r in runs if m in r]
                row[m] = {"mean": statistics.mean(vals), "std": statistics.stdev(vals) if len(vals) > 1 else 0.0}
            if name in self.curves:
                steps = [s for s, _ in self.curves[name][0]]
                row["val_curve"] = [[s, statistics.mean(c[i][1] for c in self.curves[name] if i < len(c))]
                                    for i, s in enumerate(steps)]
            rows.append(row)
        return {"dataset": f"shapes test ({args.data})", "seeds": args.seeds,
                "command": shlex.join(["python", "experiments/ablate.py", *sys.argv[1:]]), "rows": rows}


def bidirectional(args: argparse.Namespace) -> Table:
    base = [f"data.root={args.data}", *args.stage1_set]
    table = Table()
    for seed in args.seeds:
        stage1 = {}
        for name in args.variants or [*BI_STAGE1, *BI_STAGE2]:
            if name in BI_STAGE2:
                continue
            run = args.out / f"text-{tag(name)}-s{seed}"
            stage1[name] = run_train(BI / "shapes_text.yaml", run, [*base, f"model.backbone={args.backbone}",
                                                                      f"seed={seed}", *BI_STAGE1[name]])
            m = eval_model(stage1[name], args.out / f"eval-text-{tag(name)}-s{seed}", args.data)
            table.add(name, {**m["forward"], **_backward(m)}, run, "Avg")
        for name in args.variants or BI_STAGE2:
            if name not in BI_STAGE2:
                continue
            first, sets = BI_STAGE2[name]
            if first not in stage1:
                stage1[first] = run_train(BI / "shapes_text.yaml", args.out / f"text-{tag(first)}-s{seed}",
                                          [*base, f"model.backbone={args.backbone}", f"seed={seed}", *BI_STAGE1[first]])
            run = args.out / f"combiner-{tag(name)}-s{seed}"
            model = run_train(BI / "shapes_combiner.yaml", run, [f"data.root={args.data}", f"model.backbone={stage1[first]}",
                                                                  f"seed={seed}", *sets, *args.stage2_set])
            m = eval_model(model, args.out / f"eval-combiner-{tag(name)}-s{seed}", args.data)
            table.add(name, {**m["forward"], **_backward(m)}, run, "Avg")
    return table


def _backward(m: dict[str, dict[str, float]]) -> dict[str, float]:
    out = {f"back R@{k}": m["backward"][f"R@{k}"] for k in (1, 5)}
    if "backward image-only" in m:
        out["back image-only R@1"] = m["backward image-only"]["R@1"]
    return out


def rerank(args: argparse.Namespace) -> Table:
    table = Table()
    for seed in args.seeds:
        for fname in args.filters:
            frun = args.out / (f"filter-s{seed}" if fname == "filter" else f"filter-{tag(fname)}-s{seed}")
            filt = run_train(RR / "shapes_filter.yaml", frun, [f"data.root={args.data}", f"model.backbone={args.backbone}",
                                                               f"seed={seed}", *FILTERS[fname], *args.stage1_set])
            fm = eval_model(filt, args.out / f"eval-{frun.name}", args.data)
            table.add(fname, fm["filter"], frun, "R@1")
            over = "" if fname == "filter" else f"; over {fname}"
            for name in RERANKERS if args.variants is None else args.variants:
                sets = [s.replace("@backbone", str(args.backbone)) for s in RERANKERS[name]]
                run = args.out / f"reranker-{tag(name + over)}-s{seed}"
                model = run_train(RR / "shapes_reranker.yaml", run, [f"data.root={args.data}", f"model.backbone={filt}",
                                                                      f"seed={seed}", *sets, *args.stage2_set])
                m = eval_model(model, args.out / f"eval-{run.name}", args.data,
                               "--rerank-k", *map(str, args.ks), *(["--max-queries", str(args.eval_queries)]
                                                                   if args.eval_queries else []))
                for row, metrics in m.items():
                    if row.startswith("rerank@"):
                        table.add(f"{row} ({name}{over})", metrics, run if row == f"rerank@{args.ks[0]}" else None, "R@1")
    return table


def rtd(args: argparse.Namespace) -> Table:
    table = Table()
    zs = run_eval(args.out / "eval-zeroshot", ["--config", str(CONFIG_ROOT / "zeroshot" / "shapes_zeroshot_clip.yaml"),
                                               "--set", f"data.root={args.data}", "--set",
                                               f"model.backbone={args.backbone}"])
    for seed in args.seeds:
        for mode in ("image", "text", "sum"):
            table.add(f"zero-shot {mode}", zs[mode])
        bases = {}
        wanted = args.variants or [*BASES, *RTD]
        for name in dict.fromkeys([RTD[v][0] if v in RTD else v for v in wanted]):
            run = args.out / f"phi-{name}-s{seed}"
            bases[name] = run_train(BASES[name], run, [f"data.root={args.data}", f"model.backbone={args.backbone}",
                                                       f"seed={seed}", *args.stage1_set])
            m = eval_model(bases[name], args.out / f"eval-phi-{name}-s{seed}", args.data)
            table.add(name, next(iter(m.values())), run, "R@1")
        for name in wanted:
            if name not in RTD:
                continue
            base, sets = RTD[name]
            run = args.out / f"rtd-{tag(name)}-s{seed}"
            model = run_train(PJ / "shapes_rtd.yaml", run, [f"data.root={args.data}", f"model.backbone={bases[base]}",
                                                             f"seed={seed}", *sets, *args.stage2_set])
            m = eval_model(model, args.out / f"eval-rtd-{tag(name)}-s{seed}", args.data)
            table.add(name, next(iter(m.values())), run, "R@1")
    return table


def spn(args: argparse.Namespace) -> Table:
    table = Table()
    fraction = [f"data.train_fraction={args.spn_fraction}"]
    for seed in args.seeds:
        name1 = f"bi w=0.4, {args.spn_fraction:g}"
        run1 = args.out / f"text-{tag(name1)}-s{seed}"
        stage1 = run_train(BI / "shapes_text.yaml", run1, [f"data.root={args.data}", f"model.backbone={args.backbone}",
                                                           f"seed={seed}", *fraction, *BI_STAGE1["bi w=0.4"],
                                                           *args.stage1_set])
        m = eval_model(stage1, args.out / f"eval-text-{tag(name1)}-s{seed}", args.data)
        table.add(f"stage 1 ({name1})", m["forward"], run1, "Avg")
        for name in args.variants or SPN_VARIANTS:
            gen, sets = SPN_VARIANTS[name]
            extension = []
            if gen is not None:
                out = args.out / f"generated-{tag(gen)}-s{seed}.json"
                if not out.is_file() and cirlab(["spn", "generate", "--config", str(SPN / "shapes_generate.yaml"),
                                                 *(x for o in [f"data.root={args.data}", f"model.backbone={stage1}",
                                                               f"seed={seed}", *fraction, f"method.out={out}",
                                                               f"method.per_reference={args.per_reference}",
                                                               *SPN_GENERATE[gen]] for x in ("--set", o))]):
                    raise SystemExit(f"generation failed: {out}")
                extension = [f"data.extensions=[{out}]"]
            run = args.out / f"spn-{tag(name)}-s{seed}"
            model = run_train(SPN / "shapes_bank.yaml", run, [f"data.root={args.data}", f"model.backbone={stage1}",
                                                              f"seed={seed}", *fraction, *extension, *sets,
                                                              *args.stage2_set])
            m = eval_model(model, args.out / f"eval-spn-{tag(name)}-s{seed}", args.data)
            table.add(name, m["forward"], run, "Avg")
    return table


def chain(args: argparse.Namespace) -> Table:
    """Per seed: a first stage, SPN's bank stage over it, the re-ranker over the SPN model; each evaluated."""
    table = Table()
    data = f"data.root={args.data}"
    for seed in args.seeds:
        for name in args.variants or CHAIN_FIRST:
            config, sets, metric, spn_sets = CHAIN_FIRST[name]
            run1 = args.out / f"{tag(name)}-s{seed}"
            first = run_train(config, run1, [data, f"model.backbone={args.backbone}", f"seed={seed}", *sets,
                                             *args.stage1_set])
            table.add(name, _forward(eval_model(first, args.out / f"eval-{tag(name)}-s{seed}", args.data)), run1, metric)
            run2 = args.out / f"spn-{tag(name)}-s{seed}"
            spn_model = run_train(SPN / "shapes_bank.yaml", run2, [data, f"model.backbone={first}", f"seed={seed}",
                                                                  *spn_sets, *args.stage2_set])
            m = eval_model(spn_model, args.out / f"eval-spn-{tag(name)}-s{seed}", args.data)
            table.add(f"{name} -> SPN bank stage", _forward(m), run2, "Avg")
            run3 = args.out / f"rerank-{tag(name)}-s{seed}"
            reranker = run_train(RR / "shapes_reranker.yaml", run3, [data, f"model.backbone={spn_model}", f"seed={seed}"])
            m = eval_model(reranker, args.out / f"eval-rerank-{tag(name)}-s{seed}", args.data,
                           "--rerank-k", str(args.ks[0]))
            table.add(f"{name} -> SPN -> re-ranker, rerank@{args.ks[0]}", m[f"rerank@{args.ks[0]}"], run3, "R@1")
    return table


def _forward(m: dict[str, dict[str, float]]) -> dict[str, float]:
    """A first stage's forward row: ``forward`` for bi-directional models, else its only row."""
    return m["forward"] if "forward" in m else next(iter(m.values()))


def report(path: Path, plot: Path | None, columns: list[str]) -> str:
    """The markdown table of a docs/ablations file (and its plot: R@1 per row, validation curves)."""
    data = read_json(path, "ablation")
    cols = [c for c in columns if any(c in r for r in data["rows"])]
    lines = [f"Shapes test, seeds {data['seeds']}, mean ± std. `{data['command']}`", "",
             "| row | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for r in data["rows"]:
        lines.append(f"| {r['name']} | " + " | ".join(
            f"{r[c]['mean']:.2f} ± {r[c]['std']:.2f}" if c in r else "-" for c in cols) + " |")
    if plot is not None:
        _plot(data, plot)
    return "\n".join(lines)


def _plot(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = data["rows"]
    fig, (bar, lines) = plt.subplots(1, 2, figsize=(11, 0.32 * len(rows) + 2))
    names = [r["name"] for r in rows][::-1]
    means = [r["R@1"]["mean"] for r in rows][::-1]
    stds = [r["R@1"]["std"] for r in rows][::-1]
    bar.barh(names, means, xerr=stds, capsize=3, color="tab:blue")
    bar.set_xlabel("R@1 on shapes test (%), mean ± std over seeds")
    bar.tick_params(axis="y", labelsize=7)
    curves = [r for r in rows if r.get("val_curve")]
    if len(curves) > 10:  # past the default cycle's 10 colours, two curves would share one
        lines.set_prop_cycle(color=plt.cm.tab20.colors[:len(curves)])
    for r in curves:
        steps, vals = zip(*r["val_curve"])
        lines.plot(steps, vals, marker=".", label=r["name"])
    lines.set_xlabel("training step")
    lines.set_ylabel("validation (selection metric), mean over seeds")
    lines.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def cli() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("method", choices=["bidirectional", "rerank", "rtd", "spn", "chain", "report"])
    p.add_argument("path", nargs="?", type=Path, help="report: the docs/ablations JSON file")
    p.add_argument("--plot", type=Path, help="report: draw the plot here")
    p.add_argument("--data", type=Path, help="shapes root")
    p.add_argument("--backbone", type=Path, help="the pretrained small BLIP folder (rtd: the small CLIP)")
    p.add_argument("--out", type=Path, help="run folders (default: runs/ablation-<method>)")
    p.add_argument("--json", type=Path, help="summary file (default: <out>/summary.json)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--variants", nargs="*", help="only these rows (default: every variant of the method; "
                   "rerank: none given trains the filters only)")
    p.add_argument("--filters", nargs="+", default=["filter"], choices=list(FILTERS),
                   help="rerank: the first stages, each with the re-rankers of --variants over it")
    p.add_argument("--ks", type=int, nargs="+", default=[10, 20, 50])
    p.add_argument("--eval-queries", type=int, help="re-ranking: the first N test queries only (default: all)")
    p.add_argument("--stage1-set", nargs="*", default=[], help="extra overrides of every stage-I training")
    p.add_argument("--stage2-set", nargs="*", default=[], help="extra overrides of every stage-II training")
    p.add_argument("--spn-fraction", type=float, default=0.1, help="spn: the share of training triplets")
    p.add_argument("--per-reference", type=int, default=1, help="spn: generated targets per reference (SPN: 1)")
    p.add_argument("--columns", nargs="+", default=["R@1", "R@5", "R@10", "R@50", "Avg", "back R@1",
                                                     "back image-only R@1"], help="the table's metrics")
    args = p.parse_args()
    columns = args.columns
    if args.method == "report":
        print(report(args.path, args.plot, columns))
        return
    if args.data is None or args.backbone is None:
        p.error("--data and --backbone are required")
    if args.variants == [] and args.method != "rerank":
        p.error(f"--variants without names trains nothing for {args.method}: name variants or leave it out")
    known = {"bidirectional": BI_STAGE1 | BI_STAGE2, "rerank": RERANKERS, "rtd": BASES | RTD,
             "spn": SPN_VARIANTS, "chain": CHAIN_FIRST}[args.method]
    unknown = [v for v in args.variants or [] if v not in known]
    if unknown:
        p.error(f"unknown variants {unknown}; known: {list(known)}")
    args.out = args.out or Path(f"runs/ablation-{args.method}")
    table = {"bidirectional": bidirectional, "rerank": rerank, "rtd": rtd, "spn": spn, "chain": chain}[args.method](args)
    path = args.json or args.out / "summary.json"
    atomic_write_json(path, table.summary(args), indent=1)
    print(report(path, None, columns))


if __name__ == "__main__":
    cli()
