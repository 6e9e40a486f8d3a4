"""``cirlab demo``: the main pipeline on the embedded default (the shapes benchmark).

1. generate shapes (2000 training scenes, half the default scale, so that the whole demo fits 20
   minutes on a 2-core CPU in fp32; val and test at default scale), print its statistics, draw
   sample triplets;
2. pretrain the small BLIP (a random 128-wide text encoder) on the scene captions (resumed if a
   previous demo was cut short; ``--quick``: until val t2i R@1 reaches 30, within 6 epochs);
3. evaluate the zero-shot composed baselines on shapes test;
4. projection-based zero-shot CIR: a Pic2Word-style Phi on the small BLIP's unimodal encoders, then
   RTD (its text encoder tuned with the generator's text triplets);
5. Bi-BLIP4CIR: stage I (text encoder) and stage II (Combiner), bi-directional;
6. the chain over stage I: SPN's bank stage, then the dual-encoder re-ranker of the SPN model's
   top K (the re-ranking paper's own filter is left to docs/results.md, which measures both chains);
7. print the README's table on shapes test: one line per method with its difference to the line it
   builds on, tested on the same queries (``cirlab compare``), a loud warning for a trained line at
   chance or a pretraining below its target, the training precision and each stage's wall time;
   draw six test queries across the methods into ``examples.png``.
Every training step reuses what an earlier demo in the same folder already finished; the
evaluations run again (a minute or two), so a second demo re-prints the table.

``--quick`` runs the same pipeline on a small shapes set with a smaller BLIP and short budgets
(a few minutes on 2 cores): a first look that every step works, not a result.
"""

from __future__ import annotations

import argparse
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from cirlab.config import CONFIG_ROOT
from cirlab.evaluation.compare import as_json, format_interval, format_p
from cirlab.utils.io import atomic_write_json, read_json
from cirlab.utils.report import format_markdown


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run the main pipeline on the built-in shapes benchmark")
    p.add_argument("--out", type=Path, help="output folder (default: runs/demo, with --quick runs/demo-quick)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the generated shapes and of every training stage (default 0)")
    p.add_argument("--quick", action="store_true", help="the same pipeline, small and short: a first look")
    p.add_argument("--train-scenes", type=int, default=2000,
                   help="training scenes of the generated shapes set (default 2000, half the generator's "
                        "default scale; --quick: 400)")
    p.set_defaults(func=demo)


# Both demos pretrain a BLIP whose text encoder is a random 128-wide, 2-layer one instead of
# MiniLM's first two 384-wide layers (configs/pretrain/shapes_blip.yaml): an fp32 pretraining step
# costs 0.80 s instead of 2.35 (benchmarks/bench_blip_sizes.py), and the later stages that run the
# text encoder are cheaper too (docs/results.md, session 18). At two epochs and twice the lr it reaches val t2i R@1 32.9, against
# 19.0 for MiniLM's one epoch.
TEXT = "text_hidden: 128, text_heads: 4, text_layers: 2"
# Its caption embeddings are small (norm 6.6 in 256 dimensions), so RTD's official noise (s = 0.5:
# expected norm 0.25 * sqrt(256) = 4) drowns the reference; val R@1 fell from 4.5 at any lr. At
# s = 0.1 it rises (4.50 -> 5.90 in 40 steps, docs/results.md, session 18).
RTD_NOISE = "method.noise=0.1"

