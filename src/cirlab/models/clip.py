"""CLIP adapter over the HF ``CLIPModel`` layout, pseudo-word injection, and cirlab's small CLIP.

Pseudo-word injection (as in the official code of Pic2Word, google-research/composed_image_retrieval;
SEARLE, miccunifi/SEARLE; LinCIR, navervision/lincir; RTD, jaeseokbyun/RTD): the token embedding
at every position holding the marker id is replaced by a given vector *before* the position
embeddings are added; then the causal encoder, final LayerNorm, EOS pooling and text_projection
run as usual. HF's ``CLIPTextModel.forward`` takes no ``inputs_embeds`` in transformers 5, so the
adapter runs the text tower's own submodules (embeddings, HF causal mask, encoder, final norm);
plain ``encode_text`` goes through the same path, so both share one pooling rule.
"""

from __future__ import annotations

import html
import re

import ftfy
import torch
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import BatchEncoding, CLIPConfig, CLIPModel, CLIPTextConfig, PreTrainedTokenizerBase
from transformers.masking_utils import create_causal_mask
from transformers.models.clip.modeling_clip import CLIPPreTrainedModel, CLIPTextModel

from .backbone import Backbone, ImageFeatures, inject_pseudo
from .conv_vision import ConvVisionConfig, ConvVisionModel

_LEGACY_EOS = 2  # pre-2023 HF CLIP configs: "eos_token_id": 2 means "pool at the argmax id"


def clip_clean(text: str) -> str:
    """openai CLIP's ``basic_clean`` then ``whitespace_clean`` (lower-casing is the tokenizer's)."""
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return re.sub(r"\s+", " ", text).strip()


