"""BLIP adapter over the HF ``BlipForImageTextRetrieval`` layout, and cirlab's small BLIP.

Modes of the BLIP text encoder, as the official code of Bi-BLIP4CIR (Cuberick-Orion/Bi-Blip4CIR)
and of candidate re-ranking (Cuberick-Orion/Candidate-Reranking-CIR) use them:
* text-only (Bi-BLIP4CIR): no ``encoder_hidden_states``, so ``BlipTextModel`` skips every
  cross-attention block and builds a bidirectional mask; the feature is text_proj of [CLS].
* image-grounded (Re-ranking stage I, ITM): the first token becomes [ENC] and every layer
  cross-attends to the reference image's ViT token sequence.
* text-only with a pseudo-word (projection-based zero-shot CIR on BLIP's unimodal encoders, a
  cirlab extension: Pic2Word, SEARLE and LinCIR use CLIP): the word embedding at the marker is
  replaced before position embeddings and LayerNorm are added, as CLIP's adapter does.
"""

from __future__ import annotations

import torch
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import BlipConfig, BlipForImageTextRetrieval, BlipTextConfig, PreTrainedTokenizerBase
from transformers.models.blip.modeling_blip import BlipPreTrainedModel
from transformers.models.blip.modeling_blip_text import BlipTextModel

from .backbone import Backbone, ImageFeatures, inject_pseudo
from .conv_vision import ConvVisionConfig, ConvVisionModel
from .tokenizer import BLIP_ENC_TOKEN, token_id


