"""Projection-based zero-shot CIR (Pic2Word, SEARLE, LinCIR) and what RTD tunes.

The query is the CLIP text feature of the recipe's prompt ("a photo of $ that {text}") with a
pseudo-word at ``$``: Phi(the reference's CLIP image embedding). The gallery is the frozen CLIP
image embeddings, so tuning the text encoder (RTD) leaves every gallery vector as it was.
BLIP's unimodal encoders (its ITC space) serve the same way, a cirlab extension: the demo builds
the bases and RTD on the small BLIP it already pretrained.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from cirlab.models import Backbone, BlipBackbone, ClipBackbone
from cirlab.models.phi import Phi, load_phi, save_phi

from .base import Composer, QueryRecipe, register

MARKER = "$"


def marker_id(backbone: Backbone, marker: str = MARKER) -> int:
    """The token id of the pseudo-word marker; it must be one token of the vocabulary."""
    ids = backbone.tokenizer(marker, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise ValueError(f"the tokenizer splits the pseudo-word marker {marker!r} into {len(ids)} tokens; "
                         f"add it as a token first")
    return ids[0]


@register
class ProjectionComposer(Composer):
    """Projection-based zero-shot CIR: the prompt's ``$`` replaced by Phi(reference image
    embedding), a pseudo-word; the gallery is the frozen image embeddings."""

    kind = "projection"
    heads = ("phi",)

    def __init__(self, backbone: Backbone, recipe: QueryRecipe, phi: Phi):
        if not isinstance(backbone, (ClipBackbone, BlipBackbone)):
            raise ValueError(f"a projection composer needs a CLIP or BLIP backbone (pseudo-word injection), "
                             f"got {type(backbone).__name__}")
        if MARKER not in recipe.prompt:
            raise ValueError(f"the prompt {recipe.prompt!r} has no {MARKER!r} for the pseudo-word")
        if phi.token_dim != backbone.token_dim:
            raise ValueError(f"Phi outputs {phi.token_dim}-d pseudo-words, the text encoder's tokens are "
                             f"{backbone.token_dim}-d")
        super().__init__(backbone, recipe)
        self.phi, self.marker_id = phi, marker_id(backbone)

    @property
    def name(self) -> str:
        return f"{self.phi.style}"

    def pseudo_words(self, image_embeds: torch.Tensor) -> torch.Tensor:
        """(B, token_dim) pseudo-word tokens of (B, d) image embeddings: what goes in at ``$``."""
        return self.phi(image_embeds.to(self.device).float())

    def encode_prompts(self, texts: list[str], pseudo: torch.Tensor) -> torch.Tensor:
        """Unnormalised text features of the formatted ``texts`` with ``pseudo`` (B, d) at every ``$``."""
        enc = self.tokenize(texts)
        return self.backbone.encode_text_with_pseudo(enc.input_ids.to(self.device), enc.attention_mask.to(self.device),
                                                     pseudo, self.marker_id)

    def compose(self, references: torch.Tensor, texts: list[str], *, forward: bool = True) -> torch.Tensor:
        return F.normalize(self.encode_prompts(texts, self.pseudo_words(references)).float(), dim=-1)

    def query_parameters(self) -> list[nn.Parameter]:
        return [*self.backbone.text_encoder.parameters(), *self.backbone.text_proj.parameters()]

    def save_heads(self, folder: Path, fingerprint: str) -> None:
        save_phi(self.phi, folder / "phi", backbone=fingerprint)

    @classmethod
    def from_parts(cls, backbone, recipe, folder: Path, config: dict, fingerprint: str) -> "ProjectionComposer":
        return cls(backbone, recipe, load_phi(folder / "phi", backbone=fingerprint))
