"""Bi-directional training (Bi-BLIP4CIR, REFERENCE 1): direction tokens, stage I and stage II.

A query's text carries a direction token: ``[FORWARD] text`` asks for reference -> target,
``[BACKWARD] text`` for target -> reference. Both stages train on the forward queries and on
reversed ones, "target + backward text -> reference", with the official negative sampling:
for a fixed reference R_i and backward text t_i the softmax runs over every in-batch target
T_j (:func:`~cirlab.training.losses.reversed_sum_logits`, :meth:`Combiner.pair_logits`).

* stage ``text`` (I): fine-tune the BLIP text encoder and ``text_proj``; the image encoder is
  frozen and its features come from the feature cache. Query = normalize(R + t).
* stage ``combiner`` (II): the text encoder of stage I is frozen too (every training text is
  encoded once up front) and a CLIP4Cir Combiner learns to compose.

Direction modes: ``tokens`` adds ``[FORWARD]``/``[BACKWARD]`` as new tokens with learnable
embeddings (the paper's "learnable token"); ``compat`` reproduces the official text prefix,
which the BERT tokenizer splits into ``[``, ``forward``, ``]`` and which is prepended to every
chunk of the text split on the substring "and" (inside words too); ``none`` adds nothing.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Callable, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from cirlab.config import ExperimentConfig, Strict, validate
from cirlab.data.base import CIRSplit, Query
from cirlab.data.fashioniq import fiq_train_forms
from cirlab.data.torch_data import FeatureTriplets, default_text
from cirlab.evaluation.protocols import combine_splits, evaluate_similarity
from cirlab.evaluation.submission import rankings_from_similarity
from cirlab.methods.common import diagonal_ce, image_table, method_splits, triplet_ids
from cirlab.models import Backbone, BlipBackbone, add_tokens, load_backbone, save_backbone
from cirlab.models.combiner import Combiner, load_combiner, save_combiner
from cirlab.retrieval.similarity import dot_similarity
from cirlab.training.losses import info_nce, reversed_sum_logits
from cirlab.utils.progress import progress

FORWARD, BACKWARD = "[FORWARD]", "[BACKWARD]"


class BiConfig(Strict):
    name: Literal["bidirectional"] = "bidirectional"
    stage: Literal["text", "combiner"] = "text"
    reverse_weight: float = Field(0.1, ge=0, description="w: loss = forward + w * reversed (0 = forward only)")
    direction: Literal["tokens", "compat", "none"] = "tokens"
    # shapes only: "reversed" trains the reversed queries on the generator's exact reversed text,
    # which is a forward instruction from target to reference, so it carries [FORWARD].
    backward_text: Literal["forward", "reversed"] = "forward"
    logit_scale: float = 100.0
    text_proj_lr_scale: float = Field(100.0, description="stage I: text_proj lr = this x trainer lr, unscheduled")
    max_text_length: int = 77
    # stage II
    projection_dim: int = 2560
    hidden_dim: int = 5120
    dropout: float = 0.5
    combiner: str | None = Field(None, description="cirlab eval of stage II: the run's exported combiner folder")
    encode_batch_size: int = 256


def with_direction(text: str, forward: bool, mode: str) -> str:
    """``text`` with its direction marker in the given mode (see the module docstring)."""
    token = FORWARD if forward else BACKWARD
    if mode == "tokens":
        return f"{token} {text}"
    if mode == "compat":  # the official __prepend_text__
        return "and".join(f" {token} {chunk}" for chunk in text.split("and"))
    return text


def backward_query_text(query: Query, cfg: BiConfig, draw: Callable[[Query], str]) -> str:
    """The text of the reversed query (target -> reference), direction marker included."""
    if cfg.backward_text == "reversed":
        if "caption_reversed" not in query.extra:
            raise ValueError(f"method.backward_text: reversed needs the generator's reversed captions (shapes); "
                             f"query {query.qid} has none")
        return with_direction(query.extra["caption_reversed"], True, cfg.direction)
    return with_direction(draw(query), False, cfg.direction)


def training_texts(query: Query, cfg: BiConfig) -> list[str]:
    """Every text a training draw can produce for ``query``, forward and backward (stage II
    encodes them all once)."""
    forms = fiq_train_forms(query.captions) if len(query.captions) > 1 else query.captions
    texts = [with_direction(t, True, cfg.direction) for t in forms]
    for form in forms:
        texts.append(backward_query_text(query, cfg, lambda q: form))
    return texts


def reversed_split(split: CIRSplit) -> CIRSplit:
    """Backward retrieval on shapes: query = (target image, forward text), answer = the reference.

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
                     subset=q.subset, extra={**q.extra, "caption": q.captions[0]})
               for q in split.queries]
    return CIRSplit(dataset=split.dataset, split=split.split, queries=queries, gallery=split.gallery,
                    image_paths=split.image_paths, exclude_reference=split.exclude_reference,
                    name=f"{split.name}/backward")


