"""Load test of ``cirlab serve`` on loopback: throughput, p50 / p99 latency and errors at 1, 4 and
16 concurrent clients, and how many queries the dynamic batcher put into one model call.

The server runs as its own process (``cirlab serve``), the clients are threads in this one, each
sending its next query as soon as the last is answered; every level is bounded in requests and
time. Queries are (gallery id, a shapes modification text)::

    python benchmarks/bench_serve_load.py --index runs/index/shapes-test [--requests 200]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import urllib.request
from pathlib import Path

from serve_load import load_test, served  # benchmarks/serve_load.py, beside this script

from cirlab.retrieval.index import load_index

TEXTS = ["make it red", "add a small blue circle at the top-left", "get rid of the object",
         "change the square to a triangle", "make the big one small"]


def batch_stats(base: str) -> tuple[float, float]:
    """(sum, count) of the server's batch-size histogram."""
    text = urllib.request.urlopen(f"{base}/metrics", timeout=5).read().decode()
    total = float(re.search(r"^cirlab_batch_size_sum (\S+)$", text, re.M).group(1))
    count = float(re.search(r"^cirlab_batch_size_count (\S+)$", text, re.M).group(1))
    return total, count


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--index", required=True, type=Path)
    p.add_argument("--levels", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--requests", type=int, default=200, help="per level")
    p.add_argument("--max-seconds", type=float, default=120, help="per level")
    p.add_argument("--set", dest="overrides", action="append", default=[], help="serve config override")
    p.add_argument("--json", type=Path)
    args = p.parse_args()

    ids = load_index(args.index).ids()
    forms = [{"id": ids[(7919 * n) % len(ids)], "text": TEXTS[n % len(TEXTS)], "k": 10} for n in range(997)]
    rows = []
    with served(args.index, args.overrides) as (base, _):
        load_test(base, forms[:8], concurrency=1, max_requests=8)  # warm-up
        for level in args.levels:
            before = batch_stats(base)
            result = load_test(base, forms, concurrency=level, max_requests=args.requests,
                               max_seconds=args.max_seconds)
            after = batch_stats(base)
            calls = after[1] - before[1]
            result["mean_batch"] = (after[0] - before[0]) / calls if calls else float("nan")
            rows.append(result)
    print(f"index {args.index} ({len(ids)} images), {os.cpu_count()} CPUs\n")
    print("| clients | requests | errors | seconds | queries/s | p50 ms | p99 ms | queries per model call |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['concurrency']} | {r['requests']} | {r['errors']} | {r['seconds']:.1f} | {r['throughput']:.1f} | "
              f"{r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['mean_batch']:.2f} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
