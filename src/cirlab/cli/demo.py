"""``cirlab demo``: the main pipeline on the embedded default (the shapes benchmark).

1. generate shapes (2000 training scenes, half the default scale, so that the whole demo fits 20
   minutes on a 2-core CPU in fp32; val and test at default scale), print its statistics, draw
   sample triplets;
2. pretrain the small BLIP (a random 128-wide text encoder) on the scene captions (resumed if a
   previous demo was cut short);
3. evaluate the zero-shot composed baselines on shapes test;
4. projection-based zero-shot CIR: a Pic2Word-style Phi on the small BLIP's unimodal encoders, then
   RTD (its text encoder tuned with the generator's text triplets);
5. Bi-BLIP4CIR: stage I (text encoder) and stage II (Combiner), bi-directional;
6. the chain over stage I: SPN's bank stage, then the dual-encoder re-ranker of the SPN model's
   top K (the re-ranking paper's own filter is left to docs/results.md, which measures both chains);
7. print every row on shapes test in one table.
Every step reuses what an earlier demo in the same folder already finished.

``--quick`` runs the same pipeline on a small shapes set with a smaller BLIP and short budgets
(a few minutes on 2 cores): a first look that every step works, not a result.
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

from cirlab.config import CONFIG_ROOT
from cirlab.utils.io import atomic_write_json, read_json
from cirlab.utils.report import format_table


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run the main pipeline on the built-in shapes benchmark")
    p.add_argument("--out", type=Path, help="output folder (default: runs/demo, with --quick runs/demo-quick)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="the same pipeline, small and short: a first look")
    p.add_argument("--train-scenes", type=int, default=2000,
                   help="training scenes of the generated shapes set (default scale: 4000)")
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

# --quick: a small shapes set, a smaller BLIP, short budgets (per step: extra `--set`s). Two
# pretraining epochs (val t2i R@1 35.8; 40.5 after three) take 36 s of its 72 in fp32. The Combiner
# is 128 wide (its B x B reversed pairs cost most of stage II). The re-ranker steps on batches of 4.
QUICK = {
    "synth": ["--train-scenes", "400", "--val-scenes", "40", "--test-scenes", "60"],
    "pretrain": ["model.init_text=random",
                 f"model.small={{embed_dim: 64, {TEXT}, vision_hidden: 64, stage_channels: [16, 32, 64, 64]}}",
                 "trainer.epochs=2", "trainer.optimizer.lr=1.0e-3", "trainer.batch_size=64", "method.eval_images=200"],
    "pic2word": ["trainer.epochs=1"],
    "rtd": ["trainer.optimizer.lr=1.0e-4", RTD_NOISE, "trainer.max_steps=10", "trainer.eval_every_steps=10",
            "trainer.eval_at_start=false"],  # 10 steps can tie step 0 on R@1, and step 0 would then win
    "bi-text": ["trainer.epochs=2"],
    "bi-combiner": ["method.projection_dim=128", "method.hidden_dim=128"],
    "spn-bank": ["trainer.max_steps=10", "trainer.eval_every_steps=10"],
    "rerank-reranker": ["trainer.max_steps=10", "trainer.batch_size=4", "method.eval_queries=40"],
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


def _step(title: str) -> None:
    print(f"\n[demo] {title}", flush=True)


def demo(args: argparse.Namespace) -> int:
    from cirlab.cli import main as cirlab

    start = time.perf_counter()
    args.out = args.out or Path("runs/demo-quick" if args.quick else "runs/demo")
    overrides = QUICK if args.quick else DEMO
    data, blip = args.out / "shapes", args.out / "pretrain-blip"
    if (data / "meta.json").is_file():
        from cirlab.data.shapes import format_stats, read_stats

        _step(f"shapes benchmark already at {data}; reusing it")
        print(format_stats(read_stats(data)))
    else:
        _step(f"generating the shapes benchmark into {data}")
        synth = overrides.get("synth", ["--train-scenes", str(args.train_scenes)])
        if cirlab(["data", "synth", "--out", str(data), "--seed", str(args.seed), *synth]):
            return 1
    picture = args.out / "triplets.png"
    if cirlab(["data", "show", "--root", str(data), "--split", "train", "--out", str(picture), "--n", "8"]):
        return 1

    if (blip / "backbone" / "config.json").is_file():
        _step(f"small BLIP already pretrained at {blip}; reusing it")
    else:
        resume = (blip / "config.yaml").is_file()  # an earlier demo stopped part-way: continue it
        _step(("resuming" if resume else "pretraining") + f" the small BLIP on scene captions into {blip}")
        cmd = ["pretrain", "--run-dir", str(blip)] + (["--resume"] if resume else [
            "--config", str(CONFIG_ROOT / "pretrain" / "shapes_blip.yaml"), "--set", f"data.root={data}",
            "--set", f"seed={args.seed}", *(x for v in overrides.get("pretrain", []) for x in ("--set", v))])
        if cirlab(cmd):
            return 1

    backbone = blip / "backbone"
    data_set = ["--set", f"data.root={data}", "--set", f"seed={args.seed}"]
    rows: dict[str, dict[str, float]] = {}

    def evaluate(title: str, name: str, *what: str) -> bool:
        """`cirlab eval` on shapes test of a model folder (--model) or a zero-shot config (--config)."""
        _step(title)
        run = args.out / "eval" / name
        if run.exists():
            shutil.rmtree(run)
        extra = ["--dataset", "shapes", "--root", str(data)] if what[0] == "--model" else ["--set", f"data.root={data}"]
        if cirlab(["eval", *what, "--split", "test", "--run-dir", str(run), *extra]):
            return False
        rows.update({f"{name}/{row}": m for row, m in read_json(run / "metrics.json", "metrics").items()})
        return True

    def train(title: str, config: Path, name: str, *sets: str) -> Path | None:
        run = args.out / name
        if (run / "model" / "composer.json").is_file():
            _step(f"{title}: already trained at {run}; reusing it")
            return run / "model"
        _step(title)
        sets = (*sets, *overrides.get(name, []))
        cmd = ["train", "--config", str(config), "--run-dir", str(run), *data_set, *(x for v in sets for x in ("--set", v))]
        if run.exists():  # an earlier demo stopped part-way: train it again from the start
            shutil.rmtree(run)
        return None if cirlab(cmd) else run / "model"

    if not evaluate("zero-shot composed baselines on shapes test (no CIR training)", "zeroshot",
                    "--config", str(CONFIG_ROOT / "zeroshot" / "shapes_zeroshot_blip.yaml"), "--set", f"model.backbone={backbone}"):
        return 1

    proj = CONFIG_ROOT / "projection"
    phi = train("zero-shot: a Pic2Word-style Phi on the small BLIP's image and text encoders (images only)",
                proj / "shapes_pic2word.yaml", "pic2word", "model.kind=blip", f"model.backbone={backbone}")
    if phi is None or not evaluate("Pic2Word-style Phi on shapes test", "pic2word", "--model", str(phi)):
        return 1
    rtd = train("RTD: tune its text encoder with the generator's text triplets (Phi and the gallery frozen)",
                CONFIG_ROOT / "rtd" / "shapes_rtd.yaml", "rtd", "model.kind=blip", f"model.backbone={phi}")
    if rtd is None or not evaluate("Pic2Word + RTD on shapes test", "rtd", "--model", str(rtd)):
        return 1

    bi = CONFIG_ROOT / "bidirectional"
    stage1 = train("Bi-BLIP4CIR stage I: fine-tune the text encoder on forward + reversed queries",
                   bi / "shapes_text.yaml", "bi-text", f"model.backbone={backbone}")
    if stage1 is None or not evaluate("Bi-BLIP4CIR stage I on shapes test", "bi-text", "--model", str(stage1)):
        return 1
    combiner = train("Bi-BLIP4CIR stage II: the Combiner over the frozen stage-I model",
                     bi / "shapes_combiner.yaml", "bi-combiner", f"model.backbone={stage1}")
    if combiner is None or not evaluate("Bi-BLIP4CIR stage II on shapes test", "bi-combiner", "--model", str(combiner)):
        return 1

    spn = train("SPN stage 2: stage I against a static bank of every training image", CONFIG_ROOT / "spn" /
                "shapes_bank.yaml", "spn-bank", f"model.backbone={stage1}")
    if spn is None or not evaluate("stage I + SPN bank stage on shapes test", "spn-bank", "--model", str(spn)):
        return 1
    reranker = train("candidate re-ranking: the dual-encoder re-ranker of the SPN model's top K",
                     CONFIG_ROOT / "rerank" / "shapes_reranker.yaml",
                     "rerank-reranker", f"model.backbone={spn}")
    queries = 40 if args.quick else 500  # the re-ranker's test queries: it scores K pairs per query
    if reranker is None or not evaluate(f"the re-ranker on shapes test (first {queries} queries: it scores K pairs per query)",
                                        "rerank-reranker", "--model", str(reranker), "--max-queries", str(queries)):
        return 1

    _step("every row on shapes test (rerank-reranker rows: the first queries only)")
    print(format_table(rows))
    atomic_write_json(args.out / "demo_metrics.json", rows, indent=1)
    _step(f"done in {time.perf_counter() - start:.0f} s; table: {args.out / 'demo_metrics.json'}; "
          f"sample triplets: {picture}")
    return 0