@torch.no_grad()
def encode_texts(backbone: Backbone, texts: list[str], *, batch_size: int = 256, max_length: int = 77,
                 desc: str | None = None) -> torch.Tensor:
    """Unnormalised text features (text-only mode) of ``texts``, in eval mode."""
    was_training = backbone.training
    backbone.eval()
    out = []
    starts = range(0, len(texts), batch_size)
    for s in progress(starts, desc=desc) if desc else starts:
        enc = backbone.tokenize(texts[s:s + batch_size], max_length=max_length)
        out.append(backbone.encode_text(enc.input_ids, enc.attention_mask).float())
    backbone.train(was_training)
    return torch.cat(out) if out else torch.empty(0, backbone.embed_dim)


def prepare_backbone(backbone: Backbone, cfg: BiConfig) -> Backbone:
    """Check the backbone and give it the direction tokens (a no-op for a stage-I export)."""
    if not isinstance(backbone, BlipBackbone):
        raise ValueError("method bidirectional: needs a BLIP backbone (model.kind: blip)")
    if cfg.direction == "tokens":
        add_tokens(backbone, [FORWARD, BACKWARD])
    return backbone


def _rows(ids: list[str]) -> dict[str, int]:
    return {i: k for k, i in enumerate(ids)}


class TextStage(nn.Module):
    """Stage I: the text encoder and ``text_proj`` train, everything else is frozen."""

    def __init__(self, backbone: BlipBackbone, image_embeds: torch.Tensor, cfg: BiConfig, lr: float = 0.0):
        super().__init__()
        self.backbone, self.cfg, self.lr = backbone, cfg, lr
        backbone.requires_grad_(False)
        backbone.text_encoder.requires_grad_(True)
        backbone.text_proj.requires_grad_(True)
        self.register_buffer("image_embeds", image_embeds, persistent=False)

    def encode_text(self, texts: list[str]) -> torch.Tensor:
        enc = self.backbone.tokenize(texts, max_length=self.cfg.max_text_length)
        return self.backbone.encode_text(enc.input_ids, enc.attention_mask)

    def compose(self, reference: torch.Tensor, texts: list[str]) -> torch.Tensor:
        """normalize(R + t): BLIP4CIR's element-wise sum of unnormalised features."""
        return F.normalize(reference + self.encode_text(texts), dim=-1)

    def training_step(self, batch: dict) -> dict[str, torch.Tensor]:
        ref, tgt = self.image_embeds[batch["reference"]], self.image_embeds[batch["target"]]
        forward = info_nce(ref + self.encode_text(batch["text"]), tgt, self.cfg.logit_scale)
        out = {"loss": forward, "loss_forward": forward.detach()}
        if self.cfg.reverse_weight > 0:
            back = self.encode_text(batch["back_text"])
            reverse = diagonal_ce(reversed_sum_logits(tgt, back, ref, self.cfg.logit_scale))
            out.update(loss=forward + self.cfg.reverse_weight * reverse, loss_reversed=reverse.detach())
        return out

    def param_groups(self) -> list[dict]:
        """The official two groups: the text encoder on the schedule, ``text_proj`` at
        ``text_proj_lr_scale`` x lr and outside it (``onlyGroup0=True``)."""
        return [{"params": list(self.backbone.text_encoder.parameters())},
                {"params": list(self.backbone.text_proj.parameters()), "lr": self.lr * self.cfg.text_proj_lr_scale,
                 "scheduled": False}]


