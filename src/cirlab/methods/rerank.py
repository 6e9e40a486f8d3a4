"""Candidate re-ranking (REFERENCE 4): a fast BLIP filter keeps the top K, a dual encoder re-scores them.

* stage ``filter`` (I): the query is BLIP's image-grounded text encoder (``[ENC]`` first,
  cross-attention to the reference image's tokens), ``normalize(text_proj(CLS))``; the gallery is
  ``normalize(vision_proj(CLS token))``. The ViT is frozen and its tokens come from the feature
  cache; the text encoder, both projections and a learnable temperature (0.07, no clamp) train.
  Its evaluation prints R@K at ``topk_depths`` (how much a top-K list keeps, the ceiling of any
  re-ranker of it) and writes the top-K file (:mod:`cirlab.retrieval.topk`) into the eval run.
* stage ``reranker`` (II): a :class:`~cirlab.models.dual_encoder.DualEncoderReranker` scores
  (z_t, text, candidate tokens), z_t being the frozen filter's grounded last hidden state. It
  trains on the B x B in-batch pairs (cross-entropy, diagonal labels) and at inference re-scores
  each query's stage-I top K; candidates below K keep their stage-I order, so R@K' for K' >= K is
  stage I's, as in the official evaluation. CIRR's Rs@K scores the subset members directly.

Departure: z_t is taken with the filter in eval mode (the official code leaves it in train mode,
so dropout is active while z_t is extracted; ``stage1_train_mode: true`` reproduces that).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from cirlab.config import ExperimentConfig, Strict, validate
from cirlab.data.base import CIRSplit
from cirlab.data.torch_data import FeatureTriplets, default_text
from cirlab.evaluation.protocols import evaluate_similarity, index_split, recall_at_depths
from cirlab.evaluation.submission import rankings_from_similarity
from cirlab.methods.common import RowTable, diagonal_ce, image_table, method_splits, triplet_ids
from cirlab.models import Backbone, BlipBackbone, load_backbone, save_backbone
from cirlab.models.dual_encoder import DualEncoderReranker, load_reranker, save_reranker
from cirlab.retrieval.similarity import dot_similarity
from cirlab.retrieval.topk import TopK, load_topk, save_topk, topk_from_similarity


class RerankConfig(Strict):
    name: Literal["rerank"] = "rerank"
    stage: Literal["filter", "reranker"] = "filter"
    temperature: float = Field(0.07, gt=0, description="filter: initial value of the learnable temperature")
    max_text_length: int = 77
    topk_depths: list[int] = Field([10, 20, 50, 100, 200], description="filter eval: print R@K at these K")
    export_k: int = Field(200, gt=0, description="filter eval: K of the exported top-K file")
    k: int = Field(50, gt=0, description="re-ranking depth (official: FashionIQ 100, CIRR 50)")
    eval_ks: list[int] | None = Field(None, description="reranker eval: rows for several K in one scoring pass")
    merge: Literal["official", "average"] = "official"
    fusion: bool = Field(False, description="also report stage-II score + fusion_weight x stage-I cosine")
    fusion_weight: float = 1.0
    reranker_init: str | None = Field(None, description="BLIP folder whose text encoder initialises the "
                                      "re-ranker (official: the pretrained BLIP); None: model.backbone")
    reranker: str | None = Field(None, description="reranker eval: the exported reranker folder")
    topk: str | None = Field(None, description="reranker eval: re-rank this top-K file's lists")
    eval_queries: int | None = Field(None, gt=0, description="evaluate the first N queries only (CPU budget)")
    chunk_size: int = Field(256, gt=0, description="(query, candidate) pairs per re-ranker call")
    gradient_checkpointing: bool = False
    stage1_train_mode: bool = False


# -- stage I: the grounded query against vision_proj(CLS) ------------------------------------------


def grounded_states(backbone: BlipBackbone, texts: list[str], ref_tokens: torch.Tensor,
                    max_length: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(last hidden state, input ids, attention mask)`` of the grounded encoder on (reference, text)."""
    enc = backbone.tokenize(texts, max_length=max_length)
    ids, mask = enc.input_ids.to(ref_tokens.device), enc.attention_mask.to(ref_tokens.device)
    return backbone.encode_grounded(ids, mask, ref_tokens), ids, mask


