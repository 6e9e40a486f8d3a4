"""Re-ranking cost per query against K, and the recall it buys (Candidate Re-ranking stage II).

Scores each query's stage-I top K with the dual-encoder re-ranker, many queries per call, and
prints ms per query (wall clock, batched, after one warm-up call) for each K, beside stage-I R@K
(the ceiling at that K) and the re-ranked R@1/R@5, for a re-ranking model folder (the filter and
the re-ranker together, as ``cirlab train`` of a re-ranker stage exports it).

    python benchmarks/bench_rerank_cost.py --data runs/demo/shapes --model runs/demo/rerank-reranker/model \
        --ks 10 20 50 100 --queries 100 --plot docs/rerank_cost.png
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

import cirlab
from cirlab.composers import RerankComposer
from cirlab.data.registry import load_split
from cirlab.composers.vectors import similarity, split_features
from cirlab.evaluation.evaluate import candidates_of, first_queries, rerank_scores, reranked_similarity
from cirlab.evaluation.protocols import evaluate_similarity, recall_at_depths


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True, help="shapes root")
    p.add_argument("--model", type=Path, required=True, help="a re-ranking model folder (<reranker run>/model)")
    p.add_argument("--split", default="test")
    p.add_argument("--ks", type=int, nargs="+", default=[10, 20, 50, 100])
    p.add_argument("--queries", type=int, default=100)
    p.add_argument("--chunk-size", type=int, default=512, help="(query, candidate) pairs per re-ranker call")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--plot", type=Path)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    composer = cirlab.load(args.model)
    if not isinstance(composer, RerankComposer):
        raise SystemExit(f"{args.model}: a {composer.kind} model; this benchmark needs a re-ranking model")
    composer.chunk_size = args.chunk_size
    split = first_queries(load_split("shapes", args.data, args.split), args.queries)
    feats = split_features(composer, split)  # the filter's tokens, through the feature cache
    sim = similarity(composer, split, feats)
    ceiling = recall_at_depths(split, sim, args.ks)
    stage1 = evaluate_similarity(split, sim)
    print(f"{len(split.queries)} queries of shapes {args.split}, gallery {len(split.gallery)}, chunk {args.chunk_size} "
          f"pairs, {args.threads} threads; stage I R@1 {stage1['R@1']:.2f}, R@5 {stage1['R@5']:.2f}")
    print("| K | ms / query | stage-I R@K (ceiling) | re-ranked R@1 | re-ranked R@5 |")
    print("|---|---|---|---|---|")
    results = []
    for k in args.ks:
        cand = candidates_of(split, sim, k).indices.long()
        warm = max(1, args.chunk_size // cand.shape[1])  # one call's worth of queries
        rerank_scores(composer, first_queries(split, warm), feats, cand[:warm], sim[:warm])
        start = time.perf_counter()
        scores = rerank_scores(composer, split, feats, cand, sim)
        ms = 1000 * (time.perf_counter() - start) / len(split.queries)
        m = evaluate_similarity(split, reranked_similarity(sim, cand, scores))
        results.append((k, ms, ceiling[f"R@{k}"], m["R@1"], m["R@5"]))
        print(f"| {k} | {ms:.1f} | {ceiling[f'R@{k}']:.2f} | {m['R@1']:.2f} | {m['R@5']:.2f} |", flush=True)
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        ks = [r[0] for r in results]
        fig, ax = plt.subplots(figsize=(5, 3.5))
        ax.plot(ks, [r[3] for r in results], "o-", label="re-ranked R@1")
        ax.plot(ks, [r[2] for r in results], "s--", label="stage-I R@K (ceiling)")
        ax.axhline(stage1["R@1"], color="grey", lw=0.8, label="stage-I R@1")
        ax.set_xlabel("K (candidates re-ranked per query)")
        ax.set_ylabel("recall on shapes test (%)")
        ax2 = ax.twinx()
        ax2.plot(ks, [r[1] for r in results], "^:", color="tab:red", label="ms / query")
        ax2.set_ylabel("ms per query (2 CPU cores)", color="tab:red")
        ax.legend(loc="center right", fontsize=8)
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)
        print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
