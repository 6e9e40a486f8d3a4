"""Candidate re-ranking (Liu et al.; official code: Cuberick-Orion/Candidate-Reranking-CIR): a fast
BLIP filter keeps the top K, a dual encoder re-scores them.

* stage ``filter`` (I): the query is BLIP's image-grounded text encoder (``[ENC]`` first,
  cross-attention to the reference image's tokens), ``normalize(text_proj(CLS))``; the gallery is
  ``normalize(vision_proj(CLS token))``. The ViT is frozen and its tokens come from the feature
  cache; the text encoder, ``text_proj``, a learnable temperature (0.07, no clamp) and, unless
  ``train_vision_proj`` is off, ``vision_proj`` train.
  Its evaluation also reports R@K at ``topk_depths`` (how much a top-K list keeps, the ceiling
  of any re-ranker of it). Composer: :class:`~cirlab.composers.GroundedComposer`.
* stage ``reranker`` (II): a :class:`~cirlab.models.dual_encoder.DualEncoderReranker` scores
  (z_t, text, candidate tokens), z_t being the frozen filter's grounded last hidden state. It
  trains on the B x B in-batch pairs (cross-entropy, diagonal labels) and at inference re-scores
  each query's stage-I top K; below the K, ``beyond_k: official`` ranks nothing (the official
  evaluation: every metric counts hits inside the K) and ``first-stage`` keeps stage I's order.
  CIRR's Rs@K scores the subset members directly.
  Composer: :class:`~cirlab.composers.RerankComposer`.

Departures from the official code: z_t is taken with the filter in eval mode (the official code
leaves it in train mode, so dropout is active while z_t is extracted; ``stage1_train_mode: true``
reproduces that); by default the filter trains ``vision_proj``, which the official stage I never
updates (its target features are computed under ``no_grad``; ``train_vision_proj: false``, set by
the CIRR and FashionIQ configs, reproduces that; on shapes, at one epoch, training it measured better).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from cirlab.composers import Composer, GroundedComposer, RerankComposer, load
from cirlab.composers.grounded import BeyondK, CandidateInput, candidate_tokens, grounded_states
from cirlab.config import ExperimentConfig, Strict
from cirlab.data.torch_data import FeatureTriplets, default_text
from cirlab.evaluation.evaluate import TOPK_DEPTHS
from cirlab.methods.common import (RowTable, Stage, backbone_folder, composer_stage, image_table,
                                   recipe_of, stage_backbone, training_splits, triplet_ids)
from cirlab.methods.stages import register_stage
from cirlab.models import Backbone, BlipBackbone, load_backbone
from cirlab.models.dual_encoder import DualEncoderReranker
from cirlab.training import distributed
from cirlab.training.losses import diagonal_ce


class RerankConfig(Strict):
    name: Literal["rerank"] = "rerank"
    max_text_length: int = 77
    eval_queries: int | None = Field(None, gt=0, description="validate on the first N queries only (CPU budget)")


class FilterConfig(RerankConfig):
    stage: Literal["filter"] = "filter"
    temperature: float = Field(0.07, gt=0, description="initial value of the learnable temperature")
    train_vision_proj: bool = Field(True, description="false: the gallery side stays frozen, as in the official "
                                    "stage I; true: vision_proj trains with the text side (docs/methods/rerank.md)")
    topk_depths: list[int] = Field(list(TOPK_DEPTHS), description="validation: R@K at these K")


class RerankerConfig(RerankConfig):
    stage: Literal["reranker"] = "reranker"
    k: int = Field(50, gt=0, description="re-ranking depth (official: FashionIQ 100, CIRR 50)")
    beyond_k: BeyondK = Field("first-stage", description="evaluation below the top k: official (nothing is "
                              "ranked there, every metric counts hits inside the k) or first-stage (the first "
                              "stage's order follows)")
    merge: Literal["official", "average"] = "official"
    reranker_init: str | None = Field(None, description="BLIP folder whose text encoder initialises the "
                                      "re-ranker (official: the pretrained BLIP); None: model.backbone")
    chunk_size: int = Field(256, gt=0, description="(query, candidate) pairs per re-ranker call")
    gradient_checkpointing: bool = False
    stage1_train_mode: bool = False
    # Options beyond the official recipe (docs/methods/rerank.md), for small training budgets:
    loss: Literal["in_batch", "topk", "mixed"] = Field(
        "in_batch", description="in_batch: the official B x B pairs; topk: a listwise loss over each query's "
        "train_k hardest candidates from the filter (what it must rank at test time); mixed: their sum")
    train_k: int = Field(16, ge=2, description="topk/mixed: candidates per training query, the target among them")
    residual: bool = Field(False, description="score = residual_scale x stage-I cosine + a head initialised to 0")
    residual_scale: float | Literal["auto"] = Field(
        1 / 0.07, description="residual: the stage-I cosine as a logit (BLIP's ITC scale); auto: the scale that "
        "fits the first stage's own sharpness on the training lists (loss topk or mixed)")

    @model_validator(mode="after")
    def _auto_needs_lists(self) -> "RerankerConfig":
        if self.residual and self.residual_scale == "auto" and self.loss == "in_batch":
            raise ValueError("residual_scale: auto is fitted on the training lists; it needs loss topk or mixed")
        if self.residual_scale != "auto" and self.residual_scale <= 0:
            raise ValueError(f"residual_scale must be > 0 or auto, got {self.residual_scale}")
        return self
    candidate_input: CandidateInput = Field(
        "image", description="what the re-ranker cross-attends to: the candidate's image tokens (official) or "
        "the candidate's tokens minus the reference's (what changed)")



class FilterStage(nn.Module):
    """Stage I: text encoder, ``text_proj`` (and ``vision_proj`` unless ``train_vision_proj`` is off)
    and the temperature train; the image tower is frozen."""

    def __init__(self, backbone: BlipBackbone, tokens: RowTable, cfg: FilterConfig):
        super().__init__()
        self.backbone, self.cfg, self.tokens = backbone, cfg, tokens  # not a buffer: it stays on disk
        backbone.requires_grad_(False)
        backbone.text_encoder.requires_grad_(True)
        backbone.text_proj.requires_grad_(True)
        backbone.vision_proj.requires_grad_(cfg.train_vision_proj)
        self.temp = nn.Parameter(torch.tensor(cfg.temperature))  # no clamp, as the official code

    def training_step(self, batch: dict) -> dict[str, torch.Tensor]:
        states, _, _ = grounded_states(self.backbone, batch["text"], self.tokens[batch["reference"]],
                                       self.cfg.max_text_length)
        query = torch.nn.functional.normalize(self.backbone.text_proj(states[:, 0]).float(), dim=-1)
        cls = self.tokens.first()[batch["target"]][:, 0]
        target = torch.nn.functional.normalize(self.backbone.vision_proj(cls.to(self.backbone.dtype)).float(), dim=-1)
        # cosines in fp32, as pretraining's ITC: under bf16 autocast the matmul would round them to
        # about 3 digits, the size of the gaps between one-edit siblings
        with torch.autocast(query.device.type, enabled=False):
            loss = diagonal_ce(query @ target.T / self.temp)
        return {"loss": loss, "temp": self.temp.detach()}


class RerankerStage(nn.Module):
    """Stage II: only the re-ranker trains; z_t (and, for the residual, the stage-I cosines) come
    from the frozen first stage. Losses: the official in-batch B x B pairs with diagonal labels,
    and/or a listwise cross-entropy over each query's ``train_k`` first-stage candidates
    (``batch["candidates"]``, rows of the token table, the target at ``batch["label"]``)."""

    def __init__(self, composer: RerankComposer, tokens: RowTable, cfg: RerankerConfig):
        super().__init__()
        self.composer, self.cfg = composer, cfg
        self.tokens = tokens  # not a buffer: it stays on disk, batches gather their rows
        composer.first.requires_grad_(False)
        composer.reranker.gradient_checkpointing = cfg.gradient_checkpointing
        if cfg.residual:
            composer.reranker.zero_head()

    @property
    def reranker(self) -> DualEncoderReranker:
        return self.composer.reranker

    @torch.no_grad()
    def _stage1(self, query: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Stage-I cosines of composed queries with candidate rows of the token table: (B, B) or (B, K)."""
        cls = self.tokens.first()[rows.flatten()]
        gallery = self.composer.gallery_vectors(cls).view(*rows.shape, -1).to(query.dtype)
        return query @ gallery.T if rows.dim() == 1 else torch.einsum("bd,bkd->bk", query, gallery)

    def training_step(self, batch: dict) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        self.composer.first.train(cfg.stage1_train_mode)
        refs = self.tokens[batch["reference"]]
        with torch.no_grad():
            z_t, ids, mask = self.composer.grounded_states(refs, batch["text"])
            query = self.composer.compose(refs, batch["text"]) if cfg.residual else None  # once per step
        out: dict[str, torch.Tensor] = {}
        if cfg.loss in ("in_batch", "mixed"):
            targets = self.tokens[batch["target"]]
            if cfg.candidate_input == "image":  # each target's keys/values projected once for all B queries
                scores = self.reranker.pair_scores(z_t, ids, mask, targets, chunk_size=cfg.chunk_size)
            else:  # pair (i, j) reads target j minus reference i: B x B distinct token sets
                pairs = candidate_tokens(targets[None].expand(len(targets), -1, -1, -1), refs, cfg.candidate_input)
                scores = self.reranker.topk_scores(z_t, ids, mask, pairs, chunk_size=cfg.chunk_size)
            if cfg.residual:
                scores = scores + self.composer.residual_scale * self._stage1(query, batch["target"])
            out["loss_in_batch"] = diagonal_ce(scores)
        if cfg.loss in ("topk", "mixed"):
            cand = batch["candidates"]
            scores = self.reranker.topk_scores(z_t, ids, mask, candidate_tokens(self.tokens[cand], refs, cfg.candidate_input),
                                               chunk_size=cfg.chunk_size)
            if cfg.residual:
                scores = scores + self.composer.residual_scale * self._stage1(query, cand)
            out["loss_topk"] = F.cross_entropy(scores, batch["label"])
        loss = sum(out.values())
        return {"loss": loss, **{k: v.detach() for k, v in out.items()}}