def grounded_query(backbone: BlipBackbone, texts: list[str], ref_tokens: torch.Tensor, max_length: int) -> torch.Tensor:
    """normalize(text_proj([ENC] state)): the filter's query feature."""
    states, _, _ = grounded_states(backbone, texts, ref_tokens, max_length)
    return F.normalize(backbone.text_proj(states[:, 0]), dim=-1)


def gallery_features(backbone: BlipBackbone, tokens: torch.Tensor) -> torch.Tensor:
    """normalize(vision_proj(CLS token)) from cached tokens (vision_proj trains in stage I); only
    ``tokens[:, 0]`` is read, so callers gather ``RowTable.first()``."""
    return F.normalize(backbone.vision_proj(tokens[:, 0].to(backbone.dtype)), dim=-1)


class FilterStage(nn.Module):
    """Stage I: text encoder, projections and temperature train; the image tower is frozen."""

    def __init__(self, backbone: BlipBackbone, tokens: RowTable, cfg: RerankConfig):
        super().__init__()
        self.backbone, self.cfg, self.tokens = backbone, cfg, tokens  # not a buffer: it stays on disk
        backbone.requires_grad_(False)
        for part in (backbone.text_encoder, backbone.text_proj, backbone.vision_proj):
            part.requires_grad_(True)
        self.temp = nn.Parameter(torch.tensor(cfg.temperature))  # no clamp, as the official code

    def training_step(self, batch: dict) -> dict[str, torch.Tensor]:
        query = grounded_query(self.backbone, batch["text"], self.tokens[batch["reference"]], self.cfg.max_text_length)
        target = gallery_features(self.backbone, self.tokens.first()[batch["target"]])
        loss = diagonal_ce(query @ target.T / self.temp)
        return {"loss": loss, "temp": self.temp.detach()}


@torch.no_grad()
def filter_similarity(backbone: BlipBackbone, split: CIRSplit, tokens: RowTable, rows: dict[str, int],
                      cfg: RerankConfig, batch_size: int = 256) -> torch.Tensor:
    """(Q, N) stage-I cosine similarities of the split's queries against its gallery."""
    was_training = backbone.training
    backbone.eval()
    tokens = tokens.to(backbone.device)
    gallery = gallery_features(backbone, tokens.first()[[rows[i] for i in split.gallery]])
    sims = []
    for s in range(0, len(split.queries), batch_size):
        chunk = split.queries[s:s + batch_size]
        query = grounded_query(backbone, [default_text(q, False) for q in chunk],
                               tokens[[rows[q.reference] for q in chunk]], cfg.max_text_length)
        sims.append(dot_similarity(query, gallery))
    backbone.train(was_training)
    return torch.cat(sims)


def export_topk(split: CIRSplit, sim: torch.Tensor, k: int, fingerprint: str = "") -> TopK:
    """The top-K file content of a stage-I similarity (reference excluded where the protocol says);
    ``fingerprint`` names the filter in the file (hashing its weights is only worth it for a file)."""
    exclude = None
    if split.exclude_reference:
        index = index_split(split, require_targets=False)
        exclude = [j if j >= 0 else None for j in index.exclude.tolist()]
    available = len(split.gallery) - int(exclude is not None)
    return topk_from_similarity(sim, [q.qid for q in split.queries], split.gallery, min(k, available),
                                exclude=exclude, dataset=split.dataset, split=split.name,
                                backbone=fingerprint)


# -- stage II: the dual-encoder re-ranker -------------------------------------------------------------


