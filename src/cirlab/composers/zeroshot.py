"""Zero-shot composed baselines: a pretrained backbone and no CIR training.

* ``image``: the reference image feature alone; ``text``: the modification text alone;
* ``sum``: normalize(normalize(image) + normalize(text)), the element-wise sum that CLIP4Cir
  and BLIP4CIR start from;
* ``grounded`` (BLIP only): the image-grounded text encoder, ``[ENC]`` + text cross-attending to
  the reference image's tokens, through ``text_proj`` (the re-ranking paper's stage-I query).

Gallery side: normalize(image embedding) in every mode.

``cirlab.load`` of a plain backbone folder (a BLIP or CLIP checkpoint, no CIR training) gives
:meth:`ZeroShotComposer.from_backbone`: the ``sum`` mode, because the image and text features of
BLIP's and CLIP's unimodal encoders live in one contrastively aligned space and their sum is the
composed baseline that CLIP4Cir and BLIP4CIR start from; BLIP's grounded state is trained for
image-text matching, not for that space (zero-shot it ranks at chance: docs/results.md).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from cirlab.models import Backbone, BlipBackbone

from .base import Composer, QueryRecipe, register

Mode = Literal["image", "text", "sum", "grounded"]
MODES: tuple[str, ...] = ("image", "text", "sum", "grounded")


def grounded_embeds(composer: Composer, tokens: torch.Tensor, texts: list[str]) -> torch.Tensor:
    """normalize(text_proj([ENC] state)) of (reference tokens, texts) on a BLIP backbone."""
    enc = composer.tokenize(texts)
    return F.normalize(composer.backbone.grounded_embeds(enc.input_ids, enc.attention_mask, tokens), dim=-1)


@register
class ZeroShotComposer(Composer):
    """A pretrained backbone composing without CIR training, in one of :data:`MODES` (see the
    module docstring): the baselines every trained method is measured against."""

    kind = "zeroshot"

    def __init__(self, backbone: Backbone, recipe: QueryRecipe, mode: Mode = "sum"):
        if mode not in MODES:
            raise ValueError(f"zero-shot mode must be one of {list(MODES)}, got {mode!r}")
        if mode == "grounded" and not isinstance(backbone, BlipBackbone):
            raise ValueError("zero-shot mode 'grounded' needs a BLIP backbone")
        super().__init__(backbone, recipe)
        self.mode = mode
        self.reference_field = "tokens" if mode == "grounded" else "embeds"

    @classmethod
    def from_backbone(cls, backbone: Backbone) -> "ZeroShotComposer":
        """The zero-shot model of a plain backbone (see the module docstring)."""
        return cls(backbone, QueryRecipe(transform=backbone.default_transform), mode="sum")

    @property
    def name(self) -> str:
        return self.mode

    def config(self) -> dict:
        return {"mode": self.mode}

    def compose(self, references: torch.Tensor, texts: list[str], *, forward: bool = True) -> torch.Tensor:
        if self.mode == "grounded":
            return grounded_embeds(self, references, texts)
        image = F.normalize(references.float(), dim=-1)
        if self.mode == "image":
            return image
        text = F.normalize(self.encode_text(texts, forward).float(), dim=-1)
        return text if self.mode == "text" else F.normalize(image + text, dim=-1)

    def query_parameters(self) -> list[nn.Parameter]:
        if self.mode == "image":
            return []
        return [*self.backbone.text_encoder.parameters(), *self.backbone.text_proj.parameters()]
