"""``cirlab demo``: the main pipeline on the embedded default (the shapes benchmark).

1. generate shapes at default scale, print its statistics, draw sample triplets;
2. pretrain the small BLIP on the scene captions (resumed if a previous demo was cut short);
3. evaluate the zero-shot composed baselines on shapes test.
Every step reuses what an earlier demo in the same folder already finished.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from cirlab.config import CONFIG_ROOT


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run the main pipeline on the built-in shapes benchmark")
    p.add_argument("--out", type=Path, default=Path("runs/demo"))
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=demo)


def _step(title: str) -> None:
    print(f"\n[demo] {title}", flush=True)


def demo(args: argparse.Namespace) -> int:
    from cirlab.cli import main as cirlab

    start = time.perf_counter()
    data, blip = args.out / "shapes", args.out / "pretrain-blip"
    if (data / "meta.json").is_file():
        from cirlab.data.shapes import format_stats, read_stats

        _step(f"shapes benchmark already at {data}; reusing it")
        print(format_stats(read_stats(data)))
    else:
        _step(f"generating the shapes benchmark into {data}")
        if cirlab(["data", "synth", "--out", str(data), "--seed", str(args.seed)]):
            return 1
    picture = args.out / "triplets.png"
    if cirlab(["data", "show", "--root", str(data), "--split", "train", "--out", str(picture), "--n", "8"]):
        return 1

    if (blip / "backbone" / "config.json").is_file():
        _step(f"small BLIP already pretrained at {blip}; reusing it")
    else:
        resume = (blip / "config.yaml").is_file()  # an earlier demo stopped part-way: continue it
        _step(("resuming" if resume else "pretraining") + f" the small BLIP on scene captions into {blip}")
        cmd = ["pretrain", "--config", str(CONFIG_ROOT / "pretrain" / "shapes_blip.yaml"), "--run-dir", str(blip),
               "--set", f"data.root={data}", "--set", f"seed={args.seed}"]
        if cirlab(cmd + (["--resume"] if resume else [])):
            return 1

    _step("zero-shot composed baselines on shapes test (no CIR training)")
    if cirlab(["eval", "--config", str(CONFIG_ROOT / "eval" / "shapes_zeroshot_blip.yaml"),
               "--set", f"data.root={data}", "--set", f"model.backbone={blip / 'backbone'}",
               "--set", f"trainer.output_dir={args.out}"]):
        return 1
    _step(f"done in {time.perf_counter() - start:.0f} s; sample triplets: {picture}")
    return 0
