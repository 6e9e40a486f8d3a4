"""Stage II of candidate re-ranking, the dual multi-modal encoder (Liu et al., Candidate Set
Re-ranking for Composed Image Retrieval with Dual Multi-modal Encoder; official code:
Cuberick-Orion/Candidate-Reranking-CIR).

Two streams run through one duplicated BLIP text encoder and both cross-attend to the candidate
image's tokens:
* branch 0 reads z_t, the frozen stage-I grounded encoder's last hidden state (reference image +
  text), in place of embeddings (no position embedding, no LayerNorm, as in the official code);
* branch 1 reads the text ids, [ENC] first, through the embeddings.

Every layer has per-branch self- and cross-attention (q/k/v, output dense, LayerNorm), duplicated
from the pretrained weights so both branches start identical, and one shared FFN. The branches meet
only in the cross-attention output: the two dense outputs are averaged in the first half of the
layers and mixed by a new Linear(2h -> h) in the second half (``merge="official"``; ``"average"``
averages everywhere); one dropout mask is applied to the merged value, which is then added to each
branch under its own LayerNorm. Score = cls_head(CLS_0 ++ CLS_1)[:, 0].

The layer maths is written here over the copied HF modules' weights with
``scaled_dot_product_attention`` (HF's eager softmax(q k^T / sqrt(d) + mask) v). That lets the
cross-attention keys/values of a candidate be projected once and shared by every query scored
against it (``image_index``): with 577 image tokens against ~30 text tokens, that projection is most
of the compute of the B x B training scores.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import BlipTextConfig
from transformers.models.blip.modeling_blip_text import (
    BlipTextAttention,
    BlipTextEmbeddings,
    BlipTextIntermediate,
    BlipTextModel,
    BlipTextOutput,
)

from .heads import read_head, save_head

Merge = Literal["official", "average"]


def _key_mask(mask: torch.Tensor | None) -> torch.Tensor | None:
    """(B, S) 1/0 padding mask -> (B, 1, 1, S) boolean "may attend" mask for SDPA."""
    return None if mask is None else mask[:, None, None, :].bool()


def _attend(block: BlipTextAttention, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
            mask: torch.Tensor | None, training: bool) -> torch.Tensor:
    """HF BlipTextAttention up to (and including) the output dense, before dropout/residual/LayerNorm.

    ``k`` and ``v`` are already projected, (B, S, h)."""
    n = block.self.num_attention_heads
    q, k, v = (t.unflatten(-1, (n, -1)).transpose(1, 2) for t in (block.self.query(x), k, v))
    p = block.self.dropout.p if training else 0.0
    ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
    return block.output.dense(ctx.transpose(1, 2).flatten(2))


class DualLayer(nn.Module):
    """One BLIP text layer with two attention branches, a cross-attention merge and a shared FFN."""

    def __init__(self, config: BlipTextConfig, merge_linear: bool):
        super().__init__()
        self.attention = nn.ModuleList(BlipTextAttention(config) for _ in range(2))
        self.crossattention = nn.ModuleList(BlipTextAttention(config, is_cross_attention=True) for _ in range(2))
        self.intermediate = BlipTextIntermediate(config)
        self.output = BlipTextOutput(config)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)  # one mask for the merged value, as official
        self.merge_layer = None
        if merge_linear:  # newly initialised as in the official code (BERT init: N(0, initializer_range), bias 0)
            h = config.hidden_size
            self.merge_layer = nn.Linear(2 * h, h)
            nn.init.normal_(self.merge_layer.weight, std=config.initializer_range)
            nn.init.zeros_(self.merge_layer.bias)

    def forward(self, h0: torch.Tensor, h1: torch.Tensor, mask: torch.Tensor | None, tokens: torch.Tensor,
                image_mask: torch.Tensor | None, image_index: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        hs = []
        for block, x in zip(self.attention, (h0, h1)):  # self-attention: separate, not merged
            d = _attend(block, x, block.self.key(x), block.self.value(x), mask, self.training)
            hs.append(block.output.LayerNorm(block.output.dropout(d) + x))
        dense = []
        for block, x in zip(self.crossattention, hs):
            k, v = block.self.key(tokens), block.self.value(tokens)
            if image_index is not None:  # project each candidate once, then gather per pair
                k, v = k[image_index], v[image_index]
            dense.append(_attend(block, x, k, v, image_mask, self.training))
        if self.merge_layer is None:
            merged = (dense[0] + dense[1]) / 2
        else:
            merged = self.merge_layer(torch.cat(dense, dim=-1))
        merged = self.dropout(merged)
        hs = [block.output.LayerNorm(merged + x) for block, x in zip(self.crossattention, hs)]
        return tuple(self.output(self.intermediate(x), x) for x in hs)


class DualEncoderReranker(nn.Module):
    """Candidate re-ranker: (z_t, text, candidate image tokens) -> (B, 2) logits; score = logit 0.

    Build it from a pretrained BLIP text encoder with :meth:`from_text_encoder`; the constructor
    makes the same structure with random weights (to load a saved state dict into).
    ``input_ids`` are the plain tokenizer ids: the module puts ``enc_token_id`` first itself, like
    ``BlipBackbone.encode_grounded``. Set ``gradient_checkpointing = True`` to recompute each layer
    in the backward pass (training at BLIP-base size)."""

    def __init__(self, config: BlipTextConfig, *, enc_token_id: int, merge: Merge = "official"):
        super().__init__()
        if merge not in ("official", "average"):
            raise ValueError(f"merge must be 'official' or 'average', got {merge!r}")
        self.config = config
        self.enc_token_id = enc_token_id
        self.merge = merge
        self.gradient_checkpointing = False
        n, h = config.num_hidden_layers, config.hidden_size
        merge_from = (n + 1) // 2 if merge == "official" else n  # layer l >= n/2 uses the merge Linear
        self.embeddings = BlipTextEmbeddings(config)
        self.layers = nn.ModuleList(DualLayer(config, merge_linear=i >= merge_from) for i in range(n))
        self.cls_head = nn.Sequential(nn.Linear(2 * h, h), nn.ReLU(), nn.Linear(h, 2))

    @classmethod
    def from_text_encoder(cls, text_encoder: BlipTextModel, *, enc_token_id: int,
                          merge: Merge = "official") -> DualEncoderReranker:
        """Copy the embeddings and FFNs, and each attention block into both branches; the merge
        Linears and ``cls_head`` stay newly initialised. The source is left untouched."""
        if not hasattr(text_encoder.encoder.layer[0], "crossattention"):
            raise ValueError("the text encoder has no cross-attention (its config has is_decoder=False)")
        model = cls(copy.deepcopy(text_encoder.config), enc_token_id=enc_token_id, merge=merge)
        model.embeddings.load_state_dict(text_encoder.embeddings.state_dict())
        for dual, layer in zip(model.layers, text_encoder.encoder.layer):
            for b in range(2):
                dual.attention[b].load_state_dict(layer.attention.state_dict())
                dual.crossattention[b].load_state_dict(layer.crossattention.state_dict())
            dual.intermediate.load_state_dict(layer.intermediate.state_dict())
            dual.output.load_state_dict(layer.output.state_dict())
        p = next(text_encoder.parameters())
        return model.to(device=p.device, dtype=p.dtype)

    def zero_head(self) -> DualEncoderReranker:
        """Make the score head output exactly 0 (its last Linear zeroed): a residual re-ranker then
        reproduces stage I's order before training. Gradients still reach every part: the last
        layer's weight gradient is its (non-zero) input."""
        nn.init.zeros_(self.cls_head[-1].weight)
        nn.init.zeros_(self.cls_head[-1].bias)
        return self

    def hidden_states(
        self,
        z_t: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        image_tokens: torch.Tensor,
        image_atts: torch.Tensor | None = None,
        image_index: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Both branches' last hidden states, (B, L, h) each.

        z_t (B, L, h) and input_ids / attention_mask (B, L) describe B (query, candidate) pairs.
        image_tokens (B, L_img, h_v) are the candidates' ViT tokens, or, with ``image_index`` (B,),
        the tokens of C distinct candidates (C, L_img, h_v) and pair b uses row image_index[b].
        image_atts masks padded image tokens, shaped like image_tokens[..., 0]; None = all valid."""
        if z_t.shape[:2] != input_ids.shape:
            raise ValueError(f"z_t {tuple(z_t.shape)} does not match input_ids {tuple(input_ids.shape)}")
        dtype = self.embeddings.LayerNorm.weight.dtype
        ids = input_ids.clone()
        ids[:, 0] = self.enc_token_id
        h0, h1 = z_t.to(dtype), self.embeddings(input_ids=ids)
        tokens = image_tokens.to(dtype)
        if image_atts is not None and image_index is not None:
            image_atts = image_atts[image_index]
        args = (_key_mask(attention_mask), tokens, _key_mask(image_atts), image_index)
        for layer in self.layers:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                h0, h1 = checkpoint(layer, h0, h1, *args, use_reentrant=False)
            else:
                h0, h1 = layer(h0, h1, *args)
        return h0, h1

    def forward(
        self,
        z_t: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        image_tokens: torch.Tensor,
        image_atts: torch.Tensor | None = None,
        image_index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(B, 2) logits of cls_head(CLS_0 ++ CLS_1); arguments as in :meth:`hidden_states`."""
        h0, h1 = self.hidden_states(z_t, input_ids, attention_mask, image_tokens, image_atts, image_index)
        return self.cls_head(torch.cat([h0[:, 0], h1[:, 0]], dim=-1))

    def score(self, *args, **kwargs) -> torch.Tensor:
        """(B,) re-ranking score: logit 0 (the official convention; higher = better match)."""
        return self(*args, **kwargs)[:, 0]

    def pair_scores(
        self,
        z_t: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        cand_tokens: torch.Tensor,
        cand_atts: torch.Tensor | None = None,
        *,
        chunk_size: int | None = None,
    ) -> torch.Tensor:
        """(Q, C) scores of every query against every candidate (C, L_img, h_v), e.g. the B x B
        in-batch training matrix. Runs Q*C pairs per call (about ``chunk_size`` per chunk, whole
        queries at a time); each candidate's keys/values are projected once per chunk."""
        q_total, c = z_t.shape[0], cand_tokens.shape[0]
        step = q_total if chunk_size is None else max(1, chunk_size // c)
        cand = torch.arange(c, device=cand_tokens.device)
        rows = []
        for s in range(0, q_total, step):
            n = min(step, q_total - s)
            q = torch.arange(s, s + n, device=z_t.device).repeat_interleave(c)  # pair p = (s + p // c, p % c)
            scores = self.score(z_t[q], input_ids[q], attention_mask[q], cand_tokens, cand_atts, cand.repeat(n))
            rows.append(scores.view(n, c))
        return torch.cat(rows)

    def topk_scores(
        self,
        z_t: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        cand_tokens: torch.Tensor,
        cand_atts: torch.Tensor | None = None,
        *,
        chunk_size: int | None = None,
    ) -> torch.Tensor:
        """(Q, K) scores of each query against its own K candidates, cand_tokens (Q, K, L_img, h_v)
        (stage-I top-K re-ranking); the Q*K pairs run in chunks of ``chunk_size``."""
        q_total, k = cand_tokens.shape[:2]
        tokens = cand_tokens.flatten(0, 1)
        atts = None if cand_atts is None else cand_atts.flatten(0, 1)
        step = q_total * k if chunk_size is None else chunk_size
        out = []
        for s in range(0, q_total * k, step):
            pairs = slice(s, min(s + step, q_total * k))
            q = torch.arange(pairs.start, pairs.stop, device=z_t.device) // k  # pair p = (p // k, p % k)
            out.append(self.score(z_t[q], input_ids[q], attention_mask[q], tokens[pairs],
                                  None if atts is None else atts[pairs]))
        return torch.cat(out).view(q_total, k)


def save_reranker(model: DualEncoderReranker, path: str | Path, backbone: str | None = None) -> Path:
    """Write the re-ranker as a head folder: weights, its text config, ``[ENC]`` id and merge mode,
    and the fingerprint of the stage-I backbone whose grounded encoder produces its z_t."""
    config = {"text_config": model.config.to_dict(), "enc_token_id": model.enc_token_id, "merge": model.merge}
    return save_head(model, path, "reranker", config, backbone=backbone)


def load_reranker(path: str | Path, backbone: str | None = None) -> DualEncoderReranker:
    """The re-ranker rebuilt from its folder alone; ``backbone``: the fingerprint of the stage-I
    backbone it is used with, checked against the folder's."""
    config, state = read_head(path, "reranker", backbone)
    model = DualEncoderReranker(BlipTextConfig.from_dict(config["text_config"]),
                                enc_token_id=config["enc_token_id"], merge=config["merge"])
    model.load_state_dict(state)
    return model
