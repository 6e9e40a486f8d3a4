"""Candidate re-ranking's two composers (Liu et al., "Candidate Set Re-ranking for Composed Image
Retrieval with Dual Multi-modal Encoder"; official code: Cuberick-Orion/Candidate-Reranking-CIR).

* ``grounded`` (stage I, the filter): the query is BLIP's image-grounded text encoder (``[ENC]``
  first, cross-attention to the reference image's tokens), normalize(text_proj(state 0)); the
  gallery is normalize(vision_proj(CLS token)), read from the cached tokens because stage I
  trains ``vision_proj`` over a frozen ViT.
* ``rerank`` (stage II): a first stage ranks the whole gallery (the filter, as in the paper, or any
  composer on a BLIP backbone), then a :class:`~cirlab.models.dual_encoder.DualEncoderReranker`
  re-scores each query's top ``k`` from (z_t, text, candidate tokens), z_t being the grounded
  encoder's last hidden state. With ``candidate_input="difference"`` (an option beyond the paper)
  the re-ranker reads each candidate's tokens minus the reference's, position by position: what
  changed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Literal, Sequence, get_args

import torch
import torch.nn.functional as F
from torch import nn

from cirlab.models import Backbone, BlipBackbone
from cirlab.models.dual_encoder import DualEncoderReranker, load_reranker, save_reranker

from .base import REGISTRY, Composer, QueryRecipe, evaluating, register


def _blip(backbone: Backbone, what: str) -> BlipBackbone:
    if not isinstance(backbone, BlipBackbone):
        raise ValueError(f"the {what} composer needs a BLIP backbone, got {backbone.kind}")
    return backbone


def grounded_states(backbone: BlipBackbone, texts: list[str], ref_tokens: torch.Tensor,
                    max_length: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(last hidden state, input ids, attention mask)`` of the grounded encoder on (reference, text)."""
    enc = backbone.tokenize(texts, max_length=max_length)
    ids, mask = enc.input_ids.to(ref_tokens.device), enc.attention_mask.to(ref_tokens.device)
    return backbone.encode_grounded(ids, mask, ref_tokens), ids, mask


@register
class GroundedComposer(Composer):
    """Candidate re-ranking's stage I (the filter): BLIP's image-grounded text encoder on
    (reference tokens, text) against the gallery's projected CLS tokens."""

    kind = "grounded"
    gallery_field = "tokens"
    reference_field = "tokens"
    gallery_tokens = 1  # only the CLS token

    def __init__(self, backbone: Backbone, recipe: QueryRecipe):
        super().__init__(_blip(backbone, "grounded"), recipe)

    @property
    def name(self) -> str:
        return "filter"

    def gallery_vectors(self, features: torch.Tensor) -> torch.Tensor:
        cls = features[:, 0].to(self.device, self.backbone.dtype)
        return F.normalize(self.backbone.vision_proj(cls), dim=-1)

    def grounded_states(self, references: torch.Tensor, texts: list[str]):
        """``(last hidden state, input ids, attention mask)`` of the grounded encoder."""
        return grounded_states(self.backbone, [self.recipe.text(t) for t in texts], references,
                               self.recipe.max_text_length)

    def compose(self, references: torch.Tensor, texts: list[str], *, forward: bool = True) -> torch.Tensor:
        states, _, _ = self.grounded_states(references, texts)
        return F.normalize(self.backbone.text_proj(states[:, 0]), dim=-1)

    def query_parameters(self) -> list[nn.Parameter]:
        return [*self.backbone.text_encoder.parameters(), *self.backbone.text_proj.parameters()]


CandidateInput = Literal["image", "difference"]
BeyondK = Literal["first-stage", "official"]  # what a re-ranked ranking holds below its top K