# --quick: a small shapes set, a smaller BLIP, short budgets (per step: extra `--set`s). Pretraining
# stops at the first epoch whose val t2i R@1 reaches PRETRAIN_TARGET, within 6 epochs (about 25 s
# each in fp32): two fixed epochs left seeds 1 to 3 at 28.5, 27.9 and 16.6 and the later stages near
# chance (a random text encoder takes off late on some seeds: seed 3 under the 6-epoch schedule reads
# 6.7, 8.3, 24.9, 40.9); seeds 0 to 4 now stop after 2 to 4 epochs at 30.6 to 40.9 (docs/results.md).
# Phi trains 3 epochs of 18 steps with a 10-step warmup (one epoch under the config's 50-step warmup
# left its R@1 at chance on seed 0). RTD keeps Phi (step 0) unless one of its 20 steps beats it on
# val R@1, as RTD selects: 10 forced steps at lr 1e-4 took R@1 to chance on 4 of 5 seeds. The
# Combiner is 128 wide (its B x B reversed pairs cost most of stage II). The re-ranker steps on
# batches of 4 and re-ranks the top 10, as the full demo's.
PRETRAIN_TARGET = 30.0
QUICK = {
    "synth": ["--train-scenes", "400", "--val-scenes", "40", "--test-scenes", "60"],
    "pretrain": ["model.init_text=random",
                 f"model.small={{embed_dim: 64, {TEXT}, vision_hidden: 64, stage_channels: [16, 32, 64, 64]}}",
                 "trainer.epochs=6", f"trainer.stop_at={PRETRAIN_TARGET}", "trainer.optimizer.lr=1.0e-3",
                 "trainer.batch_size=64", "method.eval_images=200"],
    "pic2word": ["trainer.epochs=3", "trainer.schedule.warmup_steps=10"],
    "rtd": ["trainer.optimizer.lr=1.0e-4", RTD_NOISE, "trainer.max_steps=20", "trainer.eval_every_steps=10"],
    "bi-text": ["trainer.epochs=2"],
    "bi-combiner": ["method.projection_dim=128", "method.hidden_dim=128"],
    "spn-bank": ["trainer.max_steps=10", "trainer.eval_every_steps=10"],
    "rerank-reranker": ["method.k=10", "trainer.max_steps=10", "trainer.batch_size=4", "method.eval_queries=40"],
}

# the full demo: half the training scenes. RTD runs 60 steps at lr 1e-4 instead of the official 1e-5
# (its val R@1 peaks at step 40). Stage I trains 3 epochs (val R@1 14.4, 16.0, 16.0), the Combiner
# is 256 wide (46 s of training against 89 s at 512). SPN's bank stage runs 80 of the config's 300
# steps. The re-ranker re-scores the top 10, not 20 (level on shapes test over 3 seeds,
# docs/results.md, and half the pairs), validated on 250 val queries, and stops after 120 steps; it
# is tested on the first 500 test queries. 7:09 in fp32 on the AVX512 EPYC (12:14 with MiniLM's
# layers); 12:28 with install on a 2-core AVX2-only EPYC (README).
DEMO = {"pretrain": ["model.init_text=random",
                     f"model.small={{embed_dim: 256, {TEXT}, vision_hidden: 256, stage_channels: [16, 32, 64, 128]}}",
                     "trainer.epochs=2", "trainer.optimizer.lr=1.0e-3"],
        "pic2word": ["trainer.epochs=2"],
        "rtd": ["trainer.optimizer.lr=1.0e-4", RTD_NOISE, "trainer.max_steps=60", "trainer.eval_every_steps=20"],
        "bi-text": ["trainer.epochs=3"],
        "bi-combiner": ["method.projection_dim=256", "method.hidden_dim=256"],
        "spn-bank": ["trainer.max_steps=80", "trainer.eval_every_steps=40"],
        "rerank-reranker": ["method.k=10", "method.eval_queries=250", "trainer.max_steps=120"]}


@dataclass(frozen=True)
class Line:
    """One line of the demo's table: the evaluation folder (under <out>/eval) and row it reads, and
    the line it builds on (by short name), against which its difference is tested on the queries
    both ranked."""

    label: str
    short: str
    run: str
    row: str | None = None  # None: the folder's only row with predictions
    base: str | None = None
    trained: bool = True


LINES = (Line("image only (zero-shot)", "image only", "zeroshot", "image", trained=False),
         Line("Pic2Word-style (zero-shot)", "Pic2Word", "pic2word", base="image only"),
         Line("Pic2Word + RTD", "RTD", "rtd", base="Pic2Word"),
         Line("Bi-BLIP4CIR stage I", "stage I", "bi-text", base="image only"),
         Line("stage I + Combiner (stage II)", "Combiner", "bi-combiner", base="stage I"),
         Line("stage I + SPN", "SPN", "spn-bank", base="stage I"),
         Line("SPN + re-ranker (top 10)", "re-ranker", "rerank-reranker", "rerank@10", base="SPN"))
