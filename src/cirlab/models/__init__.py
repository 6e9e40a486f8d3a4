"""Backbones: BLIP and CLIP adapters over HF checkpoints and cirlab's small models.

Importing this package registers cirlab's model types (cirlab_conv_vision, cirlab_blip,
cirlab_clip) with ``AutoConfig`` / ``AutoModel``, so their saved folders load like any HF model.
Importing the official checkpoints: :mod:`cirlab.importers` (``cirlab import``).
"""

from transformers import AutoConfig, AutoModel

from .backbone import Backbone, ImageFeatures, fingerprint, inject_pseudo
from .blip import BlipBackbone, SmallBlipConfig, SmallBlipForImageTextRetrieval
from .clip import ClipBackbone, SmallClipConfig, SmallClipModel
from .conv_vision import ConvVisionConfig, ConvVisionModel
from .loading import (
    TextInitReport,
    blip_base_config,
    build_backbone,
    build_small_blip,
    build_small_clip,
    check_backbone_dir,
    clip_config,
    init_text_from_minilm,
    load_backbone,
    register_backbone,
    save_backbone,
    small_blip_config,
    small_clip_config,
)
from .tokenizer import add_tokens, ensure_blip_tokens, load_tokenizer, minilm_path, minilm_tokenizer, token_id

for _config, _model in (
    (ConvVisionConfig, ConvVisionModel),
    (SmallBlipConfig, SmallBlipForImageTextRetrieval),
    (SmallClipConfig, SmallClipModel),
):
    AutoConfig.register(_config.model_type, _config, exist_ok=True)
    AutoModel.register(_config, _model, exist_ok=True)

__all__ = [
    "Backbone",
    "BlipBackbone",
    "ClipBackbone",
    "ConvVisionConfig",
    "ConvVisionModel",
    "ImageFeatures",
    "SmallBlipConfig",
    "SmallBlipForImageTextRetrieval",
    "SmallClipConfig",
    "SmallClipModel",
    "TextInitReport",
    "add_tokens",
    "blip_base_config",
    "build_backbone",
    "build_small_blip",
    "build_small_clip",
    "check_backbone_dir",
    "clip_config",
    "ensure_blip_tokens",
    "fingerprint",
    "init_text_from_minilm",
    "inject_pseudo",
    "load_backbone",
    "load_tokenizer",
    "register_backbone",
    "minilm_path",
    "minilm_tokenizer",
    "save_backbone",
    "small_blip_config",
    "small_clip_config",
    "token_id",
]