class BlipBackbone(Backbone):
    """One interface over a real BLIP retrieval checkpoint and :class:`SmallBlipForImageTextRetrieval`."""

    kind = "blip"
    default_transform = "targetpad"  # the BLIP CIR repositories' TargetPad

    def __init__(self, model: BlipForImageTextRetrieval, tokenizer: PreTrainedTokenizerBase):
        super().__init__(model, tokenizer)
        try:
            self.enc_token_id = token_id(tokenizer, BLIP_ENC_TOKEN)
        except KeyError:
            raise ValueError(
                "BlipBackbone: the tokenizer has no [ENC] token; BLIP's tokenizer is bert-base-uncased "
                "plus [DEC] (bos) and [ENC] (see cirlab.models.ensure_blip_tokens)"
            ) from None

    # named parts (methods that need more than the encode_* calls use these)
    @property
    def text_encoder(self) -> BlipTextModel:
        return self.model.text_encoder

    @property
    def vision_model(self) -> nn.Module:
        return self.model.vision_model

    @property
    def text_proj(self) -> nn.Linear:
        return self.model.text_proj

    @property
    def vision_proj(self) -> nn.Linear:
        return self.model.vision_proj

    @property
    def itm_head(self) -> nn.Linear:
        return self.model.itm_head

    def encode_image(self, pixel_values: torch.Tensor) -> ImageFeatures:
        """embeds = vision_proj(CLS token), 256-d for BLIP ViT-B; tokens = the full ViT output."""
        tokens = self.vision_model(pixel_values=pixel_values.to(self.dtype)).last_hidden_state
        return ImageFeatures(embeds=self.vision_proj(tokens[:, 0]), tokens=tokens)

    @property
    def logit_scale(self) -> float:
        """1 / BLIP's ITC temperature at its initial 0.07: HF checkpoints do not keep the learned
        temperature, and the shapes pretraining ends at 0.07 (its log in docs/results.md)."""
        return 1 / 0.07

    def embed_text_tokens(
        self, input_ids: torch.Tensor, pseudo: torch.Tensor | None = None, marker_id: int | None = None
    ) -> torch.Tensor:
        """Word embeddings with the pseudo-word at every ``marker_id`` (see :func:`inject_pseudo`), before
        BLIP's embedding layer adds positions and LayerNorm: (B, L, text_hidden)."""
        tokens = self.text_encoder.embeddings.word_embeddings(input_ids)
        if pseudo is None:
            return tokens
        if marker_id is None:
            raise ValueError("embed_text_tokens: pseudo given without marker_id")
        return inject_pseudo(tokens, input_ids, pseudo, marker_id)

    def text_hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                           pseudo: torch.Tensor | None = None, marker_id: int | None = None) -> torch.Tensor:
        """Text-only mode: (B, L, text_hidden), no cross-attention; ``pseudo`` at every marker if given."""
        if pseudo is None:
            return self.text_encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        embeds = self.embed_text_tokens(input_ids, pseudo, marker_id)
        return self.text_encoder(inputs_embeds=embeds, attention_mask=attention_mask).last_hidden_state

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """text_proj([CLS]) in text-only mode, unnormalised (Bi-BLIP4CIR's text feature)."""
        return self.text_proj(self.text_hidden_states(input_ids, attention_mask)[:, 0])

    def encode_text_with_pseudo(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                                pseudo: torch.Tensor, marker_id: int) -> torch.Tensor:
        """encode_text with the marker token's embedding replaced by ``pseudo``."""
        return self.text_proj(self.text_hidden_states(input_ids, attention_mask, pseudo, marker_id)[:, 0])

    def encode_grounded(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        image_tokens: torch.Tensor,
        image_atts: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Image-grounded text encoding: [ENC] replaces the first token, every layer cross-attends
        to ``image_tokens`` (B, L_img, vision_hidden). Returns (B, L, text_hidden).

        ``image_atts`` (B, L_img) masks padded image tokens; None = attend to all of them."""
        ids = input_ids.clone()
        ids[:, 0] = self.enc_token_id
        return self.text_encoder(
            input_ids=ids,
            attention_mask=attention_mask,
            encoder_hidden_states=image_tokens.to(self.dtype),
            encoder_attention_mask=image_atts,
        ).last_hidden_state

    def grounded_embeds(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        image_tokens: torch.Tensor,
        image_atts: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """text_proj of the grounded [ENC] state (Re-ranking stage I query), unnormalised."""
        return self.text_proj(self.encode_grounded(input_ids, attention_mask, image_tokens, image_atts)[:, 0])

    def itm_logits(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        image_tokens: torch.Tensor,
        image_atts: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(B, 2) image-text matching logits; column 1 = "match" in BLIP's convention."""
        return self.itm_head(self.encode_grounded(input_ids, attention_mask, image_tokens, image_atts)[:, 0])


# -- cirlab's small BLIP: BLIP's layout with the conv image tower ----------------------------------


@strict
class SmallBlipConfig(BlipConfig):
    """BlipConfig whose ``vision_config`` is a :class:`ConvVisionConfig`."""

    model_type = "cirlab_blip"
    sub_configs_defaults = {"text_config": BlipTextConfig, "vision_config": ConvVisionConfig}
    vision_config: dict | ConvVisionConfig | None = None


class SmallBlipForImageTextRetrieval(BlipForImageTextRetrieval):
    """Same submodule names as ``BlipForImageTextRetrieval`` (so :class:`BlipBackbone` and the HF
    forward work unchanged); only ``vision_model`` is a :class:`ConvVisionModel`."""

    config_class = SmallBlipConfig
    config: SmallBlipConfig

    def __init__(self, config: SmallBlipConfig):
        BlipPreTrainedModel.__init__(self, config)  # skip the parent's ViT construction
        self.vision_model = ConvVisionModel._from_config(config.vision_config)
        self.text_encoder = BlipTextModel(config.text_config, add_pooling_layer=False)
        self.vision_proj = nn.Linear(config.vision_config.hidden_size, config.image_text_hidden_size)
        self.text_proj = nn.Linear(config.text_config.hidden_size, config.image_text_hidden_size)
        self.itm_head = nn.Linear(config.text_config.hidden_size, 2)
        self.post_init()