class CombinerStage(nn.Module):
    """Stage II: only the Combiner trains; image and text features are looked up in tables
    computed once (the text encoder is frozen, so on-the-fly encoding would give the same)."""

    def __init__(self, combiner: Combiner, image_embeds: torch.Tensor, text_feats: torch.Tensor,
                 text_rows: dict[str, int], cfg: BiConfig, backbone_path: str | None = None):
        super().__init__()
        self.combiner, self.cfg, self.text_rows, self.backbone_path = combiner, cfg, text_rows, backbone_path
        self.register_buffer("image_embeds", image_embeds, persistent=False)
        self.register_buffer("text_feats", text_feats, persistent=False)

    def _texts(self, texts: list[str]) -> torch.Tensor:
        return self.text_feats[[self.text_rows[t] for t in texts]]

    def training_step(self, batch: dict) -> dict[str, torch.Tensor]:
        ref, tgt = self.image_embeds[batch["reference"]], self.image_embeds[batch["target"]]
        forward = info_nce(self.combiner(ref, self._texts(batch["text"])), tgt, self.cfg.logit_scale)
        out = {"loss": forward, "loss_forward": forward.detach()}
        if self.cfg.reverse_weight > 0:
            reverse = diagonal_ce(self.combiner.pair_logits(tgt, self._texts(batch["back_text"]), ref))
            out.update(loss=forward + self.cfg.reverse_weight * reverse, loss_reversed=reverse.detach())
        return out


# -- evaluation -------------------------------------------------------------------------------------

Compose = Callable[[torch.Tensor, list[str]], torch.Tensor]


@torch.no_grad()
def composed_similarity(compose: Compose, split: CIRSplit, embeds: torch.Tensor, rows: dict[str, int], *,
                        forward: bool, cfg: BiConfig, batch_size: int = 256) -> torch.Tensor:
    """(Q, N) similarities of queries composed by ``compose(reference embeds, texts)`` to the
    normalised gallery embeddings. ``forward=False`` marks the texts as backward (backward retrieval)."""
    gallery = F.normalize(embeds[[rows[i] for i in split.gallery]], dim=-1)
    queries = []
    for s in range(0, len(split.queries), batch_size):
        chunk = split.queries[s:s + batch_size]
        texts = [backward_query_text(q, cfg, lambda q: default_text(q, False)) if not forward
                 else with_direction(default_text(q, False), True, cfg.direction) for q in chunk]
        queries.append(compose(embeds[[rows[q.reference] for q in chunk]].to(gallery.device), texts))
    return dot_similarity(torch.cat(queries), gallery)


def evaluate_composed(compose: Compose, split: CIRSplit, embeds: torch.Tensor, rows: dict[str, int], *,
                      forward: bool, cfg: BiConfig, batch_size: int = 256) -> dict[str, float]:
    return evaluate_similarity(split, composed_similarity(compose, split, embeds, rows, forward=forward, cfg=cfg,
                                                          batch_size=batch_size))


def evaluate_rows(compose: Compose, splits: list[CIRSplit], embeds: torch.Tensor, rows: dict[str, int],
                  cfg: BiConfig, batch_size: int) -> dict[str, dict[str, float]]:
    """``{"forward": metrics}`` plus, on shapes, ``{"backward": ...}`` (target + backward text
    -> reference), which shows whether the reverse direction was learned."""
    out = {"forward": combine_splits(splits, [evaluate_composed(compose, s, embeds, rows, forward=True, cfg=cfg,
                                                                batch_size=batch_size) for s in splits])}
    if splits[0].dataset == "shapes":
        out["backward"] = evaluate_composed(compose, reversed_split(splits[0]), embeds, rows, forward=False,
                                            cfg=cfg, batch_size=batch_size)
    return out


# -- the method interface (cirlab train / eval) ------------------------------------------------------


def _training_draw(query: Query) -> str:
    return default_text(query, True)  # FashionIQ: a random form; the backward one is an independent draw


