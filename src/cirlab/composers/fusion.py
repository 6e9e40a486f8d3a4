"""Late-fusion composers over frozen image embeddings: Bi-BLIP4CIR's two stages.

* ``sum`` (stage I): normalize(R + t) of the *unnormalised* image and text features, BLIP4CIR's
  element-wise sum; the text encoder is the fine-tuned one, with its direction tokens;
* ``combiner`` (stage II): the CLIP4Cir Combiner over the frozen stage-I features.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from cirlab.models import Backbone
from cirlab.models.combiner import Combiner, load_combiner, save_combiner

from .base import Composer, QueryRecipe, register


@register
class SumComposer(Composer):
    """Bi-BLIP4CIR stage I: normalize(reference features + text features), with the fine-tuned
    text encoder and its direction tokens (backward queries compose target + backward text)."""

    kind = "sum"

    @property
    def name(self) -> str:
        return "forward"

    def compose(self, references: torch.Tensor, texts: list[str], *, forward: bool = True) -> torch.Tensor:
        if not forward and self.recipe.backward_target == "normalized":
            references = F.normalize(references, dim=-1)  # the reversed query stage I trained on
        return F.normalize(references + self.encode_text(texts, forward), dim=-1)

    def query_parameters(self) -> list[nn.Parameter]:
        return [*self.backbone.text_encoder.parameters(), *self.backbone.text_proj.parameters()]


@register
class CombinerComposer(Composer):
    """Bi-BLIP4CIR stage II: the CLIP4Cir Combiner head over the frozen stage-I image and text
    features; only the head is trained."""

    kind = "combiner"
    heads = ("combiner",)

    def __init__(self, backbone: Backbone, recipe: QueryRecipe, combiner: Combiner):
        super().__init__(backbone, recipe)
        self.combiner = combiner

    @property
    def name(self) -> str:
        return "forward"

    def compose(self, references: torch.Tensor, texts: list[str], *, forward: bool = True) -> torch.Tensor:
        with torch.no_grad():  # the text encoder is frozen in stage II
            text = self.encode_text(texts, forward)
        return self.combiner(references, text)

    def query_parameters(self) -> list[nn.Parameter]:
        return list(self.combiner.parameters())

    def save_heads(self, folder: Path, fingerprint: str) -> None:
        save_combiner(self.combiner, folder / "combiner", backbone=fingerprint)

    @classmethod
    def from_parts(cls, backbone, recipe, folder: Path, config: dict, fingerprint: str) -> "CombinerComposer":
        return cls(backbone, recipe, load_combiner(folder / "combiner", backbone=fingerprint))
