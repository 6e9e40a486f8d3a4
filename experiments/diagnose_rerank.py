"""Why a re-ranker helps or hurts: its own skill on the pairs it trained on, against what it must do.

For a trained re-ranking model (``<reranker run>/model``) it prints, on training queries and on
test queries:

* in-batch pair accuracy: over B queries x their B targets, how often a query's own target scores
  highest (what the official in-batch loss trains);
* R@1 within the filter's top K: how often the re-ranker puts a positive first among the filter's
  K candidates (what re-ranking needs), only over queries whose top K holds a positive;
* the R@1 a random order of the same lists gives (positives in the top K / K, averaged);
* the filter's own R@1 on those lists.

    python experiments/diagnose_rerank.py --model runs/demo/rerank-reranker/model --data runs/demo/shapes \
        --queries 200 --k 20
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

import cirlab
from cirlab.data.registry import load_split
from cirlab.composers.vectors import query_texts, similarity, split_features
from cirlab.evaluation.evaluate import candidates_of, first_queries


def diagnose(composer, split, k: int, batch: int = 16) -> dict[str, float]:
    feats = split_features(composer, split)
    sim = similarity(composer, split, feats)
    top = candidates_of(split, sim, k)
    tokens = feats["tokens"]
    row = {i: feats.index_of(i) for i in split.gallery}
    gallery_rows = torch.tensor([row[i] for i in split.gallery])
    refs = lambda qs: tokens.index_select(0, torch.tensor([feats.index_of(q.reference) for q in qs])).float()  # noqa: E731
    hits, random_r1, filter_r1, rerank_r1, n = 0.0, 0.0, 0.0, 0.0, 0
    pair_correct, pair_total = 0, 0
    for s in range(0, len(split.queries), batch):
        qs = split.queries[s:s + batch]
        texts, _ = query_texts(composer, qs, True)
        cand = top.indices[s:s + batch].long()
        cand_tokens = tokens.index_select(0, gallery_rows[cand].reshape(-1)).float().view(*cand.shape, *tokens.shape[1:])
        scores = composer.rerank(refs(qs), texts, cand_tokens, top.scores[s:s + batch])
        for i, q in enumerate(qs):
            positive = torch.tensor([split.gallery[j] in set(q.positives or (q.target,)) for j in cand[i].tolist()])
            if not positive.any():
                continue
            n += 1
            random_r1 += positive.float().mean().item()
            filter_r1 += float(positive[0])
            rerank_r1 += float(positive[scores[i].argmax()])
        # in-batch pairs: each query against every query's target of this batch
        targets = tokens.index_select(0, torch.tensor([row[q.target] for q in qs])).float()
        z_t, ids, mask = composer.grounded_states(refs(qs).to(composer.device), texts)
        with torch.no_grad():
            pair = composer.reranker.pair_scores(z_t, ids, mask, targets.to(composer.device), chunk_size=composer.chunk_size)
        pair_correct += int((pair.argmax(1).cpu() == torch.arange(len(qs))).sum())
        pair_total += len(qs)
    pct = lambda x: 100 * x / max(n, 1)  # noqa: E731
    return {"in-batch pair acc": 100 * pair_correct / pair_total, f"rerank R@1 in top {k}": pct(rerank_r1),
            f"filter R@1 in top {k}": pct(filter_r1), f"random R@1 in top {k}": pct(random_r1),
            "queries with a positive in the top K": n}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, required=True, help="a re-ranking model folder")
    p.add_argument("--data", type=Path, required=True, help="shapes root")
    p.add_argument("--queries", type=int, default=200)
    p.add_argument("--k", type=int, default=20)
    args = p.parse_args()
    composer = cirlab.load(args.model)
    if composer.kind != "rerank":
        raise SystemExit(f"{args.model}: a {composer.kind} model, not a re-ranking one")
    for split_name in ("train", "test"):
        split = first_queries(load_split("shapes", args.data, split_name), args.queries)
        print(split.name, "  ".join(f"{k} {v:.2f}" for k, v in diagnose(composer, split, args.k).items()))


if __name__ == "__main__":
    main()