def build(cfg: ExperimentConfig):
    """Model, training data and validation callback of one stage."""
    bcfg = validate(BiConfig, cfg.method, "method")
    if not cfg.model.backbone:
        raise ValueError("method bidirectional: model.backbone must name a BLIP folder "
                         "(stage text: the pretrained BLIP; stage combiner: the stage-I export)")
    backbone = prepare_backbone(load_backbone(cfg.model.backbone, kind=cfg.model.kind), bcfg)
    train_splits = method_splits(cfg, cfg.data.train_split)
    val_splits = method_splits(cfg, cfg.data.val_split)
    table, rows = image_table(backbone, train_splits, cfg, triplet_ids)
    embeds = table["embeds"]
    val_table, val_rows = image_table(backbone, val_splits, cfg)
    val_embeds = val_table["embeds"]
    back = (lambda q: backward_query_text(q, bcfg, _training_draw)) if bcfg.reverse_weight > 0 else None
    forward = lambda q: with_direction(_training_draw(q), True, bcfg.direction)  # noqa: E731
    datasets = [FeatureTriplets(s, rows, forward, back) for s in train_splits]
    train_data = datasets[0] if len(datasets) == 1 else torch.utils.data.ConcatDataset(datasets)

    if bcfg.stage == "text":
        model: nn.Module = TextStage(backbone, embeds, bcfg, lr=cfg.trainer.optimizer.lr)
        compose: Callable[[nn.Module], Compose] = lambda m: m.compose  # noqa: E731
    else:
        backbone.requires_grad_(False)
        texts = list(dict.fromkeys(t for s in train_splits for q in s.queries for t in training_texts(q, bcfg)))
        feats = encode_texts(backbone, texts, batch_size=bcfg.encode_batch_size, max_length=bcfg.max_text_length,
                             desc="encoding training texts")
        combiner = Combiner(backbone.embed_dim, bcfg.projection_dim, bcfg.hidden_dim, dropout=bcfg.dropout)
        combiner.logit_scale = bcfg.logit_scale
        model = CombinerStage(combiner, embeds, feats, _rows(texts), bcfg, backbone_path=cfg.model.backbone)

        def compose(m: nn.Module) -> Compose:
            return lambda ref, texts: m.combiner(ref, encode_texts(backbone, texts, max_length=bcfg.max_text_length))

    def evaluate(m: nn.Module) -> dict[str, float]:
        rows_ = evaluate_rows(compose(m), val_splits, val_embeds, val_rows, bcfg, cfg.evaluation.batch_size)
        return {**rows_["forward"], **{f"backward/{k}": v for k, v in rows_.get("backward", {}).items()}}

    return model, train_data, evaluate


def export(model: nn.Module, run) -> Path:
    """Stage I: the fine-tuned backbone (HF folder with the direction tokens); stage II: the
    Combiner (weights + sizes + the backbone it composes). Either loads without training code."""
    if isinstance(model, TextStage):
        return save_backbone(model.backbone, run.path / "backbone")
    return save_combiner(model.combiner, run.path / "combiner", backbone=model.backbone_path)


def _eval_compose(cfg: ExperimentConfig, backbone: Backbone, split: CIRSplit):
    bcfg = validate(BiConfig, cfg.method, "method")
    backbone = prepare_backbone(backbone, bcfg)
    table, rows = image_table(backbone, [split], cfg)
    embeds = table["embeds"]
    if bcfg.stage == "text":
        compose = TextStage(backbone, embeds, bcfg).eval().compose
    else:
        if not bcfg.combiner:
            raise ValueError("method.combiner: stage combiner needs the exported combiner folder of a stage-II run")
        combiner = load_combiner(bcfg.combiner).eval()
        compose = lambda ref, texts: combiner(ref, encode_texts(backbone, texts, max_length=bcfg.max_text_length))  # noqa: E731
    return bcfg, compose, embeds, rows


def evaluate(cfg: ExperimentConfig, backbone: Backbone, split: CIRSplit,
             out: Path | None = None) -> dict[str, dict[str, float]]:
    """``cirlab eval``: stage I scores normalize(R + t) with ``model.backbone`` (a stage-I export);
    stage II loads ``method.combiner`` too."""
    bcfg, compose, embeds, rows = _eval_compose(cfg, backbone, split)
    return evaluate_rows(compose, [split], embeds, rows, bcfg, cfg.evaluation.batch_size)


def predict(cfg: ExperimentConfig, backbone: Backbone, split: CIRSplit,
            out: Path | None = None) -> dict[str, tuple[dict[str, list[str]], dict[str, list[str]] | None]]:
    """Forward rankings of a split without targets (CIRR test1), for the submission files."""
    bcfg, compose, embeds, rows = _eval_compose(cfg, backbone, split)
    sim = composed_similarity(compose, split, embeds, rows, forward=True, cfg=bcfg, batch_size=cfg.evaluation.batch_size)
    return {"forward": rankings_from_similarity(split, sim)}
