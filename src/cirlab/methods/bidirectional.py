"""Bi-directional training (Bi-BLIP4CIR): direction tokens, stage I and stage II.

A query's text carries a direction token: ``[FORWARD] text`` asks for reference -> target,
``[BACKWARD] text`` for target -> reference. Both stages train on the forward queries and on
reversed ones, "target + backward text -> reference", with the official negative sampling:
for a fixed reference R_i and backward text t_i the softmax runs over every in-batch target
T_j (:func:`~cirlab.training.losses.reversed_sum_logits`, :meth:`Combiner.pair_logits`).

* stage ``text`` (I): fine-tune the BLIP text encoder and ``text_proj``; the image encoder is
  frozen and its features come from the feature cache. Query = normalize(R + t)
  (:class:`~cirlab.composers.SumComposer`).
* stage ``combiner`` (II): the text encoder of stage I is frozen too (every training text is
  encoded once up front) and a CLIP4Cir Combiner learns to compose
  (:class:`~cirlab.composers.CombinerComposer`).

Direction modes (:func:`~cirlab.composers.with_direction`): ``tokens`` adds ``[FORWARD]``/
``[BACKWARD]`` as new tokens with learnable embeddings (the paper's "learnable token"); ``compat``
reproduces the official text prefix, which the BERT tokenizer splits into ``[``, ``forward``,
``]``; ``none`` adds nothing.
"""

from __future__ import annotations

from typing import Callable, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from cirlab.composers import BACKWARD, FORWARD, CombinerComposer, SumComposer, with_direction
from cirlab.config import ExperimentConfig, Strict
from cirlab.data.base import Query
from cirlab.data.torch_data import FeatureTriplets, default_text, training_forms
from cirlab.methods.common import (Stage, composer_stage, image_table, recipe_of,
                                   stage_backbone, training_splits, triplet_ids)
from cirlab.methods.stages import register_stage
from cirlab.models import Backbone, BlipBackbone, add_tokens
from cirlab.models.combiner import Combiner
from cirlab.training.losses import diagonal_ce, info_nce, reversed_sum_logits
from cirlab.utils.progress import progress


class BiConfig(Strict):
    name: Literal["bidirectional"] = "bidirectional"
    reverse_weight: float = Field(0.1, ge=0, description="w: loss = forward + w * reversed (0 = forward only)")
    direction: Literal["tokens", "compat", "none"] = "tokens"
    # shapes only: "reversed" trains the reversed queries on the generator's exact reversed text,
    # which is a forward instruction from target to reference, so it carries [FORWARD].
    backward_text: Literal["forward", "reversed"] = "forward"
    logit_scale: float = 100.0
    max_text_length: int = 77


class BiTextConfig(BiConfig):
    """Stage I: the text encoder and text_proj train."""

    stage: Literal["text"] = "text"
    text_proj_lr_scale: float = Field(100.0, description="text_proj lr = this x trainer lr, unscheduled")
    # The official clip_fine_tune.py L2-normalises the target features before they enter the
    # reversed query: normalize(normalize(T_j) + t_i). "raw" sums the unnormalised T_j instead
    # (cirlab's earlier behaviour, kept for comparison).
    reversed_target: Literal["normalized", "raw"] = "normalized"
    # The official reversed loss scores, for a fixed reference R_i and backward text t_i, every
    # in-batch target T_j: the text's pull toward R_i is the same in every column, so the loss can
    # only shorten the text (docs/methods/bidirectional.md). "references" (beyond the paper) scores
    # the reversed query normalize(T_i) + t_i against every in-batch reference R_k instead.
    reversed_negatives: Literal["targets", "references"] = "targets"


