"""Each benchmark's evaluation protocol over a :class:`~cirlab.data.base.CIRSplit`.

A protocol says which metrics a benchmark reports and what counts as a hit; whether the
reference image is deleted from the ranking comes from ``split.exclude_reference``
(True for CIRR and shapes, False for FashionIQ and CIRCO). Scoring from a similarity
matrix and scoring from ranked id lists (a predictions file) turn their input into the
same ranking tensors and share one scorer, so the two paths cannot drift apart.

Metric names (values in percent):

* CIRR, shapes: ``R@1 R@5 R@10 R@50``, with member sets also ``Rs@1 Rs@2 Rs@3`` and
  ``Avg = (R@5 + Rs@1) / 2`` (the CIRR leaderboard's mean, used for model selection);
* FashionIQ (one split per category): ``<category>/R@10 <category>/R@50``;
  :func:`combine_splits` adds ``avg/R@10 avg/R@50`` (means over categories) and
  ``avg = (avg/R@10 + avg/R@50) / 2``;
* CIRCO: ``mAP@5 mAP@10 mAP@25 mAP@50`` over all ground truths, ``R@1 R@5 R@10 R@50`` on
  ``target_img_id`` only.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from cirlab.data.base import CIRSplit, Protocol
from cirlab.data.registry import benchmark
from cirlab.evaluation.metrics import (
    average_precision_per_query,
    hits_at_k,
    hits_from_ranking,
    pad_indices,
    rank_gallery,
    rank_subset,
    recall_at_k,
)


def protocol_for(split: CIRSplit) -> Protocol:
    return benchmark(split.dataset).protocol


def category_of(split: CIRSplit) -> str:
    """The category of a split of a benchmark with categories (FashionIQ's, from its query ids)."""
    category = benchmark(split.dataset).category_of(split)
    if category is None:
        raise ValueError(f"{split.name}: {split.dataset} has no categories")
    return category


@dataclass
class SplitIndex:
    """A split's ids turned into gallery indices (-1 = none / padding)."""

    gallery: dict[str, int]
    exclude: Tensor  # [Q] the index deleted from each ranking
    members: Tensor | None  # [Q, S] img_set.members, when every query has one
    positives: Tensor | None  # [Q, P] what counts as a Recall@K / Rs@K hit
    ground_truths: Tensor | None  # [Q, P] mAP ground truths in the gallery
    n_ground_truths: Tensor | None  # [Q] all ground truths, for min(#GT, K)


def index_split(split: CIRSplit, *, require_targets: bool = True) -> SplitIndex:
    """Map a split's ids to gallery indices once; ``require_targets=False`` for test splits
    (rankings for a submission need the exclusions and member sets, not the targets)."""
    proto = protocol_for(split)
    gallery = {name: i for i, name in enumerate(split.gallery)}
    if len(gallery) != len(split.gallery):
        raise ValueError(f"{split.name}: the gallery lists some image ids twice")
    if not split.queries:
        raise ValueError(f"{split.name}: no queries")

    def lookup(ids, qid: str, what: str) -> list[int]:
        missing = [x for x in ids if x not in gallery]
        if missing:
            raise ValueError(f"{split.name}: query {qid}: {what} {missing[0]!r} is not in the gallery")
        return [gallery[x] for x in ids]

    exclude = torch.tensor([gallery.get(q.reference, -1) if split.exclude_reference else -1
                            for q in split.queries], dtype=torch.long)
    members = None
    if proto.subset_ks and all(q.subset for q in split.queries):
        members = pad_indices([lookup(q.subset, q.qid, "subset member") for q in split.queries])

    index = SplitIndex(gallery, exclude, members, None, None, None)
    untargeted = [q.qid for q in split.queries if q.target is None]
    if untargeted:
        if require_targets:
            raise ValueError(f"{split.name}: {len(untargeted)} of {len(split.queries)} queries have no "
                             f"target (e.g. {', '.join(untargeted[:3])}); a test split can only be "
                             "scored by the benchmark's server (write a submission instead)")
        return index

    positives, gts = [], []
    for q in split.queries:
        gt = list(dict.fromkeys(q.positives or (q.target,)))
        hits = [q.target] if proto.recall_on_target else gt
        in_gallery = [x for x in hits if x in gallery]
        if not in_gallery:
            raise ValueError(f"{split.name}: query {q.qid}: none of its targets {hits[:3]} is in the "
                             f"gallery ({len(gallery)} images)")
        positives.append([gallery[x] for x in in_gallery])
        gts.append(gt)
    index.positives = pad_indices(positives)
    if proto.map_ks:
        index.ground_truths = pad_indices([[gallery[x] for x in gt if x in gallery] for gt in gts])
        index.n_ground_truths = torch.tensor([len(gt) for gt in gts])
    return index


def _query_values(split: CIRSplit, index: SplitIndex, ranking: Tensor,
                  subset_ranking: Tensor | None) -> dict[str, Tensor]:
    """Each query's value of every metric but Avg (``DoubleTensor[Q]``: 1/0 hits, AP in [0, 1]);
    a metric is the mean of its values in percent."""
    proto = protocol_for(split)
    hits = hits_from_ranking(ranking, index.positives)
    out = {f"R@{k}": v for k, v in hits_at_k(hits, proto.recall_ks).items()}
    if proto.map_ks:
        gt_hits = hits_from_ranking(ranking, index.ground_truths)
        aps = average_precision_per_query(gt_hits, index.n_ground_truths, proto.map_ks)
        out = {**{f"mAP@{k}": v for k, v in aps.items()}, **out}
    if subset_ranking is not None:
        subset_hits = hits_from_ranking(subset_ranking, index.positives)
        out.update({f"Rs@{k}": v for k, v in hits_at_k(subset_hits, proto.subset_ks).items()})
    return out


def _score(split: CIRSplit, index: SplitIndex, ranking: Tensor, subset_ranking: Tensor | None) -> dict[str, float]:
    """The one scorer: ranking [Q, depth] (and subset ranking [Q, S]) -> named metrics."""
    out = {name: v.mean().item() * 100 for name, v in _query_values(split, index, ranking, subset_ranking).items()}
    if "Rs@1" in out:
        out["Avg"] = (out["R@5"] + out["Rs@1"]) / 2
    return _named(split, out)


def _named(split: CIRSplit, metrics: dict[str, float]) -> dict[str, float]:
    if not protocol_for(split).per_category:
        return metrics
    category = category_of(split)
    return {f"{category}/{name}": v for name, v in metrics.items()}


def evaluate_similarity(split: CIRSplit, sim: Tensor, subset_sim: Tensor | None = None,
                        depth: int | None = None) -> dict[str, float]:
    """Score a ``[queries, gallery]`` similarity matrix (rows/columns in split order).

    ``subset_sim`` ranks the member sets (Rs@K) instead of ``sim`` where they differ, e.g. a
    re-ranker that scores every member directly but only the top K of the whole gallery.
    ``depth``: only the first ``depth`` ranked items count (a hit below them never does), as the
    official re-ranking evaluation computes every metric inside its top K."""
    expected = (len(split.queries), len(split.gallery))
    for name, m in (("similarity", sim), ("subset similarity", subset_sim)):
        if m is not None and tuple(m.shape) != expected:
            raise ValueError(f"{split.name}: {name} has shape {tuple(m.shape)}, expected {expected} "
                             "(queries x gallery)")
    index = index_split(split)
    ranking = rank_gallery(sim, protocol_for(split).depth, index.exclude)
    if depth is not None:
        ranking[:, depth:] = -1
    subset_sim = sim if subset_sim is None else subset_sim
    subset = rank_subset(subset_sim, index.members, index.exclude) if index.members is not None else None
    return _score(split, index, ranking, subset)


def recall_at_depths(split: CIRSplit, sim: Tensor, ks: Sequence[int]) -> dict[str, float]:
    """``R@K`` for any ``ks`` (the protocol's exclusions and hits): how much a top-K candidate
    list keeps, which bounds what a re-ranker of that list can reach. Depths beyond the
    gallery are left out."""
    index = index_split(split)
    kept = depths_within(split, ks)
    hits = hits_from_ranking(rank_gallery(sim, max(kept), index.exclude), index.positives) if kept else None
    return {f"R@{k}": v for k, v in recall_at_k(hits, kept).items()} if kept else {}


def depths_within(split: CIRSplit, ks: Sequence[int]) -> list[int]:
    """The depths of ``ks`` that a ranking of the split's gallery can reach (its reference deleted)."""
    depth = min(max(ks), len(split.gallery) - int(split.exclude_reference))
    return [k for k in ks if k <= depth]


def _ranking_from_ids(split: CIRSplit, index: SplitIndex, ranked: Mapping[str, Sequence[str]],
                      depth: int, subset: bool, label: str) -> Tensor:
    qids = [q.qid for q in split.queries]
    missing = [qid for qid in qids if qid not in ranked]
    if missing:
        raise ValueError(f"{label}: {len(missing)} of {len(qids)} queries of {split.name} are missing "
                         f"(e.g. {', '.join(missing[:5])}); a partial predictions file cannot be scored")
    unknown = sorted(set(ranked) - set(qids))
    if unknown:
        raise ValueError(f"{label}: {len(unknown)} query ids are not in {split.name} "
                         f"(e.g. {', '.join(unknown[:5])})")
    exclude = index.exclude.tolist()
    members = index.members.tolist() if subset else None
    n_gallery = len(index.gallery)
    rows = []
    for i, qid in enumerate(qids):
        ids = list(ranked[qid])
        unseen = [x for x in ids if x not in index.gallery]
        if unseen:
            raise ValueError(f"{label}: query {qid}: {unseen[0]!r} is not in the gallery of {split.name}")
        row = [index.gallery[x] for x in ids]
        if len(set(row)) != len(row):
            raise ValueError(f"{label}: query {qid} lists an image twice")
        if exclude[i] >= 0 and exclude[i] in row:
            raise ValueError(f"{label}: query {qid} contains its reference image "
                             f"{split.queries[i].reference!r}, which the protocol deletes from the ranking")
        if subset:
            candidates = {m for m in members[i] if m >= 0 and m != exclude[i]}
            if not candidates.issuperset(row):
                raise ValueError(f"{label}: query {qid} lists images outside its subset (img_set.members)")
            need = min(depth, len(candidates))
        else:
            need = min(depth, n_gallery - (exclude[i] >= 0))
        if len(row) < need:
            raise ValueError(f"{label}: query {qid} ranks {len(row)} images; the metrics need the top {need}")
        rows.append(row[:depth])
    return pad_indices(rows, depth)


def _rankings(split: CIRSplit, index: SplitIndex, ranked: Mapping[str, Sequence[str]],
              subset_ranked: Mapping[str, Sequence[str]] | None,
              labels: tuple[str, str]) -> tuple[Tensor, Tensor | None]:
    proto = protocol_for(split)
    ranking = _ranking_from_ids(split, index, ranked, proto.depth, False, labels[0])
    if subset_ranked is None:
        return ranking, None
    if index.members is None:
        raise ValueError(f"{labels[1]}: subset rankings given, but {split.name} has no member sets")
    return ranking, _ranking_from_ids(split, index, subset_ranked, max(proto.subset_ks), True, labels[1])


def validate_rankings(split: CIRSplit, ranked: Mapping[str, Sequence[str]],
                      subset_ranked: Mapping[str, Sequence[str]] | None = None,
                      labels: tuple[str, str] = ("rankings", "subset rankings")) -> None:
    """Raise ValueError unless the rankings could be scored (targets not needed: test splits)."""
    _rankings(split, index_split(split, require_targets=False), ranked, subset_ranked, labels)


def evaluate_rankings(split: CIRSplit, ranked: Mapping[str, Sequence[str]],
                      subset_ranked: Mapping[str, Sequence[str]] | None = None,
                      labels: tuple[str, str] = ("rankings", "subset rankings")) -> dict[str, float]:
    """Score ranked gallery ids (strings) per query id, e.g. from a predictions file.

    Every query of the split must be ranked, at least to the protocol's depth (50, or the
    whole gallery when smaller; subsets: 3). Under ``exclude_reference`` a list holding the
    reference is an error rather than silently repaired. Rs@K and Avg need
    ``subset_ranked``. ``labels`` name the two inputs in error messages (e.g. file paths).
    """
    index = index_split(split)
    return _score(split, index, *_rankings(split, index, ranked, subset_ranked, labels))


def query_values(split: CIRSplit, ranked: Mapping[str, Sequence[str]],
                 subset_ranked: Mapping[str, Sequence[str]] | None = None,
                 labels: tuple[str, str] = ("rankings", "subset rankings")) -> dict[str, Tensor]:
    """Each query's value of every metric of :func:`evaluate_rankings` (``DoubleTensor[Q]`` in
    split order; Avg per query too): the mean of each, in percent, is that metric. Paired
    tests between two models need these per-query values, not only their means."""
    index = index_split(split)
    out = _query_values(split, index, *_rankings(split, index, ranked, subset_ranked, labels))
    if "Rs@1" in out:
        out["Avg"] = (out["R@5"] + out["Rs@1"]) / 2
    return _named(split, out)


def combine_splits(splits: Sequence[CIRSplit], results: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """One flat dict for a benchmark evaluated as several splits (FashionIQ's categories).

    FashionIQ: the per-category metrics plus ``avg/R@K`` (mean over the categories given)
    and ``avg = (avg/R@10 + avg/R@50) / 2``. Other benchmarks have exactly one split.
    """
    if len(splits) != len(results) or not splits:
        raise ValueError("need one result per split")
    if not all(protocol_for(s).per_category for s in splits):
        if len(splits) != 1:
            raise ValueError(f"only a benchmark with categories is evaluated as several splits, "
                             f"got {[s.name for s in splits]}")
        return dict(results[0])
    out: dict[str, float] = {}
    for r in results:
        out.update(r)
    categories = [category_of(s) for s in splits]
    ks = protocol_for(splits[0]).recall_ks
    for k in ks:
        out[f"avg/R@{k}"] = sum(out[f"{c}/R@{k}"] for c in categories) / len(categories)
    out["avg"] = sum(out[f"avg/R@{k}"] for k in ks) / len(ks)
    return out


def _p_no_hit(n: Tensor, p: Tensor, k: int) -> Tensor:
    """P(no positive in a uniform random top k): C(n - p, k) / C(n, k) as a running product."""
    j = torch.arange(k, dtype=torch.double)
    num = (n - p)[:, None].double() - j
    den = n[:, None].double() - j
    return torch.where(den > 0, num.clamp(min=0) / den.clamp(min=1), torch.ones_like(den)).prod(dim=1)


def _n_in_candidates(ids: Tensor, exclude: Tensor) -> Tensor:
    return ((ids >= 0) & (ids != exclude[:, None])).sum(dim=1)


def chance_levels(split: CIRSplit) -> dict[str, float]:
    """Expected value of every metric for a uniformly random ranking (exact, no sampling).

    With n candidates (the gallery, minus the reference under ``exclude_reference``) and p
    positives among them, R@K = 1 - C(n-p, K)/C(n, K) (= K/n for one positive), averaged
    over queries; Rs@K the same over the member set without the reference (n = 5, so CIRR's
    chance Rs@1 is 20%). For mAP@K, E[precision_i * hit_i] = p/(n i) * (1 + (i-1)(p-1)/(n-1))
    summed over i <= K and divided by min(#GT, K). Names and percentages as the evaluators.
    """
    proto = protocol_for(split)
    index = index_split(split)
    n = len(index.gallery) - (index.exclude >= 0).long()
    p = _n_in_candidates(index.positives, index.exclude)
    out = {f"R@{k}": (1 - _p_no_hit(n, p, k)).mean().item() * 100 for k in proto.recall_ks}
    if proto.map_ks:
        n_gt = index.n_ground_truths.double()
        g = _n_in_candidates(index.ground_truths, index.exclude).double()[:, None]
        nd = n.double()[:, None]
        i = torch.arange(1, proto.depth + 1, dtype=torch.double)
        pair = torch.where(nd > 1, (g - 1).clamp(min=0) / (nd - 1).clamp(min=1), torch.zeros_like(nd))
        term = torch.where(i <= nd, g / nd * (1 + (i - 1) * pair) / i, torch.zeros(()))
        ap_sum = term.cumsum(dim=1)
        maps = {f"mAP@{k}": (ap_sum[:, k - 1] / n_gt.clamp(max=k)).mean().item() * 100 for k in proto.map_ks}
        out = {**maps, **out}
    if index.members is not None:
        ns = _n_in_candidates(index.members, index.exclude)
        in_subset = (index.positives[:, :, None] == index.members[:, None, :]).any(dim=2)
        ps = _n_in_candidates(index.positives.masked_fill(~in_subset, -1), index.exclude)
        out.update({f"Rs@{k}": (1 - _p_no_hit(ns, ps, k)).mean().item() * 100 for k in proto.subset_ks})
        out["Avg"] = (out["R@5"] + out["Rs@1"]) / 2
    return _named(split, out)
