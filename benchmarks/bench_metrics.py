"""Time CIRR-val-sized scoring: 4181 queries x 2297 gallery images, 6-member sets, reference excluded.

    python benchmarks/bench_metrics.py [--repeats 5] [--threads N]

Goal: scoring a similarity matrix well under a second on a laptop CPU, so that validation
inside a training loop costs nothing next to encoding the images.
"""

from __future__ import annotations

import argparse
import time

import torch

from cirlab.data.base import CIRSplit, Query
from cirlab.evaluation.metrics import rank_gallery, rank_subset
from cirlab.evaluation.protocols import chance_levels, evaluate_rankings, evaluate_similarity, index_split
from cirlab.evaluation.submission import rankings_from_similarity


def cirr_like_split(n_queries: int = 4181, n_gallery: int = 2297, seed: int = 0) -> CIRSplit:
    g = torch.Generator().manual_seed(seed)
    gallery = [f"dev-{i // 4}-{i % 4}-img{i % 2}" for i in range(n_gallery)]
    queries = []
    for i in range(n_queries):
        members = [gallery[j] for j in torch.randperm(n_gallery, generator=g)[:6].tolist()]
        queries.append(Query(str(i), members[0], ("caption",), members[1], (members[1],), tuple(members)))
    return CIRSplit("cirr", "val", queries, gallery, lambda _: [], exclude_reference=True)


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    split = cirr_like_split()
    sim = torch.rand(len(split.queries), len(split.gallery), generator=torch.Generator().manual_seed(1))
    index = index_split(split)
    ranked, subset = rankings_from_similarity(split, sim)
    rows = [
        ("index_split (ids -> gallery indices)", lambda: index_split(split)),
        ("rank_gallery top-50, reference excluded", lambda: rank_gallery(sim, 50, index.exclude)),
        ("rank_subset (6 members)", lambda: rank_subset(sim, index.members, index.exclude)),
        ("evaluate_similarity (all 8 metrics)", lambda: evaluate_similarity(split, sim)),
        ("rankings_from_similarity (ids for a submission)", lambda: rankings_from_similarity(split, sim)),
        ("evaluate_rankings (from id lists, validated)", lambda: evaluate_rankings(split, ranked, subset)),
        ("chance_levels", lambda: chance_levels(split)),
    ]
    print(f"CIRR val size: {len(split.queries)} queries x {len(split.gallery)} gallery, "
          f"torch {torch.__version__}, {args.threads} threads, best of {args.repeats}")
    print(f"{'step':<50}{'ms':>9}")
    for name, fn in rows:
        print(f"{name:<50}{best_of(fn, args.repeats) * 1000:>9.1f}")


if __name__ == "__main__":
    main()
