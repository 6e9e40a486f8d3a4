"""``cirlab demo``: the main job on the embedded default (the shapes benchmark).

For now: generate shapes at default scale, print its statistics, draw sample triplets.
Later stages (pretraining, bi-directional training, re-ranking) extend this pipeline.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run the main pipeline on the built-in shapes benchmark")
    p.add_argument("--out", type=Path, default=Path("runs/demo"))
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=demo)


def demo(args: argparse.Namespace) -> int:
    from cirlab.cli import main as cirlab

    data = args.out / "shapes"
    start = time.perf_counter()
    if (data / "meta.json").is_file():
        from cirlab.data.shapes import format_stats, read_stats

        print(f"[demo] shapes benchmark already at {data}; reusing it")
        print(format_stats(read_stats(data)))
    else:
        print(f"[demo] generating the shapes benchmark into {data}")
        if cirlab(["data", "synth", "--out", str(data), "--seed", str(args.seed)]):
            return 1
    picture = args.out / "triplets.png"
    if cirlab(["data", "show", "--root", str(data), "--split", "train", "--out", str(picture), "--n", "8"]):
        return 1
    print(f"[demo] done in {time.perf_counter() - start:.0f} s; picture of sample triplets: {picture}")
    return 0