class RerankerStage(nn.Module):
    """Stage II: only the re-ranker trains; z_t comes from the frozen filter."""

    def __init__(self, reranker: DualEncoderReranker, filter_backbone: BlipBackbone, tokens: RowTable,
                 cfg: RerankConfig, backbone_path: str | None = None):
        super().__init__()
        self.reranker, self.filter, self.cfg, self.backbone_path = reranker, filter_backbone, cfg, backbone_path
        self.tokens = tokens  # not a buffer: it stays on disk, batches gather their rows
        filter_backbone.requires_grad_(False)
        reranker.gradient_checkpointing = cfg.gradient_checkpointing

    def training_step(self, batch: dict) -> dict[str, torch.Tensor]:
        self.filter.train(self.cfg.stage1_train_mode)
        with torch.no_grad():
            z_t, ids, mask = grounded_states(self.filter, batch["text"], self.tokens[batch["reference"]],
                                             self.cfg.max_text_length)
        scores = self.reranker.pair_scores(z_t, ids, mask, self.tokens[batch["target"]], chunk_size=self.cfg.chunk_size)
        return {"loss": diagonal_ce(scores)}


@torch.no_grad()
def rerank_scores(reranker: DualEncoderReranker, filter_backbone: BlipBackbone, split: CIRSplit,
                  tokens: RowTable, rows: dict[str, int], candidates: torch.Tensor,
                  cfg: RerankConfig) -> torch.Tensor:
    """(Q, C) re-ranker scores of each query against its candidate gallery indices (Q, C);
    entries where the index is -1 (padding) are -inf. Many queries per call."""
    reranker.eval()
    filter_backbone.eval()
    tokens = tokens.to(filter_backbone.device)
    gallery_rows = torch.tensor([rows[i] for i in split.gallery], device=tokens.device)
    per_call = max(1, cfg.chunk_size // max(1, candidates.shape[1]))
    out = []
    for s in range(0, len(split.queries), per_call):
        chunk = split.queries[s:s + per_call]
        cand = candidates[s:s + per_call].to(tokens.device)
        z_t, ids, mask = grounded_states(filter_backbone, [default_text(q, False) for q in chunk],
                                         tokens[[rows[q.reference] for q in chunk]], cfg.max_text_length)
        scores = reranker.topk_scores(z_t, ids, mask, tokens[gallery_rows[cand.clamp_min(0)]],
                                      chunk_size=cfg.chunk_size)
        out.append(scores.float().masked_fill(cand < 0, float("-inf")))
    return torch.cat(out)


def reranked_similarity(sim: torch.Tensor, candidates: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """``sim`` with each row's candidates (the top K) given their new scores and lifted above every
    other entry, which keeps its stage-I order below them."""
    valid = candidates >= 0
    finite = sim[torch.isfinite(sim)]
    top = scores[valid & torch.isfinite(scores)]
    floor = (top.min() if top.numel() else sim.new_tensor(0.0)) - 1
    out = sim - (finite.max() if finite.numel() else 0) + floor
    rows = torch.arange(len(sim))[:, None].expand_as(candidates)
    out[rows[valid], candidates[valid].long()] = scores[valid]
    return out


def _candidates(split: CIRSplit, sim: torch.Tensor, k: int, cfg: RerankConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(gallery indices (Q, k), stage-I scores (Q, k)): from ``method.topk`` when given, else from ``sim``."""
    if cfg.topk is None:
        topk = export_topk(split, sim, k)
    else:
        topk = load_topk(cfg.topk)
        qids = [q.qid for q in split.queries]
        if topk.query_ids[:len(qids)] != qids or topk.gallery_ids != split.gallery:
            raise ValueError(f"{cfg.topk}: its queries/gallery are not those of {split.name} "
                             f"(file: {topk.split}, {len(topk.query_ids)} queries)")
        if topk.k < k:
            raise ValueError(f"{cfg.topk}: holds the top {topk.k}, re-ranking asks for k={k}")
    q = len(split.queries)
    return topk.indices[:q, :k].long(), topk.scores[:q, :k]


def _subset_candidates(split: CIRSplit) -> torch.Tensor | None:
    """(Q, S) gallery indices of each query's subset members without its reference, -1 padded."""
    index = index_split(split, require_targets=False)
    if index.members is None:
        return None
    members = index.members.clone()
    members[(members == index.exclude[:, None])] = -1
    return members


def _first_queries(split: CIRSplit, n: int | None) -> CIRSplit:
    if n is None or n >= len(split.queries):
        return split
    return dataclasses.replace(split, queries=split.queries[:n], name=f"{split.name}[:{n}]")


def rerank_rows(reranker: DualEncoderReranker, filter_backbone: BlipBackbone, split: CIRSplit,
                tokens: RowTable, rows: dict[str, int], cfg: RerankConfig,
                batch_size: int = 256) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
    """``{row name: (similarity, subset similarity)}``: ``stage1`` and ``rerank@K`` for each K (and
    ``rerank@K+fusion``). The top max(K) is scored once; a smaller K re-sorts its first K."""
    sim = filter_similarity(filter_backbone, split, tokens, rows, cfg, batch_size)
    ks = sorted(set(cfg.eval_ks or [cfg.k]))
    cand, stage1 = _candidates(split, sim, max(ks), cfg)
    scores = rerank_scores(reranker, filter_backbone, split, tokens, rows, cand, cfg)
    members = _subset_candidates(split)
    member_scores = None
    if members is not None:
        member_scores = rerank_scores(reranker, filter_backbone, split, tokens, rows, members, cfg)
        member_stage1 = sim.gather(1, members.clamp_min(0))
    out = {"stage1": (sim, None)}
    variants = [("", 0.0)] + ([("+fusion", cfg.fusion_weight)] if cfg.fusion else [])
    for suffix, w in variants:
        subset = None
        if members is not None:
            fused = member_scores + w * member_stage1
            subset = torch.full_like(sim, float("-inf"))
            valid = members >= 0
            subset[torch.arange(len(sim))[:, None].expand_as(members)[valid], members[valid]] = fused[valid]
        for k in ks:
            new = reranked_similarity(sim, cand[:, :k], scores[:, :k] + w * stage1[:, :k])
            out[f"rerank@{k}{suffix}"] = (new, subset)
    return out


# -- the method interface (cirlab train / eval) ------------------------------------------------------


def _filter_backbone(backbone: Backbone) -> BlipBackbone:
    if not isinstance(backbone, BlipBackbone):
        raise ValueError("method rerank: needs a BLIP backbone (model.kind: blip)")
    return backbone


def _triplets(cfg: ExperimentConfig, backbone: Backbone):
    splits = method_splits(cfg, cfg.data.train_split)
    table, rows = image_table(backbone, splits, cfg, triplet_ids, tokens=True)
    text = lambda q: default_text(q, True)  # noqa: E731
    datasets = [FeatureTriplets(s, rows, text) for s in splits]
    return table["tokens"], (datasets[0] if len(datasets) == 1 else torch.utils.data.ConcatDataset(datasets))


def build(cfg: ExperimentConfig):
    """Model, training data and validation callback of one stage."""
    rcfg = validate(RerankConfig, cfg.method, "method")
    if not cfg.model.backbone:
        raise ValueError("method rerank: model.backbone must name a BLIP folder "
                         "(stage filter: the pretrained BLIP; stage reranker: the filter export)")
    backbone = _filter_backbone(load_backbone(cfg.model.backbone, kind=cfg.model.kind))
    tokens, train_data = _triplets(cfg, backbone)
    val_splits = [_first_queries(s, rcfg.eval_queries) for s in method_splits(cfg, cfg.data.val_split)]
    val_tables = [image_table(backbone, [s], cfg, tokens=True) for s in val_splits]

    if rcfg.stage == "filter":
        model: nn.Module = FilterStage(backbone, tokens, rcfg)

        def evaluate(m: nn.Module) -> dict[str, float]:
            out: dict[str, float] = {}
            for split, (table, rows) in zip(val_splits, val_tables):
                sim = filter_similarity(m.backbone, split, table["tokens"], rows, rcfg, cfg.evaluation.batch_size)
                out.update(_prefixed(split, val_splits, {**evaluate_similarity(split, sim),
                                                        **recall_at_depths(split, sim, rcfg.topk_depths)}))
            return out
    else:
        init = load_backbone(rcfg.reranker_init, kind="blip") if rcfg.reranker_init else backbone
        reranker = DualEncoderReranker.from_text_encoder(_filter_backbone(init).text_encoder,
                                                         enc_token_id=backbone.enc_token_id, merge=rcfg.merge)
        model = RerankerStage(reranker, backbone, tokens, rcfg, backbone_path=cfg.model.backbone)

        def evaluate(m: nn.Module) -> dict[str, float]:
            out: dict[str, float] = {}
            for split, (table, rows) in zip(val_splits, val_tables):
                results = rerank_rows(m.reranker, m.filter, split, table["tokens"], rows, rcfg, cfg.evaluation.batch_size)
                sim, subset = results[f"rerank@{rcfg.k}"]
                out.update(_prefixed(split, val_splits, evaluate_similarity(split, sim, subset)))
            return out

    return model, train_data, evaluate


def _prefixed(split: CIRSplit, splits: list[CIRSplit], metrics: dict[str, float]) -> dict[str, float]:
    """FashionIQ's categories each keep their own keys during training evaluation."""
    if len(splits) == 1:
        return metrics
    return {f"{split.name}/{k}": v for k, v in metrics.items()}


def export(model: nn.Module, run) -> Path:
    """Stage I: the fine-tuned BLIP folder; stage II: the re-ranker folder (names its filter backbone)."""
    if isinstance(model, FilterStage):
        return save_backbone(model.backbone, run.path / "backbone")
    return save_reranker(model.reranker, run.path / "reranker", backbone=model.backbone_path)


def _eval_inputs(cfg: ExperimentConfig, backbone: Backbone, split: CIRSplit):
    rcfg = validate(RerankConfig, cfg.method, "method")
    backbone = _filter_backbone(backbone)
    split = _first_queries(split, rcfg.eval_queries)
    table, rows = image_table(backbone, [split], cfg, tokens=True)
    return rcfg, backbone, split, table["tokens"], rows


def _load_reranker(rcfg: RerankConfig) -> DualEncoderReranker:
    if not rcfg.reranker:
        raise ValueError("method.reranker: stage reranker needs the exported reranker folder of a stage-II run")
    return load_reranker(rcfg.reranker)[0]  # its merge mode is the one it was trained with


def _similarities(cfg: ExperimentConfig, backbone: Backbone, split: CIRSplit,
                  out: Path | None) -> tuple[CIRSplit, dict[str, tuple[torch.Tensor, torch.Tensor | None]]]:
    rcfg, backbone, split, tokens, rows = _eval_inputs(cfg, backbone, split)
    if rcfg.stage == "filter":
        sim = filter_similarity(backbone, split, tokens, rows, rcfg, cfg.evaluation.batch_size)
        if out is not None:
            path = Path(out) / f"topk_{split.name.replace('/', '_')}.pt"
            save_topk(path, export_topk(split, sim, rcfg.export_k, backbone.fingerprint()))
            print(f"top-{min(rcfg.export_k, len(split.gallery))} candidates: {path}")
        return split, {"filter": (sim, None)}
    return split, rerank_rows(_load_reranker(rcfg), backbone, split, tokens, rows, rcfg, cfg.evaluation.batch_size)


def evaluate(cfg: ExperimentConfig, backbone: Backbone, split: CIRSplit,
             out: Path | None = None) -> dict[str, dict[str, float]]:
    """``cirlab eval``: stage filter scores the grounded query (``model.backbone``: a filter export)
    and writes the top-K file into ``out``; stage reranker also loads ``method.reranker``."""
    rcfg = validate(RerankConfig, cfg.method, "method")
    split, sims = _similarities(cfg, backbone, split, out)
    results = {name: evaluate_similarity(split, sim, subset) for name, (sim, subset) in sims.items()}
    if rcfg.stage == "filter":
        results["filter"].update(recall_at_depths(split, sims["filter"][0], rcfg.topk_depths))
    return results


def predict(cfg: ExperimentConfig, backbone: Backbone, split: CIRSplit,
            out: Path | None = None) -> dict[str, tuple[dict[str, list[str]], dict[str, list[str]] | None]]:
    """Rankings of a split without targets (CIRR test1): ``{row: (ranked, subset ranked)}``."""
    split, sims = _similarities(cfg, backbone, split, out)
    result = {}
    for name, (sim, subset) in sims.items():
        ranked, subset_ranked = rankings_from_similarity(split, sim)
        if subset is not None:
            subset_ranked = rankings_from_similarity(split, subset)[1]
        result[name] = (ranked, subset_ranked)
    return result