COLUMNS = ("R@1", "R@5", "Rs@1", "Avg")
CHANCE_P = 0.01  # a trained line that a random ranking matches this likely is at chance


def _step(title: str) -> None:
    print(f"\n[demo] {title}", flush=True)


class Stages:
    """The wall time of each stage of this run, in order; a reused stage is named so."""

    def __init__(self) -> None:
        self.times: dict[str, float] = {}
        self._start = time.perf_counter()

    def add(self, name: str, since: float) -> None:
        """Record stage ``name`` as having run from ``since`` (a ``perf_counter`` value) until now."""
        self.times[name] = time.perf_counter() - since

    def total(self) -> float:
        """Seconds since the demo started."""
        return time.perf_counter() - self._start

    def format(self) -> str:
        """One aligned line per stage and the total."""
        width = max(len(n) for n in [*self.times, "total"])
        lines = [f"  {name:<{width}}  {seconds:7.1f} s" for name, seconds in self.times.items()]
        return "\n".join([*lines, f"  {'total':<{width}}  {self.total():7.1f} s"])


class Pipeline:
    """The demo's steps over one output folder: each trains (or reuses) a stage, or evaluates one."""

    def __init__(self, args: argparse.Namespace) -> None:
        from cirlab.cli import main

        self.cirlab, self.out, self.seed, self.quick = main, args.out, args.seed, args.quick
        self.overrides = QUICK if args.quick else DEMO
        self.train_scenes = args.train_scenes
        self.data, self.blip = args.out / "shapes", args.out / "pretrain-blip"
        self.stages = Stages()

    def shapes(self) -> bool:
        """Generate the benchmark (or reuse it) and draw sample training triplets."""
        since = time.perf_counter()
        if (self.data / "meta.json").is_file():
            from cirlab.data.shapes import format_stats, read_stats

            _step(f"shapes benchmark already at {self.data}; reusing it")
            print(format_stats(read_stats(self.data)))
            name = "shapes benchmark (reused)"
        else:
            _step(f"generating the shapes benchmark into {self.data}")
            synth = self.overrides.get("synth", ["--train-scenes", str(self.train_scenes)])
            if self.cirlab(["data", "synth", "--out", str(self.data), "--seed", str(self.seed), *synth]):
                return False
            name = "shapes benchmark"
        ok = not self.cirlab(["data", "show", "--root", str(self.data), "--split", "train",
                              "--out", str(self.out / "triplets.png"), "--n", "8"])
        self.stages.add(name, since)
        return ok

    def pretrain(self) -> bool:
        """Pretrain the small BLIP on scene captions, resuming a run cut short, or reuse it."""
        since = time.perf_counter()
        if (self.blip / "backbone" / "config.json").is_file():
            _step(f"small BLIP already pretrained at {self.blip}; reusing it")
            self.stages.add("pretraining (reused)", since)
            return True
        resume = (self.blip / "config.yaml").is_file()  # an earlier demo stopped part-way: continue it
        _step(("resuming" if resume else "pretraining") + f" the small BLIP on scene captions into {self.blip}")
        cmd = ["pretrain", "--run-dir", str(self.blip)] + (["--resume"] if resume else [
            "--config", str(CONFIG_ROOT / "pretrain" / "shapes_blip.yaml"), "--set", f"data.root={self.data}",
            "--set", f"seed={self.seed}", *_sets(self.overrides.get("pretrain", []))])
        ok = not self.cirlab(cmd)
        self.stages.add("pretraining", since)
        return ok

    def train(self, title: str, config: Path, name: str, *sets: str) -> Path | None:
        """Train one stage into <out>/<name> (or reuse a finished one); its model folder, None on failure."""
        since = time.perf_counter()
        run = self.out / name
        if (run / "model" / "composer.json").is_file():
            _step(f"{title}: already trained at {run}; reusing it")
            self.stages.add(f"train {name} (reused)", since)
            return run / "model"
        _step(title)
        cmd = ["train", "--config", str(config), "--run-dir", str(run), "--set", f"data.root={self.data}",
               "--set", f"seed={self.seed}", *_sets([*sets, *self.overrides.get(name, [])])]
        if run.exists():  # an earlier demo stopped part-way: train it again from the start
            shutil.rmtree(run)
        failed = self.cirlab(cmd)
        self.stages.add(f"train {name}", since)
        return None if failed else run / "model"

    def evaluate(self, title: str, name: str, *what: str) -> bool:
        """`cirlab eval` on shapes test of a model folder (--model) or a zero-shot config (--config)."""
        since = time.perf_counter()
        _step(title)
        run = self.out / "eval" / name
        if run.exists():
            shutil.rmtree(run)
        extra = ["--dataset", "shapes", "--root", str(self.data)] if what[0] == "--model" else ["--set", f"data.root={self.data}"]
        ok = not self.cirlab(["eval", *what, "--split", "test", "--run-dir", str(run), *extra])
        self.stages.add(f"eval {name}", since)
        return ok