def candidate_tokens(candidates: torch.Tensor, references: torch.Tensor, mode: CandidateInput) -> torch.Tensor:
    """What the re-ranker's cross-attention reads for each candidate: its image tokens (the paper's
    design) or, for ``"difference"``, its tokens minus its query's reference tokens, position by
    position. ``candidates`` (Q, C, L, h) or (Q, L, h) against ``references`` (Q, L, h)."""
    if mode == "image":
        return candidates
    refs = references.to(candidates.device, candidates.dtype)
    return candidates - (refs[:, None] if candidates.dim() == refs.dim() + 1 else refs)


@register
class RerankComposer(Composer):
    """A first-stage composer's vectors, plus :meth:`rerank` over its top ``k``.

    The first stage is the paper's grounded filter by default, or any composer on a BLIP backbone
    (Bi-BLIP4CIR's sum or Combiner models, an SPN model over either: a cirlab extension). The
    re-ranker's z_t is always the grounded encoder's last hidden state on (reference tokens, text)
    under the first stage's backbone and text recipe; for a filter that is the paper's z_t, for
    another first stage its grounded path as pretraining left it, which the re-ranker adapts to."""

    kind = "rerank"
    reranks = True
    heads = ("reranker",)
    gallery_field = "tokens"
    reference_field = "tokens"
    gallery_tokens = 1  # the first stage reads the CLS token (or the embedding projected from it)

    def __init__(self, first: Composer, reranker: DualEncoderReranker, k: int = 50, chunk_size: int = 256,
                 residual_scale: float | None = None, candidate_input: CandidateInput = "image",
                 beyond_k: BeyondK = "first-stage"):
        super().__init__(_blip(first.backbone, "rerank"), first.recipe)
        if first.reranks:
            raise ValueError("a re-ranking model cannot be the first stage of another")
        if first.gallery_field == "tokens" and first.gallery_tokens != 1:
            raise ValueError(f"the rerank composer's first stage must read one gallery token, {first.kind} reads "
                             f"{first.gallery_tokens}")
        if k < 1:
            raise ValueError(f"re-ranking depth k must be >= 1, got {k}")
        self.first, self.reranker, self.k, self.chunk_size = first, reranker, k, chunk_size
        self.heads = (*first.heads, "reranker")
        # residual score: residual_scale x stage-I cosine + the re-ranker's logit; a head trained
        # from zero then starts from stage I's order and moves it only where it has learned to
        self.residual_scale = residual_scale
        if candidate_input not in get_args(CandidateInput):
            raise ValueError(f"candidate_input must be one of {get_args(CandidateInput)}, got {candidate_input!r}")
        self.candidate_input = candidate_input
        if beyond_k not in get_args(BeyondK):
            raise ValueError(f"beyond_k must be one of {get_args(BeyondK)}, got {beyond_k!r}")
        # "official": nothing below the top K is ranked, so every metric counts hits inside the K
        # re-ranked candidates only (validate_stage2.py of the official code); "first-stage": the
        # rest of the gallery follows in the first stage's order (a full ranking, what search serves)
        self.beyond_k = beyond_k

    @property
    def name(self) -> str:
        return f"rerank@{self.k}"

    @property
    def bidirectional(self) -> bool:
        return False  # re-ranking is forward retrieval only

    def _first_input(self, tokens: torch.Tensor, field_: str) -> torch.Tensor:
        """Rows of the first stage's ``field_`` from cached tokens: BLIP's embedding is
        vision_proj(CLS), exactly as :meth:`BlipBackbone.encode_image` computes it."""
        if field_ == "tokens":
            return tokens
        cls = tokens[:, 0].to(self.device, self.backbone.dtype)
        return self.backbone.vision_proj(cls).float()

    def gallery_vectors(self, features: torch.Tensor) -> torch.Tensor:
        return self.first.gallery_vectors(self._first_input(features, self.first.gallery_field))

    def compose(self, references: torch.Tensor, texts: list[str], *, forward: bool = True) -> torch.Tensor:
        return self.first.compose(self._first_input(references, self.first.reference_field), texts, forward=forward)

    def grounded_states(self, references: torch.Tensor, texts: list[str]):
        """z_t, input ids and attention mask: the grounded encoder on (reference tokens, formatted text)."""
        return grounded_states(self.backbone, [self.recipe.text(t) for t in texts], references,
                               self.recipe.max_text_length)

    @torch.no_grad()
    def rerank(self, references: torch.Tensor, texts: list[str], candidates: torch.Tensor,
               stage1: torch.Tensor | None = None) -> torch.Tensor:
        """(Q, C) re-ranking scores (higher is better) of each query, given as cached reference tokens
        (Q, L, h) and raw texts, against its own candidates' cached tokens (Q, C, L, h);
        ``stage1`` (Q, C): the candidates' stage-I cosines, needed by a residual re-ranker."""
        with evaluating(self):
            references = references.to(self.device)
            z_t, ids, mask = self.grounded_states(references, texts)
            cand = candidate_tokens(candidates.to(self.device), references, self.candidate_input)
            scores = self.reranker.topk_scores(z_t, ids, mask, cand, chunk_size=self.chunk_size).float()
            return self.residual(scores, stage1)

    @torch.no_grad()
    def rerank_topk(self, tokens: Callable[[torch.Tensor], torch.Tensor], references: torch.Tensor,
                    texts: Sequence[str], candidates: torch.Tensor, stage1: torch.Tensor) -> torch.Tensor:
        """:meth:`rerank` over each query's candidates, ``chunk_size`` (query, candidate) pairs per call."""
        per_call = max(1, self.chunk_size // max(1, candidates.shape[1]))
        out = []
        for s in range(0, len(texts), per_call):
            cand = candidates[s:s + per_call]
            refs = tokens(references[s:s + per_call])
            cand_tokens = tokens(cand.clamp_min(0).reshape(-1)).view(*cand.shape, *refs.shape[1:])
            scores = self.rerank(refs, list(texts[s:s + per_call]), cand_tokens, stage1[s:s + per_call])
            out.append(scores.cpu().masked_fill(cand.cpu() < 0, float("-inf")))
        return torch.cat(out) if out else stage1.new_empty(candidates.shape)

    def residual(self, scores: torch.Tensor, stage1: torch.Tensor | None) -> torch.Tensor:
        """The re-ranker's logits plus ``residual_scale`` x the stage-I cosines (if residual)."""
        if self.residual_scale is None:
            return scores
        if stage1 is None:
            raise ValueError("a residual re-ranker needs the candidates' stage-I scores")
        return scores + self.residual_scale * stage1.to(scores.device, scores.dtype)

    def query_parameters(self) -> list[nn.Parameter]:
        return list(self.reranker.parameters())

    def config(self) -> dict:
        out = {"k": self.k, "chunk_size": self.chunk_size, "residual_scale": self.residual_scale,
               "candidate_input": self.candidate_input}
        if self.beyond_k != "first-stage":  # left out at its default: older folders keep their fingerprint
            out["beyond_k"] = self.beyond_k
        if type(self.first) is not GroundedComposer:  # folders of the paper's chain keep their old manifest
            out["first"] = {"kind": self.first.kind, "config": self.first.config()}
        return out

    def save_heads(self, folder: Path, fingerprint: str) -> None:
        self.first.save_heads(folder, fingerprint)
        save_reranker(self.reranker, folder / "reranker", backbone=fingerprint)

    @classmethod
    def from_parts(cls, backbone, recipe, folder: Path, config: dict, fingerprint: str) -> "RerankComposer":
        config = dict(config)
        first = config.pop("first", {"kind": "grounded", "config": {}})
        if not isinstance(first, dict) or first.get("kind") not in REGISTRY or first["kind"] == cls.kind:
            raise ValueError(f"field 'config.first' must name a first-stage composer kind, got {first!r}")
        first_stage = REGISTRY[first["kind"]].from_parts(backbone, recipe, folder, first.get("config", {}), fingerprint)
        return cls(first_stage, load_reranker(folder / "reranker", backbone=fingerprint), **config)
