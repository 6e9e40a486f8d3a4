"""The interface every backbone adapter offers to cirlab's methods, and its fingerprint.

An adapter owns a Hugging Face model (real BLIP / CLIP checkpoint or one of cirlab's small
models with the same layout) and its tokenizer, and hides the HF API (output objects, masks,
pooling rules) behind plain tensors. Methods never touch ``backbone.model`` directly unless they
need a part the interface does not name.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn
from transformers import BatchEncoding, PreTrainedModel, PreTrainedTokenizerBase


@dataclass
class ImageFeatures:
    """What an image encoder returns.

    embeds: (B, D) projected global feature, *unnormalised* (methods normalise where the paper does).
    tokens: (B, L, h) the vision tower's last hidden state, for cross-attention (BLIP) or analysis.
    """

    embeds: torch.Tensor
    tokens: torch.Tensor


def inject_pseudo(
    token_embeds: torch.Tensor, input_ids: torch.Tensor, pseudo: torch.Tensor, marker_id: int
) -> torch.Tensor:
    """Replace the embedding at every ``marker_id`` position by a pseudo-word embedding.

    pseudo (B, d): the same vector at every marker of row b (each row needs at least one marker).
    pseudo (B, n, d): the k-th marker of row b gets pseudo[b, k] (each row needs exactly n markers).
    Gradients flow into ``pseudo`` (and into the kept token embeddings)."""
    is_marker = input_ids == marker_id
    counts = is_marker.sum(dim=1)
    if pseudo.dim() == 2:
        if bool((counts == 0).any()):
            rows = torch.nonzero(counts == 0).flatten().tolist()
            raise ValueError(f"inject_pseudo: rows {rows} contain no marker token (id {marker_id})")
        source = pseudo[:, None, :].expand_as(token_embeds)
    elif pseudo.dim() == 3:
        n = pseudo.shape[1]
        if bool((counts != n).any()):
            raise ValueError(
                f"inject_pseudo: every row needs exactly {n} marker tokens (id {marker_id}), got {counts.tolist()}"
            )
        slot = (is_marker.cumsum(dim=1) - 1).clamp(min=0)  # index of the marker a position belongs to
        source = pseudo.gather(1, slot[..., None].expand(-1, -1, pseudo.shape[-1]))
    else:
        raise ValueError(f"inject_pseudo: pseudo must be (B, d) or (B, n, d), got shape {tuple(pseudo.shape)}")
    return torch.where(is_marker[..., None], source.to(token_embeds.dtype), token_embeds)


class Backbone(nn.Module):
    """Common part of :class:`BlipBackbone` and :class:`ClipBackbone`."""

    kind: ClassVar[str] = ""
    # the preprocessing its own code uses (cirlab.data.transforms): a plain backbone's zero-shot model
    default_transform: ClassVar[str] = "resize"

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        rows = self.input_embeddings.num_embeddings
        if len(tokenizer) > rows:
            raise ValueError(
                f"{type(self).__name__}: tokenizer has {len(tokenizer)} tokens but the text embedding has only "
                f"{rows} rows; add new tokens with cirlab.models.add_tokens, which resizes both"
            )

    # -- shared accessors ------------------------------------------------------------------------
    @property
    def config(self) -> Any:
        return self.model.config

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def image_size(self) -> int:
        """Side length in pixels the image tower expects (384 for BLIP ViT-B, 224 for CLIP, 64 small)."""
        size = self.config.vision_config.image_size
        return int(size if isinstance(size, int) else size[0])

    @property
    def vision_hidden(self) -> int:
        return int(self.config.vision_config.hidden_size)

    @property
    def text_hidden(self) -> int:
        return int(self.config.text_config.hidden_size)

    @property
    def embed_dim(self) -> int:
        """Width of the projected (joint) embedding space."""
        return int(self.text_proj.out_features)

    @property
    def max_text_length(self) -> int:
        return int(self.config.text_config.max_position_embeddings)

    @property
    def token_dim(self) -> int:
        """Width of a (pseudo-)word embedding: what a Phi / Pic2Word mapper must output."""
        return self.text_hidden

    @property
    def input_embeddings(self) -> nn.Embedding:
        """The text token-embedding matrix (what :func:`add_tokens` grows)."""
        return self.text_encoder.get_input_embeddings()

    # -- text --------------------------------------------------------------------------------------
    def tokenize(self, texts: str | list[str], max_length: int = 77) -> BatchEncoding:
        """Pad to the longest text, truncate at ``max_length`` (77 as in the official repos).

        Returns ``input_ids`` and ``attention_mask`` on the backbone's device."""
        enc = self.tokenizer(
            [texts] if isinstance(texts, str) else list(texts),
            padding="longest",
            truncation=True,
            max_length=min(max_length, self.max_text_length),
            return_tensors="pt",
            return_token_type_ids=False,
        )
        return enc.to(self.device)

    # -- identity ----------------------------------------------------------------------------------
    def fingerprint(self) -> str:
        return fingerprint(self)

    def image_fingerprint(self, projection: bool = True) -> str:
        """Fingerprint of what image features depend on: the vision config, the image tower and
        (for projected embeddings) its projection. Fine-tuning the text side (Bi-BLIP4CIR, RTD)
        keeps it, so cached image features stay valid across those methods' runs and exports;
        token sequences (``projection=False``) also survive a trained ``vision_proj`` (re-ranking)."""
        parts = {"vision_model": self.vision_model}
        if projection:
            parts["vision_proj"] = self.vision_proj
        return fingerprint(self, config=self.config.vision_config.to_dict(), parts=parts)


# Config keys that change with where/how a model was saved or loaded, not with what it computes.
_VOLATILE_KEYS = {"_name_or_path", "name_or_path", "transformers_version", "architectures", "dtype", "torch_dtype"}


def _stable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _stable(v) for k, v in obj.items() if k not in _VOLATILE_KEYS}
    if isinstance(obj, (list, tuple)):
        return [_stable(v) for v in obj]
    return obj


def fingerprint(backbone: Backbone, *, config: dict | None = None, parts: dict[str, nn.Module] | None = None) -> str:
    """A hex digest of config + tokenizer vocabulary + every weight's bytes.

    Identical for a model and its saved-and-reloaded copy, different as soon as one weight, the
    architecture or a token id changes. Hashes all weights (a few seconds for ViT-L on CPU), so
    call it once per run, not per batch. ``config`` and ``parts`` restrict it to a sub-config and
    named submodules (the tokenizer then does not count): see :meth:`Backbone.image_fingerprint`."""
    h = hashlib.blake2b(digest_size=16)
    h.update(backbone.kind.encode())
    h.update(json.dumps(_stable(config or backbone.config.to_dict()), sort_keys=True, default=str).encode())
    if parts is None:
        h.update(json.dumps(sorted(backbone.tokenizer.get_vocab().items())).encode())
    state = backbone.model.state_dict() if parts is None else {
        f"{p}.{k}": v for p, module in parts.items() for k, v in module.state_dict().items()}
    for name, tensor in state.items():
        t = tensor.detach().to("cpu").contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())  # buffer protocol: no extra copy
    return h.hexdigest()