def _sets(values: list[str]) -> list[str]:
    """``KEY=VALUE`` overrides as ``--set`` arguments."""
    return [x for v in values for x in ("--set", v)]


def demo(args: argparse.Namespace) -> int:
    args.out = args.out or Path("runs/demo-quick" if args.quick else "runs/demo")
    p = Pipeline(args)
    _step(_precision_line())
    if not (p.shapes() and p.pretrain()):
        return 1
    backbone = p.blip / "backbone"
    if not p.evaluate("zero-shot composed baselines on shapes test (no CIR training)", "zeroshot", "--config",
                      str(CONFIG_ROOT / "zeroshot" / "shapes_zeroshot_blip.yaml"), "--set", f"model.backbone={backbone}"):
        return 1

    proj = CONFIG_ROOT / "projection"
    phi = p.train("zero-shot: a Pic2Word-style Phi on the small BLIP's image and text encoders (images only)",
                  proj / "shapes_pic2word.yaml", "pic2word", "model.kind=blip", f"model.backbone={backbone}")
    if phi is None or not p.evaluate("Pic2Word-style Phi on shapes test", "pic2word", "--model", str(phi)):
        return 1
    rtd = p.train("RTD: tune its text encoder with the generator's text triplets (Phi and the gallery frozen)",
                  CONFIG_ROOT / "rtd" / "shapes_rtd.yaml", "rtd", "model.kind=blip", f"model.backbone={phi}")
    if rtd is None or not p.evaluate("Pic2Word + RTD on shapes test", "rtd", "--model", str(rtd)):
        return 1

    bi = CONFIG_ROOT / "bidirectional"
    stage1 = p.train("Bi-BLIP4CIR stage I: fine-tune the text encoder on forward + reversed queries",
                     bi / "shapes_text.yaml", "bi-text", f"model.backbone={backbone}")
    if stage1 is None or not p.evaluate("Bi-BLIP4CIR stage I on shapes test", "bi-text", "--model", str(stage1)):
        return 1
    combiner = p.train("Bi-BLIP4CIR stage II: the Combiner over the frozen stage-I model",
                       bi / "shapes_combiner.yaml", "bi-combiner", f"model.backbone={stage1}")
    if combiner is None or not p.evaluate("Bi-BLIP4CIR stage II on shapes test", "bi-combiner", "--model", str(combiner)):
        return 1

    spn = p.train("SPN stage 2: stage I against a static bank of every training image", CONFIG_ROOT / "spn" /
                  "shapes_bank.yaml", "spn-bank", f"model.backbone={stage1}")
    if spn is None or not p.evaluate("stage I + SPN bank stage on shapes test", "spn-bank", "--model", str(spn)):
        return 1
    reranker = p.train("candidate re-ranking: the dual-encoder re-ranker of the SPN model's top 10",
                       CONFIG_ROOT / "rerank" / "shapes_reranker.yaml", "rerank-reranker", f"model.backbone={spn}")
    queries = 40 if args.quick else 500  # the re-ranker's test queries: it scores K pairs per query
    if reranker is None or not p.evaluate(f"the re-ranker on shapes test (first {queries} queries: it scores 10 pairs per query)",
                                          "rerank-reranker", "--model", str(reranker), "--max-queries", str(queries)):
        return 1
    return report(p)