class BiCombinerConfig(BiConfig):
    """Stage II: the Combiner trains over frozen stage-I features."""

    stage: Literal["combiner"] = "combiner"
    projection_dim: int = 2560
    hidden_dim: int = 5120
    dropout: float = 0.5
    encode_batch_size: int = 256



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
    forms = training_forms(query)
    texts = [with_direction(t, True, cfg.direction) for t in forms]
    for form in forms:
        texts.append(backward_query_text(query, cfg, lambda q: form))
    return texts


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

    def training_step(self, batch: dict) -> dict[str, torch.Tensor]:
        ref, tgt = self.image_embeds[batch["reference"]], self.image_embeds[batch["target"]]
        forward = info_nce(ref + self.encode_text(batch["text"]), tgt, self.cfg.logit_scale)
        out = {"loss": forward, "loss_forward": forward.detach()}
        if self.cfg.reverse_weight > 0:
            back = self.encode_text(batch["back_text"])
            start = F.normalize(tgt, dim=-1) if self.cfg.reversed_target == "normalized" else tgt
            if self.cfg.reversed_negatives == "targets":
                logits = reversed_sum_logits(start, back, ref, self.cfg.logit_scale)
            else:  # [i, k] = scale * cos(T_i + t_i, R_k); a column showing R_i's image is not a negative
                logits = self.cfg.logit_scale * F.normalize(start + back, dim=-1) @ F.normalize(ref, dim=-1).T
            reverse = diagonal_ce(logits, batch["reference"])
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
                 text_rows: dict[str, int], cfg: BiConfig):
        super().__init__()
        self.combiner, self.cfg, self.text_rows = combiner, cfg, text_rows
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


# -- the method interface (cirlab train) -------------------------------------------------------------


def _training_draw(query: Query) -> str:
    return default_text(query, True)  # FashionIQ: a random form; the backward one is an independent draw


def _training_data(cfg: ExperimentConfig, composer: SumComposer):
    """The training splits, the cached image embeddings (rows by id) of the stage's composer and the
    triplet dataset."""
    bcfg = cfg.method
    train_splits = training_splits(cfg)
    table, rows = image_table(composer, train_splits, cfg, triplet_ids)
    embeds = table["embeds"]
    back = (lambda q: backward_query_text(q, bcfg, _training_draw)) if bcfg.reverse_weight > 0 else None
    forward = lambda q: with_direction(_training_draw(q), True, bcfg.direction)  # noqa: E731
    datasets = [FeatureTriplets(s, rows, forward, back) for s in train_splits]
    train_data = datasets[0] if len(datasets) == 1 else torch.utils.data.ConcatDataset(datasets)
    return train_splits, embeds, train_data


@register_stage("bidirectional", "text", config=BiTextConfig, default=True)
def build_text(cfg: ExperimentConfig) -> Stage:
    """Stage I: the text encoder trains with forward and reversed queries over cached image embeddings."""
    backbone = prepare_backbone(stage_backbone(cfg, "method bidirectional"), cfg.method)
    recipe = recipe_of(cfg, cfg.method)
    _, embeds, train_data = _training_data(cfg, SumComposer(backbone, recipe))
    model = TextStage(backbone, embeds, cfg.method, lr=cfg.trainer.optimizer.lr)
    return composer_stage(cfg, model, train_data, lambda m: SumComposer(m.backbone, recipe),
                          param_groups=model.param_groups())


@register_stage("bidirectional", "combiner", config=BiCombinerConfig)
def build_combiner(cfg: ExperimentConfig) -> Stage:
    """Stage II: the Combiner over the frozen stage-I backbone's image and text features."""
    bcfg = cfg.method
    backbone = prepare_backbone(stage_backbone(cfg, "method bidirectional"), bcfg)
    recipe = recipe_of(cfg, bcfg)
    # the Combiner's image side is stage I's: the same cached embeddings as the sum composer's
    train_splits, embeds, train_data = _training_data(cfg, SumComposer(backbone, recipe))
    backbone.requires_grad_(False)
    texts = list(dict.fromkeys(t for s in train_splits for q in s.queries for t in training_texts(q, bcfg)))
    feats = encode_texts(backbone, texts, batch_size=bcfg.encode_batch_size, max_length=bcfg.max_text_length,
                         desc="encoding training texts")
    combiner = Combiner(backbone.embed_dim, bcfg.projection_dim, bcfg.hidden_dim, dropout=bcfg.dropout)
    combiner.logit_scale = bcfg.logit_scale
    model = CombinerStage(combiner, embeds, feats, _rows(texts), bcfg)
    # the frozen backbone is not part of the stage module: it follows the Combiner to its device
    return composer_stage(cfg, model, train_data, lambda m: CombinerComposer(
        backbone.to(m.text_feats.device), recipe, m.combiner))
