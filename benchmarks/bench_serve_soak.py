"""Soak of ``cirlab serve``: C closed-loop clients for several minutes, the server's resident memory
sampled after each window; memory must not grow once the first window (warm-up) is over.

    python benchmarks/bench_serve_soak.py --index <index folder> [--minutes 4 --clients 4]

Prints one row per window (requests, errors, p50 / p99, RSS) and the growth from the end of the
first window to the end of the last.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from bench_serve_load import TEXTS  # beside this script
from serve_load import load_test, served

from cirlab.retrieval.index import load_index


def rss_mib(pid: int) -> float:
    """Resident memory of ``pid`` and its children (uvicorn serves from the process it starts)."""
    total = 0
    for p in [pid, *_children(pid)]:
        for line in Path(f"/proc/{p}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1])
    return total / 1024


def _children(pid: int) -> list[int]:
    try:
        kids = [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except FileNotFoundError:
        return []
    return kids + [g for k in kids for g in _children(k)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--index", required=True, type=Path)
    p.add_argument("--minutes", type=float, default=4)
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--window-s", type=float, default=30)
    p.add_argument("--json", type=Path)
    args = p.parse_args()

    ids = load_index(args.index).ids()
    forms = [{"id": ids[(7919 * n) % len(ids)], "text": TEXTS[n % len(TEXTS)], "k": 10} for n in range(997)]
    rows = []
    with served(args.index) as (base, server):
        end = time.monotonic() + 60 * args.minutes
        while time.monotonic() < end:
            r = load_test(base, forms, concurrency=args.clients, max_requests=10**9, max_seconds=args.window_s)
            rows.append({**r, "rss_mib": rss_mib(server.pid)})
    print(f"index {args.index} ({len(ids)} images), {args.clients} clients, {os.cpu_count()} CPUs, "
          f"{time.strftime('%Y-%m-%d')}\n")
    print("| window | requests | errors | queries/s | p50 ms | p99 ms | RSS MiB |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for n, r in enumerate(rows):
        print(f"| {n + 1} | {r['requests']} | {r['errors']} | {r['throughput']:.1f} | {r['p50_ms']:.1f} | "
              f"{r['p99_ms']:.1f} | {r['rss_mib']:.0f} |")
    growth = rows[-1]["rss_mib"] - rows[0]["rss_mib"]
    print(f"\nRSS after warm-up (window 1) {rows[0]['rss_mib']:.0f} MiB, at the end {rows[-1]['rss_mib']:.0f} MiB: "
          f"{growth:+.0f} MiB ({100 * growth / rows[0]['rss_mib']:+.1f} %); errors {sum(r['errors'] for r in rows)}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