def _precision_line() -> str:
    """What precision the training stages will choose here, and why (trainer.precision: auto)."""
    from cirlab.training.distributed import default_device
    from cirlab.training.engine import select_precision

    device = default_device()
    return (f"training on {device.type} in {select_precision('auto', device)} (trainer.precision auto: bf16 where "
            "the hardware runs it natively, else fp32; CIRLAB_PRECISION=fp32|bf16 overrides)")


def report(p: Pipeline) -> int:
    """Print the table, warnings, precision and stage times; write examples.png and demo_metrics.json."""
    from cirlab.evaluation.examples import write_examples

    since = time.perf_counter()
    table, data, warnings = results_table(p.out / "eval")
    picture = write_examples([(line.label, p.out / "eval" / line.run, line.row) for line in LINES], p.out / "examples.png")
    p.stages.add("table, tests and examples.png", since)
    _step("shapes test: R@K = the target's scene in the top K of the gallery; Rs@1 = first among the reference's "
          "five edits (chance 20); Avg = (R@5 + Rs@1) / 2")
    print(table)
    chance = data["chance (a random ranking)"]
    print("chance (a random ranking): " + ", ".join(f"{c} {chance[c]:.2f}" for c in COLUMNS))
    print(f"Δ: the difference to the line it builds on (vs) on the queries both ranked (the re-ranker: the first "
          f"{data[LINES[-1].label]['queries']}), with the 95% interval of 10,000 paired bootstrap resamples of the "
          "queries; p: McNemar's exact test on the R@1 hits (cirlab compare)")
    pretrain = pretraining_quality(p.blip)
    _step(f"pretrained small BLIP: val t2i R@1 {_maybe(pretrain)} (the demo needs {PRETRAIN_TARGET:.0f} or more)")
    precisions = _stage_precisions(p.out)
    _step("training precision (each stage's env.json): " + (f"{precisions['pretrain-blip']} in every stage"
          if len(set(precisions.values())) == 1 else ", ".join(f"{k} {v}" for k, v in precisions.items())))
    _step("wall time per stage (this run; a reused stage costs nothing)")
    print(p.stages.format())
    warnings = _pretraining_warning(pretrain) + warnings
    atomic_write_json(p.out / "demo_metrics.json", {"lines": data, "pretraining_val_t2i_R@1": pretrain,
                                                    "precision": precisions, "stages_s": p.stages.times}, indent=1)
    _step(f"done in {p.stages.total():.0f} s; table: {p.out / 'demo_metrics.json'}; what each method retrieves: "
          f"{picture}; sample triplets: {p.out / 'triplets.png'}")
    for warning in warnings:
        print(f"\n{warning}", flush=True)
    return 0


def results_table(eval_dir: Path) -> tuple[str, dict[str, dict], list[str]]:
    """The README's table (Markdown) of every line with its paired test against the line it builds
    on, the same as data, and a warning for each trained line at chance."""
    from cirlab.evaluation.compare import load_row
    from cirlab.evaluation.protocols import chance_levels

    scores = {line.short: load_row(eval_dir / line.run, line.row) for line in LINES}
    first = scores[LINES[0].short].splits[0]
    total, chance = len(first.queries), chance_levels(first)
    rows = []
    data: dict[str, dict] = {"chance (a random ranking)": {c: chance[c] for c in COLUMNS}}
    warnings: list[str] = []
    for line in LINES:
        cells, data[line.label] = _line(line, scores, total)
        rows.append(cells)
        if line.trained:
            warnings += _at_chance(line.label, scores[line.short].values[0], chance)
    header = ["line", "queries", *COLUMNS, "vs", "ΔR@1 [95% CI]", "p (R@1)", "ΔAvg [95% CI]"]
    return format_markdown(header, rows), data, warnings


