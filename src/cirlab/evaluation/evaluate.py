"""The one evaluation path: any composer on any benchmark split, metrics and predictions.

Training-time validation, ``cirlab eval`` and the demo all come here. For each split the
composer's image fields come from the feature cache; queries are composed in batches; the
(Q, N) similarity is scored with the benchmark's protocol when the split has targets and turned
into ranked ids (the submission formats) in every case. A re-ranking composer adds the rows
``stage1`` and ``rerank@K`` (K from ``rerank_ks``, the composer's own K by default).

Rows are named by the composer (``forward``, ``filter``, a zero-shot mode...); on shapes a
composer with direction tokens also gets ``backward`` (target + backward text -> reference).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from cirlab.composers import Composer, ZeroShotComposer
from cirlab.composers.vectors import query_texts, similarity, split_features
from cirlab.data.base import CIRSplit, Query
from cirlab.data.registry import benchmark
from cirlab.evaluation.protocols import (category_of, chance_levels, combine_splits, depths_within, evaluate_similarity,
                                         index_split, protocol_for, recall_at_depths)
from cirlab.evaluation.submission import rankings_from_similarity, write_submission
from cirlab.features.cache import FeatureSet
from cirlab.features.encode import TokenDtype
from cirlab.retrieval.topk import TopK, topk_from_similarity

Rankings = tuple[dict[str, list[str]], dict[str, list[str]] | None]
# R@K of a first stage at these depths: how much a top-K candidate list keeps for a re-ranker
TOPK_DEPTHS = (10, 20, 50, 100, 200)


@dataclass
class Evaluation:
    """``metrics[row]`` (combined over FashionIQ's categories; empty for splits without targets)
    and ``rankings[row][i]`` = (ranked ids, ranked subset ids) of ``splits[i]`` (every row but
    shapes' ``backward``, which ranks references)."""

    splits: list[CIRSplit]
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    rankings: dict[str, list[Rankings]] = field(default_factory=dict)
    topk: list[TopK] = field(default_factory=list)

    def flat(self, primary: str) -> dict[str, float]:
        """One dict for training logs: the ``primary`` row's metrics as they are, the others prefixed."""
        out = dict(self.metrics.get(primary, {}))
        for row, metrics in self.metrics.items():
            if row != primary:
                out.update({f"{row}/{k}": v for k, v in metrics.items()})
        return out


def first_queries(split: CIRSplit, n: int | None) -> CIRSplit:
    """The split restricted to its first ``n`` queries (CPU budgets of expensive re-rankers)."""
    if n is None or n >= len(split.queries):
        return split
    return dataclasses.replace(split, queries=split.queries[:n], name=f"{split.name}[:{n}]")


def reversed_split(split: CIRSplit) -> CIRSplit:
    """Backward retrieval on shapes: query = (target image, text), answer = the reference scene.

    Hits are every image showing the reference's scene, found through the scene captions the
    generator stores with each triplet."""
    caption_of: dict[str, str] = {}
    for q in split.queries:
        caption_of[q.reference] = q.extra["reference_caption"]
        caption_of[q.target] = q.extra["target_caption"]
    same: dict[str, list[str]] = {}
    for image, caption in caption_of.items():
        same.setdefault(caption, []).append(image)
    queries = [Query(qid=q.qid, reference=q.target, captions=q.captions, target=q.reference,
                     positives=(q.reference, *(i for i in same[caption_of[q.reference]] if i != q.reference)),
                     subset=q.subset, extra=q.extra)
               for q in split.queries]
    return dataclasses.replace(split, queries=queries, name=f"{split.name}/backward")


def candidates_of(split: CIRSplit, sim: torch.Tensor, k: int) -> TopK:
    """Each query's top ``k`` gallery items by ``sim`` (its reference removed where the protocol says)."""
    exclude = None
    if split.exclude_reference:
        exclude = [j if j >= 0 else None for j in index_split(split, require_targets=False).exclude.tolist()]
    available = len(split.gallery) - int(exclude is not None)
    return topk_from_similarity(sim, [q.qid for q in split.queries], split.gallery, min(k, available),
                                exclude=exclude, dataset=split.dataset, split=split.name)


def rerank_scores(composer: Composer, split: CIRSplit, feats: FeatureSet, candidates: torch.Tensor,
                  sim: torch.Tensor) -> torch.Tensor:
    """(Q, C) scores of each query against its candidate gallery indices (-1 = padding: -inf) by the
    composer's :meth:`~cirlab.composers.Composer.rerank_topk` over the cached tokens; ``sim`` is the
    (Q, N) stage-I similarity (a residual re-ranker adds it)."""
    table = feats["tokens"]
    gallery_rows = torch.tensor([feats.index_of(i) for i in split.gallery], dtype=torch.long)
    references = torch.tensor([feats.index_of(q.reference) for q in split.queries], dtype=torch.long)
    rows = torch.where(candidates >= 0, gallery_rows[candidates.clamp_min(0)], -1)
    stage1 = sim.gather(1, candidates.clamp_min(0))
    return composer.rerank_topk(lambda r: table.index_select(0, r).float(), references,
                                _single_texts(composer, split.queries), rows, stage1)


def _single_texts(composer: Composer, queries: Sequence[Query]) -> list[str]:
    texts, _ = query_texts(composer, queries, True)
    if any(len(t) != 1 for t in texts):
        raise ValueError(f"re-ranking composes one text per query; the recipe's caption rule "
                         f"{composer.recipe.caption_orders!r} gives {len(texts[0])}")
    return [t[0] for t in texts]


def reranked_similarity(sim: torch.Tensor, candidates: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """``sim`` with each row's candidates (the top K) given their new scores and lifted above every
    other entry, which keeps its stage-I order below them (a full ranking: what search serves and
    prediction files hold; the official rule counts hits inside the K only, see :class:`Row`)."""
    valid = candidates >= 0
    finite = sim[torch.isfinite(sim)]
    top = scores[valid & torch.isfinite(scores)]
    floor = (top.min() if top.numel() else sim.new_tensor(0.0)) - 1
    out = sim - (finite.max() if finite.numel() else 0) + floor
    rows = torch.arange(len(sim))[:, None].expand_as(candidates)
    out[rows[valid], candidates[valid].long()] = scores[valid]
    return out


def _subset_members(split: CIRSplit) -> torch.Tensor | None:
    """(Q, S) gallery indices of each query's subset members without its reference, -1 padded."""
    index = index_split(split, require_targets=False)
    if index.members is None:
        return None
    members = index.members.clone()
    members[members == index.exclude[:, None]] = -1
    return members


def rerank_rows(composer: Composer, split: CIRSplit, feats: FeatureSet, sim: torch.Tensor,
                ks: Sequence[int], fusion_weight: float | None = None
                ) -> dict[str, tuple[torch.Tensor, torch.Tensor | None, int]]:
    """``{row: (similarity, subset similarity, K)}`` for ``rerank@K`` at each K (and ``+fusion``:
    re-ranker score + ``fusion_weight`` x stage-I cosine). The top max(K) is scored once; a
    smaller K re-sorts its first K. CIRR's member sets are scored directly (as the official
    evaluation, independent of the top K)."""
    top = candidates_of(split, sim, max(ks))
    cand, stage1 = top.indices.long(), top.scores
    scores = rerank_scores(composer, split, feats, cand, sim)
    members = _subset_members(split)
    if members is not None:
        member_scores = rerank_scores(composer, split, feats, members, sim)
        member_stage1 = sim.gather(1, members.clamp_min(0))
    out = {}
    variants = [("", 0.0)] + ([("+fusion", fusion_weight)] if fusion_weight is not None else [])
    for suffix, w in variants:
        subset = None
        if members is not None:
            valid = members >= 0
            subset = torch.full_like(sim, float("-inf"))
            fused = member_scores + w * member_stage1
            subset[torch.arange(len(sim))[:, None].expand_as(members)[valid], members[valid]] = fused[valid]
        for k in sorted(set(ks)):
            out[f"rerank@{k}{suffix}"] = (reranked_similarity(sim, cand[:, :k], scores[:, :k] + w * stage1[:, :k]),
                                          subset, k)
    return out


@dataclass
class Row:
    """One row of results on one split: the split it is scored on (shapes' ``backward`` rows rank
    references), the (Q, N) similarity, the member-set similarity where it differs, and ``depth``:
    the metrics count hits in the first ``depth`` ranked items only (a re-ranked row under the
    official rule, ``beyond_k: official``); prediction files always hold the full ranking."""

    split: CIRSplit
    sim: torch.Tensor
    subset: torch.Tensor | None = None
    depth: int | None = None


Rows = dict[str, Row]


def row_names(composer: Composer, split: CIRSplit, *, rerank_ks: Sequence[int] | None = None,
              fusion_weight: float | None = None) -> list[str]:
    """The rows :func:`split_rows` gives on ``split``, in order: a re-ranking composer's ``stage1``
    and ``rerank@K`` (``+fusion``) rows; else the composer's own row, and on a benchmark with
    backward rows (shapes) a bidirectional composer's ``backward`` and ``backward image-only``."""
    if composer.reranks:
        ks = sorted(set(rerank_ks or [composer.k]))
        suffixes = [""] + (["+fusion"] if fusion_weight is not None else [])
        return ["stage1", *(f"rerank@{k}{suffix}" for suffix in suffixes for k in ks)]
    names = [composer.name]
    if composer.bidirectional and benchmark(split.dataset).backward_rows and split.has_targets:
        names += ["backward", "backward image-only"]
    return names


def metric_names(composer: Composer, splits: Sequence[CIRSplit], *, topk_depths: Sequence[int] | None = None,
                 rerank_ks: Sequence[int] | None = None, fusion_weight: float | None = None) -> list[str]:
    """The names of :meth:`Evaluation.flat` (primary: the composer's row) that
    :func:`evaluate_composer` reports on ``splits`` with these options: what a training stage's
    validation logs and ``trainer.select_metric`` may name, known before any model is run."""
    per_row = list(combine_splits(splits, [chance_levels(s) for s in splits]))
    rows = row_names(composer, splits[0], rerank_ks=rerank_ks, fusion_weight=fusion_weight)
    names = []
    for row in rows:
        metrics = list(per_row)
        if topk_depths and row == rows[0]:
            per_category = protocol_for(splits[0]).per_category
            metrics += [f"{category_of(s)}/R@{k}" if per_category else f"R@{k}"
                        for s in splits for k in depths_within(s, topk_depths)]
        prefix = "" if row == composer.name else f"{row}/"
        names += [prefix + m for m in metrics]
    return list(dict.fromkeys(names))


def split_rows(composer: Composer, split: CIRSplit, *, batch_size: int = 64, rerank_ks: Sequence[int] | None = None,
               fusion_weight: float | None = None, beyond_k: str | None = None,
               extra_fields: Sequence[str] = (), token_dtype: TokenDtype = "float16") -> Rows:
    """Every :class:`Row` of one split; ``beyond_k``: a re-ranking composer's rule below its top K
    (default: its own, see :class:`~cirlab.composers.RerankComposer`)."""
    names = row_names(composer, split, rerank_ks=rerank_ks, fusion_weight=fusion_weight)
    feats = split_features(composer, split, batch_size=batch_size, extra_fields=extra_fields, token_dtype=token_dtype)
    sim = similarity(composer, split, feats, batch_size=batch_size)
    rows: Rows = {names[0]: Row(split, sim)}
    if composer.reranks:
        reranked = rerank_rows(composer, split, feats, sim, rerank_ks or [composer.k], fusion_weight)
        official = (beyond_k or composer.beyond_k) == "official"
        for row in names[1:]:
            s, subset, k = reranked[row]
            rows[row] = Row(split, s, subset, k if official else None)
        return rows
    if "backward" in names:
        back = reversed_split(split)
        back_feats = split_features(composer, back, batch_size=batch_size, extra_fields=extra_fields,
                                    token_dtype=token_dtype)
        rows["backward"] = Row(back, similarity(composer, back, back_feats, forward=False, batch_size=batch_size))
        # the level to beat: the target image alone, no text (shapes scenes are one edit apart)
        image_only = ZeroShotComposer(composer.backbone, composer.recipe, mode="image")
        if (image_only.reference_field, image_only.gallery_field) != (composer.reference_field, composer.gallery_field):
            back_feats = split_features(image_only, back, batch_size=batch_size, extra_fields=extra_fields,
                                        token_dtype=token_dtype)
        rows["backward image-only"] = Row(back, similarity(image_only, back, back_feats, batch_size=batch_size))
    return rows


def evaluate_composer(composer: Composer, splits: Sequence[CIRSplit], *, batch_size: int = 64,
                      rerank_ks: Sequence[int] | None = None, fusion_weight: float | None = None,
                      beyond_k: str | None = None, token_dtype: TokenDtype = "float16",
                      max_queries: int | None = None, topk_depths: Sequence[int] | None = None,
                      topk_k: int | None = None, extra_fields: Sequence[str] = ()) -> Evaluation:
    """Metrics (where the splits have targets) and rankings of every row on ``splits``
    (FashionIQ: one per category, combined as its protocol says).

    ``topk_depths``: also R@K at these depths for the first row (how much a top-K list keeps,
    the ceiling of a re-ranker of it); ``topk_k``: keep each split's top-K candidate list of the
    first row (written by ``cirlab eval`` as the stage-I top-K file); ``extra_fields``: cache these
    image fields too, so that several composers on one backbone share one cache entry;
    ``token_dtype``: the storage of cached token sequences (see :func:`~cirlab.features.encode.image_features`);
    ``beyond_k``: a re-ranking composer's rule below its top K (default: its own)."""
    splits = [first_queries(s, max_queries) for s in splits]
    result = Evaluation(splits)
    per_split: dict[str, list[dict[str, float]]] = {}
    for split in splits:
        rows = split_rows(composer, split, batch_size=batch_size, rerank_ks=rerank_ks, fusion_weight=fusion_weight,
                          beyond_k=beyond_k, extra_fields=extra_fields, token_dtype=token_dtype)
        first = next(iter(rows))
        if topk_k is not None:
            result.topk.append(candidates_of(split, rows[first].sim, topk_k))
        for name, row in rows.items():
            scored = row.split
            if scored is split:  # the backward diagnostic has no submission format
                ranked, subset_ranked = rankings_from_similarity(scored, row.sim)
                if row.subset is not None:
                    subset_ranked = rankings_from_similarity(scored, row.subset)[1]
                result.rankings.setdefault(name, []).append((ranked, subset_ranked))
            if not scored.has_targets:
                continue
            metrics = evaluate_similarity(scored, row.sim, row.subset, depth=row.depth)
            if topk_depths and name == first:
                depths = recall_at_depths(scored, row.sim, topk_depths)
                if protocol_for(scored).per_category:
                    depths = {f"{category_of(scored)}/{k}": v for k, v in depths.items()}
                metrics.update(depths)
            per_split.setdefault(name, []).append(metrics)
    for row, results in per_split.items():
        result.metrics[row] = combine_splits(splits, results)
    return result


def write_predictions(out: str | Path, name: str, evaluation: Evaluation, row: str) -> list[Path]:
    """Write one row's rankings in the benchmark's submission format (any split, val included):
    CIRR and shapes the two server files, CIRCO its file, FashionIQ one file for every category."""
    return write_submission(out, prediction_tag(name, row), evaluation.splits, evaluation.rankings[row])


def prediction_tag(name: str, row: str) -> str:
    """The ``<name>-<row>`` part of a row's prediction file names, safe in a file name."""
    return f"{name}-{row_tag(row)}"


def row_tag(row: str) -> str:
    """A row name as its prediction files spell it (``rerank@10+fusion`` -> ``rerankat10_fusion``)."""
    return row.replace("+", "_").replace("@", "at").replace("/", "_")