class ClipBackbone(Backbone):
    """One interface over a real CLIP checkpoint and :class:`SmallClipModel`."""

    kind = "clip"
    default_transform = "resize"  # CLIP's own resize + center crop

    def __init__(self, model: CLIPModel, tokenizer: PreTrainedTokenizerBase):
        super().__init__(model, tokenizer)
        # The sequence ends at the tokenizer's EOS (CLIP BPE: <|endoftext|>) or [SEP] (BERT WordPiece).
        # Pooling takes its first occurrence, which also works when padding reuses the EOS token and,
        # unlike the legacy argmax rule, when tokens are added above the EOS id.
        eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
        if eos is None:
            raise ValueError("ClipBackbone: the tokenizer has neither an eos nor a sep token to pool at")
        cfg_eos = model.config.text_config.eos_token_id
        if cfg_eos not in (None, _LEGACY_EOS, eos):
            raise ValueError(
                f"ClipBackbone: text_config.eos_token_id={cfg_eos} but the tokenizer ends texts with id {eos}; "
                "HF's own pooling and the adapter's would disagree"
            )
        self.eos_token_id = int(eos)

    def tokenize(self, texts: str | list[str], max_length: int = 77) -> BatchEncoding:
        """Backbone.tokenize of the texts cleaned as openai's ``clip.tokenize`` cleans them (and with
        it CLIP4Cir, SPN4CIR, Pic2Word, SEARLE, LinCIR and RTD): ``ftfy.fix_text`` (e.g. curly quotes
        straightened), HTML entities unescaped twice, whitespace runs collapsed. HF's fast CLIP
        tokenizer does none of it ("They’re" would give other ids; docs/compat.md)."""
        texts = [texts] if isinstance(texts, str) else texts
        return super().tokenize([clip_clean(t) for t in texts], max_length=max_length)

    @property
    def text_encoder(self) -> CLIPTextModel:
        return self.model.text_model

    @property
    def vision_model(self) -> nn.Module:
        return self.model.vision_model

    @property
    def text_proj(self) -> nn.Linear:
        return self.model.text_projection

    @property
    def vision_proj(self) -> nn.Linear:
        return self.model.visual_projection

    @property
    def logit_scale(self) -> float:
        """CLIP's own contrastive scale (exp of its learned log-scale, at most 100), as Pic2Word uses it."""
        return float(self.model.logit_scale.exp().clamp(max=100))

    def encode_image(self, pixel_values: torch.Tensor) -> ImageFeatures:
        """embeds = visual_projection(pooled CLS), unnormalised; tokens = vision last_hidden_state."""
        out = self.vision_model(pixel_values=pixel_values.to(self.dtype))
        return ImageFeatures(embeds=self.vision_proj(out.pooler_output), tokens=out.last_hidden_state)

    def embed_text_tokens(
        self, input_ids: torch.Tensor, pseudo: torch.Tensor | None = None, marker_id: int | None = None
    ) -> torch.Tensor:
        """Token embeddings (with the pseudo-word injected, if given) plus position embeddings:
        the hidden state entering the first transformer layer, (B, L, text_hidden)."""
        embeddings = self.text_encoder.embeddings
        tokens = embeddings.token_embedding(input_ids)
        if pseudo is not None:
            if marker_id is None:
                raise ValueError("embed_text_tokens: pseudo given without marker_id")
            tokens = inject_pseudo(tokens, input_ids, pseudo, marker_id)
        return embeddings(inputs_embeds=tokens)

    def text_hidden_states(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pseudo: torch.Tensor | None = None,
        marker_id: int | None = None,
    ) -> torch.Tensor:
        """Causal text transformer output after the final LayerNorm, (B, L, text_hidden)."""
        tower = self.text_encoder
        hidden = self.embed_text_tokens(input_ids, pseudo, marker_id)
        mask = create_causal_mask(
            config=tower.config, inputs_embeds=hidden, attention_mask=attention_mask, past_key_values=None
        )
        hidden = tower.encoder(inputs_embeds=hidden, attention_mask=mask, is_causal=True).last_hidden_state
        return tower.final_layer_norm(hidden)

    def pool(self, hidden: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """The state at each row's first EOS token, (B, text_hidden)."""
        is_eos = input_ids == self.eos_token_id
        if not bool(is_eos.any(dim=1).all()):
            raise ValueError(f"ClipBackbone.pool: some texts have no EOS token (id {self.eos_token_id})")
        position = is_eos.int().argmax(dim=1)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), position]

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """text_projection(EOS state), unnormalised."""
        return self.text_proj(self.pool(self.text_hidden_states(input_ids, attention_mask), input_ids))

    def encode_text_with_pseudo(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        pseudo: torch.Tensor,
        marker_id: int,
    ) -> torch.Tensor:
        """encode_text with the marker token's embedding replaced by ``pseudo`` (see :func:`inject_pseudo`)."""
        hidden = self.text_hidden_states(input_ids, attention_mask, pseudo, marker_id)
        return self.text_proj(self.pool(hidden, input_ids))


# -- cirlab's small CLIP: CLIP's layout with the conv image tower ----------------------------------


@strict
class SmallClipConfig(CLIPConfig):
    """CLIPConfig whose ``vision_config`` is a :class:`ConvVisionConfig`."""

    model_type = "cirlab_clip"
    sub_configs_defaults = {"text_config": CLIPTextConfig, "vision_config": ConvVisionConfig}
    vision_config: dict | ConvVisionConfig | None = None


class SmallClipModel(CLIPModel):
    """``CLIPModel`` with ``vision_model`` = :class:`ConvVisionModel`; every other part and every
    method (get_text_features, get_image_features, forward) is CLIP's."""

    config_class = SmallClipConfig
    config: SmallClipConfig

    def __init__(self, config: SmallClipConfig):
        CLIPPreTrainedModel.__init__(self, config)  # skip the parent's ViT construction
        self.projection_dim = config.projection_dim
        self.text_embed_dim = config.text_config.hidden_size
        self.vision_embed_dim = config.vision_config.hidden_size
        self.text_model = CLIPTextModel._from_config(config.text_config)
        self.vision_model = ConvVisionModel._from_config(config.vision_config)
        self.visual_projection = nn.Linear(self.vision_embed_dim, self.projection_dim, bias=False)
        self.text_projection = nn.Linear(self.text_embed_dim, self.projection_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(config.logit_scale_init_value))
        self.post_init()