class CandidateTriplets(torch.utils.data.Dataset):
    """The training triplets whose target is among the filter's top ``k`` training images (its
    reference and the target's look-alikes, which are also right answers, left out), each with
    that list as ``candidates`` and the target's position in it as ``label``.

    Queries the filter misses are left out rather than given the target in place of the last
    candidate: with the residual score, an inserted target is the list's lowest stage-I score, and
    the re-ranker learned exactly that shortcut ("the worst-looking candidate wins"), which drops
    test R@1 far below the filter's (24.5 -> 8.0 on 200 val queries, docs/methods/rerank.md)."""

    def __init__(self, base: FeatureTriplets, candidates: torch.Tensor, labels: torch.Tensor):
        self.keep = (labels >= 0).nonzero().flatten().tolist()
        if not self.keep:
            raise ValueError("method rerank: the filter's top train_k holds no training target; raise method.train_k")
        self.base, self.candidates, self.labels = base, candidates, labels

    def __len__(self) -> int:
        return len(self.keep)

    def groups(self) -> list[str]:
        return [self.base.queries[i].reference for i in self.keep]

    def __getitem__(self, index: int) -> dict:
        i = self.keep[index]
        return {**self.base[i], "candidates": self.candidates[i], "label": self.labels[i]}


@torch.no_grad()
def hard_candidates(composer: Composer, data: FeatureTriplets, tokens: RowTable, k: int,
                    batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """``(candidates (Q, k) token-table rows, labels (Q,), their stage-I cosines (Q, k))`` of every
    training query of ``data`` under ``composer`` (one that reads cached tokens: the filter, or a re-ranker's first stage),
    drawn from the images of ``data``'s own triplets (one FashionIQ category at a time); the label
    is -1 where the target is not among the candidates."""
    rows = sorted({data.rows[i] for q in data.queries for i in (q.reference, q.target)})
    device = composer.device
    gallery = torch.cat([composer.gallery_vectors(tokens.first()[torch.tensor(rows[s:s + batch_size], device=device)])
                         for s in range(0, len(rows), batch_size)])
    row_ids = torch.tensor(rows)
    column = {r: j for j, r in enumerate(rows)}
    candidates, labels, cosines = [], [], []
    for s in range(0, len(data.queries), batch_size):
        chunk = data.queries[s:s + batch_size]
        refs = tokens[torch.tensor([data.rows[q.reference] for q in chunk], device=device)]
        sim = (composer.encode_queries(refs, [default_text(q, False) for q in chunk]) @ gallery.T).cpu()
        for i, q in enumerate(chunk):
            target = data.rows[q.target]
            banned = {data.rows[x] for x in (q.reference, *q.positives) if x in data.rows} - {target}
            best = sim[i].topk(min(len(rows), k + len(banned))).indices
            order = [r for r in row_ids[best].tolist() if r not in banned][:k]
            candidates.append(order)
            labels.append(order.index(target) if target in order else -1)
            cosines.append(sim[i, [column[r] for r in order]])
    return torch.tensor(candidates), torch.tensor(labels), torch.stack(cosines)


def calibrated_scale(cosines: torch.Tensor, labels: torch.Tensor) -> float:
    """The scale s minimising the listwise cross-entropy of s x stage-I cosines (lists whose label is
    >= 0). A residual re-ranker whose head starts at 0 is then the first stage's best-calibrated
    listwise model: a fixed 1/0.07 suits the filter, but left a sum model trained at 1/0.02 nearly
    uniform over its top 8 (step-0 loss 2.05 against ln 8 = 2.08), so the head had to rank from scratch."""
    keep = labels >= 0
    if not keep.any():
        raise ValueError("method rerank: no training list holds its target; cannot fit residual_scale")
    cos, lab = cosines[keep].double(), labels[keep]
    grid = torch.logspace(0, 3, 301, dtype=torch.float64)  # 1 .. 1000; the loss is convex in s
    losses = torch.stack([F.cross_entropy(s * cos, lab) for s in grid])
    return float(grid[losses.argmin()])


# -- the method interface (cirlab train) -------------------------------------------------------------


def _filter_backbone(backbone: Backbone) -> BlipBackbone:
    if not isinstance(backbone, BlipBackbone):
        raise ValueError("method rerank: needs a BLIP backbone (model.kind: blip)")
    return backbone


def first_stage(cfg: ExperimentConfig) -> Composer:
    """Stage II's first stage: the model folder in ``model.backbone`` (the filter, or any composer
    on a BLIP backbone), or the untrained grounded filter of a bare BLIP backbone folder."""
    if cfg.model.backbone and (Path(cfg.model.backbone) / "composer.json").is_file():
        first = load(cfg.model.backbone)
        if first.reranks:
            raise ValueError(f"method rerank: {cfg.model.backbone} is a re-ranking model already; give its first stage")
        _filter_backbone(first.backbone)
        return first
    return GroundedComposer(_filter_backbone(stage_backbone(cfg, "method rerank")), recipe_of(cfg, cfg.method))


def _triplets(cfg: ExperimentConfig, composer: Composer):
    """The cached image tokens of the training triplets (the composer's preprocessing) and their dataset."""
    splits = training_splits(cfg)
    table, rows = image_table(composer, splits, cfg, triplet_ids, tokens=True)
    text = lambda q: default_text(q, True)  # noqa: E731
    datasets = [FeatureTriplets(s, rows, text) for s in splits]
    return table["tokens"], (datasets[0] if len(datasets) == 1 else torch.utils.data.ConcatDataset(datasets))


@register_stage("rerank", "filter", config=FilterConfig, default=True)
def build_filter(cfg: ExperimentConfig) -> Stage:
    """Stage I: the grounded filter over cached image tokens."""
    rcfg = cfg.method
    backbone = _filter_backbone(stage_backbone(cfg, "method rerank"))
    recipe = recipe_of(cfg, rcfg)
    tokens, train_data = _triplets(cfg, GroundedComposer(backbone, recipe))
    return composer_stage(cfg, FilterStage(backbone, tokens, rcfg), train_data,
                          lambda m: GroundedComposer(m.backbone, recipe),
                          topk_depths=rcfg.topk_depths, max_queries=rcfg.eval_queries)


@register_stage("rerank", "reranker", config=RerankerConfig)
def build_reranker(cfg: ExperimentConfig) -> Stage:
    """Stage II: the dual-encoder re-ranker over its first stage's top-K lists."""
    rcfg = cfg.method
    first = first_stage(cfg)
    backbone = first.backbone
    tokens, train_data = _triplets(cfg, first)
    init = load_backbone(backbone_folder(rcfg.reranker_init), kind="blip") if rcfg.reranker_init else backbone
    reranker = DualEncoderReranker.from_text_encoder(_filter_backbone(init).text_encoder,
                                                     enc_token_id=backbone.enc_token_id, merge=rcfg.merge)
    fixed = rcfg.residual and rcfg.residual_scale != "auto"
    composer = RerankComposer(first, reranker, k=rcfg.k, chunk_size=rcfg.chunk_size,
                              residual_scale=rcfg.residual_scale if fixed else None,
                              candidate_input=rcfg.candidate_input, beyond_k=rcfg.beyond_k)
    if rcfg.loss != "in_batch":
        composer.to(distributed.default_device())  # mined where it trains
        parts = train_data.datasets if isinstance(train_data, torch.utils.data.ConcatDataset) else [train_data]
        mined = [hard_candidates(composer, d, tokens, rcfg.train_k) for d in parts]
        if rcfg.residual and not fixed:
            composer.residual_scale = calibrated_scale(torch.cat([m[2] for m in mined]), torch.cat([m[1] for m in mined]))
            print(f"residual_scale: {composer.residual_scale:.2f}, fitted on the training lists", flush=True)
        parts = [CandidateTriplets(d, cand, labels) for d, (cand, labels, _) in zip(parts, mined)]
        print(f"re-ranker training lists: {sum(len(p) for p in parts)} of {sum(len(p.base) for p in parts)} "
              f"training queries have their target in the first stage's top {rcfg.train_k}", flush=True)
        train_data = parts[0] if len(parts) == 1 else torch.utils.data.ConcatDataset(parts)
    return composer_stage(cfg, RerankerStage(composer, tokens, rcfg), train_data, lambda m: m.composer,
                          max_queries=rcfg.eval_queries)
