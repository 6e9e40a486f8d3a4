"""Re-ranking cost per query against K, and the recall it buys (Candidate Re-ranking stage II).

Scores each query's stage-I top K with the dual-encoder re-ranker, many queries per call, and
prints ms per query (wall clock, batched, after one warm-up call) for each K, beside stage-I R@K
(the ceiling at that K) and the re-ranked R@1/R@5 when a trained re-ranker is given.

    python benchmarks/bench_rerank_cost.py --data runs/demo/shapes --filter runs/demo/rerank-filter/backbone \
        --reranker runs/demo/rerank-reranker/reranker --ks 10 20 50 100 --queries 100 --plot docs/rerank_cost.png
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from cirlab.config import CONFIG_ROOT, load_config
from cirlab.data.registry import load_split
from cirlab.evaluation.protocols import evaluate_similarity, recall_at_depths
from cirlab.methods import rerank
from cirlab.methods.common import image_table
from cirlab.models import load_backbone
from cirlab.models.dual_encoder import load_reranker


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--filter", type=Path, required=True, help="stage-I backbone folder")
    p.add_argument("--reranker", type=Path, required=True, help="stage-II reranker folder")
    p.add_argument("--ks", type=int, nargs="+", default=[10, 20, 50, 100])
    p.add_argument("--queries", type=int, default=100)
    p.add_argument("--chunk-size", type=int, default=512)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--plot", type=Path)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    cfg = load_config(CONFIG_ROOT / "rerank" / "shapes_reranker.yaml",
                      [f"data.root={args.data}", f"model.backbone={args.filter}"])
    rcfg = rerank.RerankConfig(**{**cfg.method, "eval_queries": args.queries, "chunk_size": args.chunk_size})
    backbone = load_backbone(args.filter).eval()
    reranker = load_reranker(args.reranker)[0].eval()
    split = rerank._first_queries(load_split("shapes", args.data, "test"), args.queries)
    table, rows = image_table(backbone, [split], cfg, tokens=True)
    tokens = table["tokens"]
    sim = rerank.filter_similarity(backbone, split, tokens, rows, rcfg)
    ceiling = recall_at_depths(split, sim, args.ks)
    stage1 = evaluate_similarity(split, sim)
    print(f"{len(split.queries)} queries of shapes test, gallery {len(split.gallery)}, chunk {args.chunk_size} pairs, "
          f"{args.threads} threads; stage I R@1 {stage1['R@1']:.2f}, R@5 {stage1['R@5']:.2f}")
    print("| K | ms / query | stage-I R@K (ceiling) | re-ranked R@1 | re-ranked R@5 |")
    print("|---|---|---|---|---|")
    results = []
    for k in args.ks:
        cand, _ = rerank._candidates(split, sim, k, rcfg)
        warm = max(1, args.chunk_size // k)  # one call's worth of queries
        rerank.rerank_scores(reranker, backbone, rerank._first_queries(split, warm), tokens, rows, cand[:warm], rcfg)
        start = time.perf_counter()
        scores = rerank.rerank_scores(reranker, backbone, split, tokens, rows, cand, rcfg)
        ms = 1000 * (time.perf_counter() - start) / len(split.queries)
        m = evaluate_similarity(split, rerank.reranked_similarity(sim, cand, scores))
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