def _line(line: Line, scores: dict, total: int) -> tuple[list[str], dict]:
    """One line's cells (its metrics; against its base: ΔR@1 and ΔAvg with their intervals and
    McNemar's p on R@1) and the same as data."""
    from cirlab.evaluation.compare import compare_scores

    row = scores[line.short]
    n = len(row.splits[0].queries)
    values = {c: row.values[0][c].mean().item() * 100 for c in COLUMNS}
    cells = [line.label, f"{n:,}" if n == total else f"first {n:,}", *(f"{values[c]:.2f}" for c in COLUMNS)]
    if line.base is None:
        return cells + ["", "", "", ""], {"queries": n, **values}
    diff = compare_scores(scores[line.base], row)
    r1, avg = diff.metrics["R@1"], diff.metrics["Avg"]
    cells += [line.base, f"{r1.diff:+.2f} {format_interval(r1)}", format_p(r1.p), f"{avg.diff:+.2f} {format_interval(avg)}"]
    tested = as_json(diff)["metrics"]
    return cells, {"queries": n, **values, "vs": line.base, "vs_queries": diff.queries, "R@1 diff": tested["R@1"],
                   "Avg diff": tested["Avg"]}


def _at_chance(label: str, values: dict, chance: dict[str, float]) -> list[str]:
    """A loud warning when the line's Avg (the selection metric: R@5 and Rs@1) is not above a random
    ranking's; a note when its R@1 alone is not (it then orders the reference's edits, not the gallery)."""
    from cirlab.evaluation.compare import above_chance_p, mean_above_p

    avg, p_avg = values["Avg"].mean().item() * 100, mean_above_p(values["Avg"], chance["Avg"])
    if p_avg > CHANCE_P:
        return [f"!!! WARNING: {label} ended at chance: Avg {avg:.2f} against {chance['Avg']:.2f} for a random ranking "
                f"(bootstrap p = {p_avg:.2f}): this stage learnt nothing the table can show"]
    hits, n = int(values["R@1"].sum()), len(values["R@1"])
    p_r1 = above_chance_p(hits, n, chance["R@1"])
    if p_r1 > CHANCE_P:
        return [f"note: {label}: R@1 {100 * hits / n:.2f} is at chance ({chance['R@1']:.2f}, p = {p_r1:.2f}); its Avg "
                f"{avg:.2f} is above ({chance['Avg']:.2f}): it tells the reference's edits apart, not the gallery"]
    return []


def pretraining_quality(blip: Path) -> float | None:
    """The pretrained BLIP's best val t2i R@1 (its metrics.jsonl), None before any validation."""
    from cirlab.training.run import RunDir

    scores = [e["t2i_R@1"] for e in RunDir.open(blip).read_metrics() if e.get("event") == "eval" and "t2i_R@1" in e]
    return max(scores, default=None)


def _maybe(value: float | None) -> str:
    return "unknown" if value is None else f"{value:.1f}"


def _pretraining_warning(r1: float | None) -> list[str]:
    """A warning when the pretrained BLIP is below the demo's target (or never validated)."""
    if r1 is not None and r1 >= PRETRAIN_TARGET:
        return []
    return [f"!!! WARNING: the pretrained BLIP reached val t2i R@1 {_maybe(r1)}, below {PRETRAIN_TARGET:.0f}: every "
            "later stage starts from a backbone that barely tells scenes apart"]


def _stage_precisions(out: Path) -> dict[str, str]:
    """Each trained stage's precision as its env.json records it."""
    names = ["pretrain-blip", *(line.run for line in LINES if line.trained)]
    return {n: read_json(out / n / "env.json", "run environment").get("precision", "?") for n in names
            if (out / n / "env.json").is_file()}
