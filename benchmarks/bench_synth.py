"""Time `synthesize` for the shapes benchmark at its default scale.

    python benchmarks/bench_synth.py [--workers 2] [--repeat 1]

Prints one row per run: scenes, images, triplets and wall-clock seconds. Goal: the default
scale generates in under 60 s on 2 cores.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from cirlab.data.shapes import format_stats, synthesize


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[2, 1])
    parser.add_argument("--repeat", type=int, default=1)
    args = parser.parse_args()

    print(f"{'workers':>7}  {'scenes':>6}  {'images':>6}  {'triplets':>8}  {'seconds':>7}")
    for workers in args.workers:
        for _ in range(args.repeat):
            with tempfile.TemporaryDirectory() as tmp:
                start = time.perf_counter()
                stats = synthesize(Path(tmp) / "shapes", workers=workers)
                seconds = time.perf_counter() - start
            total = {k: sum(s[k] for s in stats["splits"].values())
                     for k in ("scenes", "images", "triplets")}
            print(f"{workers:>7}  {total['scenes']:>6}  {total['images']:>6}  "
                  f"{total['triplets']:>8}  {seconds:>7.1f}")
    print()
    print(format_stats(stats))


if __name__ == "__main__":
    main()
