"""Retrieval metrics on whole batches of queries: rankings, hit masks, recall and mAP.

Everything works on index tensors so that a benchmark is scored with a handful of tensor
ops, never a Python loop over queries. Conventions shared by every function:

* a *ranking* is a ``LongTensor[Q, K]`` of gallery indices, best first; ``-1`` marks "no
  item" (a gallery smaller than K, or an entry removed from the list) and is never a hit;
* *positives* are given either as a ``BoolTensor[Q, G]`` mask over the gallery or as a
  ``LongTensor[Q, P]`` of gallery indices padded with ``-1``;
* metric values are percentages, averaged over queries (every query counts in the
  denominator, whether or not it has a positive in the gallery).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor


def pad_indices(rows: Sequence[Sequence[int]], width: int | None = None) -> Tensor:
    """Ragged lists of gallery indices -> ``LongTensor[len(rows), width]`` padded with -1."""
    width = max((len(r) for r in rows), default=0) if width is None else width
    padded = [list(r[:width]) + [-1] * (width - len(r)) for r in rows]
    return torch.tensor(padded, dtype=torch.long).reshape(len(rows), width)


def _pad_columns(ranking: Tensor, k: int) -> Tensor:
    if ranking.shape[1] >= k:
        return ranking
    pad = ranking.new_full((ranking.shape[0], k - ranking.shape[1]), -1)
    return torch.cat([ranking, pad], dim=1)


def _scores(sim: Tensor) -> Tensor:
    """``sim`` detached, in float64 when it is float64 (float32 would merge scores that differ
    below its resolution), else in float32 (lossless for half precision, and the dtype every
    earlier result was ranked in, ties included)."""
    return sim.detach().to(torch.promote_types(sim.dtype, torch.float32))


def rank_gallery(sim: Tensor, k: int, exclude: Tensor | None = None) -> Tensor:
    """Top-``k`` gallery indices per query, with ``exclude[q]`` (if >= 0) deleted from row q.

    Deleting an item from the ranked list is the same as giving it -inf before the top-k,
    which is what CIRR's protocol does with the reference image; every -inf entry is left out
    of the list. The result always has ``k`` columns; a row with fewer than ``k`` ranked items
    is padded with -1.
    """
    if sim.ndim != 2:
        raise ValueError(f"similarity must be [queries, gallery], got shape {tuple(sim.shape)}")
    if torch.isnan(sim).any():
        raise ValueError("similarity matrix contains NaN")
    sim = _scores(sim)
    if exclude is not None:
        exclude = exclude.to(sim.device)
        rows = torch.nonzero(exclude >= 0).squeeze(1)
        sim = sim.index_put((rows, exclude[rows]), sim.new_tensor(float("-inf")))
    top = sim.topk(min(k, sim.shape[1]), dim=1)
    # -inf is "not ranked": the excluded item (reachable only when k >= G) and whatever a caller
    # leaves out, e.g. everything below a re-ranked top K under the official rule
    ranking = top.indices.masked_fill(top.values == float("-inf"), -1)
    return _pad_columns(ranking, k).cpu()


def rank_subset(sim: Tensor, members: Tensor, exclude: Tensor | None = None) -> Tensor:
    """Rank each query's own candidate set (CIRR's ``img_set.members``) by similarity.

    ``members`` is ``LongTensor[Q, S]`` of gallery indices (-1 padded). Returns
    ``LongTensor[Q, S]``: the members best first, with ``exclude[q]`` and padding moved to
    the end as -1, so the first ``S - 1`` columns are CIRR's 5-candidate subset ranking.
    """
    members = members.to(sim.device)
    valid = members >= 0
    if exclude is not None:
        valid &= members != exclude.to(sim.device)[:, None]
    scores = _scores(sim).gather(1, members.clamp(min=0)).masked_fill(~valid, float("-inf"))
    order = scores.argsort(dim=1, descending=True, stable=True)
    ranked = members.gather(1, order).masked_fill(~valid.gather(1, order), -1)
    return ranked.cpu()


def hits_from_ranking(ranking: Tensor, positives: Tensor | Sequence[Sequence[int]]) -> Tensor:
    """``BoolTensor[Q, K]``: whether the item at each rank is a positive of its query."""
    if not isinstance(positives, Tensor):
        positives = pad_indices(positives)
    valid = ranking >= 0
    if positives.dtype == torch.bool:
        hits = positives.gather(1, ranking.clamp(min=0))
    else:
        if positives.shape[1] == 0:
            return torch.zeros_like(ranking, dtype=torch.bool)
        hits = (ranking[:, :, None] == positives[:, None, :]).any(dim=2)
    return hits & valid


def _check_ks(hits: Tensor, ks: Iterable[int]) -> list[int]:
    ks = list(ks)
    if hits.shape[0] == 0:
        raise ValueError("no queries to score")
    if any(k < 1 or k > hits.shape[1] for k in ks):
        raise ValueError(f"ks {ks} must lie in 1..{hits.shape[1]} (the ranking depth)")
    return ks


def recall_at_k(hits: Tensor, ks: Iterable[int]) -> dict[int, float]:
    """Recall@K in percent: share of queries with at least one positive in their top K.

    The denominator is the number of queries (CLIP4Cir issue #8: a query whose target is
    missing from the ranking still counts as a miss).
    """
    return {k: v.mean().item() * 100 for k, v in hits_at_k(hits, ks).items()}


def hits_at_k(hits: Tensor, ks: Iterable[int]) -> dict[int, Tensor]:
    """Per query, 1.0 where a positive lies in the top K, else 0.0 (``DoubleTensor[Q]`` per K):
    R@K is their mean, and paired comparisons (:mod:`cirlab.evaluation.compare`) need them one by one."""
    ks = _check_ks(hits, ks)
    found = hits.cumsum(dim=1) > 0  # found[:, r]: a positive within the top r+1
    return {k: found[:, k - 1].double() for k in ks}


def average_precision_at_k(hits: Tensor, n_positives: Tensor, ks: Iterable[int]) -> dict[int, float]:
    """CIRCO's mAP@K in percent.

    Precision is taken at the ranks of hits only (``cumsum(hits) * hits / rank``);
    AP@K = sum of those precisions over the top K divided by ``min(#GT, K)``, where #GT is
    the query's total number of ground truths (so a query with 7 GTs can reach AP@5 = 1).
    """
    return {k: v.mean().item() * 100 for k, v in average_precision_per_query(hits, n_positives, ks).items()}


def average_precision_per_query(hits: Tensor, n_positives: Tensor, ks: Iterable[int]) -> dict[int, Tensor]:
    """Each query's AP@K in [0, 1] (``DoubleTensor[Q]`` per K), as :func:`average_precision_at_k` defines it."""
    ks = _check_ks(hits, ks)
    n_positives = torch.as_tensor(n_positives, dtype=torch.double)
    if (n_positives < 1).any():
        raise ValueError("every query needs at least one ground truth for mAP")
    h = hits.double()
    ranks = torch.arange(1, h.shape[1] + 1, dtype=torch.double)
    precision_sum = (h.cumsum(dim=1) * h / ranks).cumsum(dim=1)
    return {k: precision_sum[:, k - 1] / n_positives.clamp(max=k) for k in ks}


def subset_recall(
    sim: Tensor, members: Tensor, exclude: Tensor | None, positives: Tensor, ks: Iterable[int] = (1, 2, 3)
) -> dict[int, float]:
    """CIRR's Recall_subset@K: recall within each query's member set, reference removed."""
    return recall_at_k(hits_from_ranking(rank_subset(sim, members, exclude), positives), ks)
