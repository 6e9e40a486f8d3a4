"""Load, save and build backbones; copy MiniLM weights into a small BLIP text encoder.

Every backbone lives in a plain HF folder (config.json + weights + tokenizer files), real
checkpoints and cirlab's small models alike, and comes back through :func:`load_backbone`.
Nothing is ever fetched from the hub (``local_files_only=True``).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from transformers import (
    BlipConfig,
    BlipForImageTextRetrieval,
    CLIPConfig,
    CLIPModel,
    PreTrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from ..registry import import_plugins
from ..utils.io import atomic_dir, read_json, recover_dir
from .backbone import Backbone
from .blip import BlipBackbone, SmallBlipConfig, SmallBlipForImageTextRetrieval
from .clip import ClipBackbone, SmallClipConfig, SmallClipModel
from .tokenizer import ensure_blip_tokens, load_tokenizer, minilm_path, minilm_tokenizer

Kind = str  # a registered adapter's kind: "blip", "clip", or one added with register_backbone

# model_type in config.json -> (kind, HF model class); the adapter class follows from the kind.
MODEL_TYPES: dict[str, tuple[str, type[PreTrainedModel]]] = {}
ADAPTERS: dict[str, type[Backbone]] = {}


def register_backbone(adapter: type[Backbone], model_types: dict[str, type[PreTrainedModel]]) -> type[Backbone]:
    """Make folders whose config.json names one of ``model_types`` load as ``adapter`` (a
    :class:`Backbone` subclass; its ``kind`` names it in configs, ``model.kind``)."""
    ADAPTERS[adapter.kind] = adapter
    for model_type, model_cls in model_types.items():
        MODEL_TYPES[model_type] = (adapter.kind, model_cls)
    return adapter


register_backbone(BlipBackbone, {"blip": BlipForImageTextRetrieval, "cirlab_blip": SmallBlipForImageTextRetrieval})
register_backbone(ClipBackbone, {"clip": CLIPModel, "cirlab_clip": SmallClipModel})

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
TOKENIZER_HINT = "tokenizer_config.json plus tokenizer.json, vocab.txt (WordPiece) or vocab.json + merges.txt (BPE)"


def _has_tokenizer(names: set[str]) -> bool:
    vocab = "tokenizer.json" in names or "vocab.txt" in names or {"vocab.json", "merges.txt"} <= names
    return "tokenizer_config.json" in names and vocab


def check_backbone_dir(path: str | Path) -> str:
    """Validate a backbone folder before loading; return its config's model_type.

    Errors name the folder, the missing part, what was expected and what is there."""
    path = recover_dir(path)  # a crash mid-export leaves the old folder aside: put it back
    if not path.is_dir():
        raise FileNotFoundError(f"backbone folder {path} does not exist")
    names = {p.name for p in path.iterdir()}
    found = ", ".join(sorted(names)) or "nothing"
    missing = []
    if "config.json" not in names:
        missing.append("config (expected config.json)")
    if not names & set(WEIGHT_FILES):
        missing.append(f"weights (expected one of {', '.join(WEIGHT_FILES)})")
    if not _has_tokenizer(names):
        missing.append(f"tokenizer files (expected {TOKENIZER_HINT})")
    if missing:
        raise FileNotFoundError(f"backbone folder {path}: missing {'; missing '.join(missing)}; found: {found}")
    model_type = read_json(path / "config.json", "backbone config").get("model_type")
    if model_type not in MODEL_TYPES:
        import_plugins()  # a plugin's adapter (CIRLAB_PLUGINS) registers its model types on import
    if model_type not in MODEL_TYPES:
        raise ValueError(
            f"backbone folder {path}: config.json has model_type {model_type!r}; "
            f"supported: {', '.join(MODEL_TYPES)}"
        )
    return model_type


@contextmanager
def quiet_hf() -> Iterator[None]:
    """Without transformers' progress bars ("Loading weights", "Writing model shards"): a
    backbone of a few MB loads in a second, and in a log each bar is a line of redraws."""
    from transformers.utils import logging as hf_logging

    shown = hf_logging.is_progress_bar_enabled()
    if shown:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if shown:
            hf_logging.enable_progress_bar()


def load_backbone(
    path: str | Path,
    kind: Kind | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> BlipBackbone | ClipBackbone:
    """Load a backbone from a local HF folder; the adapter is chosen by config ``model_type``
    (blip, cirlab_blip -> BlipBackbone; clip, cirlab_clip -> ClipBackbone).

    ``kind`` only checks that the folder holds what the caller expects. Weights that the layout
    needs but the folder lacks are an error (e.g. a BLIP captioning checkpoint has no text_proj),
    never a silent random initialisation. The model comes back in eval mode."""
    path = Path(path)
    model_type = check_backbone_dir(path)
    found_kind, model_cls = MODEL_TYPES[model_type]
    if kind is not None and kind != found_kind:
        raise ValueError(f"backbone folder {path} holds a {found_kind} model (model_type {model_type!r}), not {kind}")
    try:
        with quiet_hf():
            model, info = model_cls.from_pretrained(str(path), local_files_only=True, dtype=dtype,
                                                    output_loading_info=True)
    except SafetensorError as e:  # its message names no file
        weights = path / "model.safetensors"
        where = weights if weights.is_file() else f"a shard listed in {path / 'model.safetensors.index.json'}"
        raise ValueError(f"{where} is not a readable safetensors file (truncated?): {e}") from None
    if info["missing_keys"]:
        missing = sorted(info["missing_keys"])
        raise ValueError(
            f"backbone folder {path}: the weights lack {len(missing)} tensors of the {model_cls.__name__} layout "
            f"(e.g. {', '.join(missing[:4])}); was it saved from another head? config architectures: "
            f"{model.config.architectures}"
        )
    tokenizer = load_tokenizer(path)
    if found_kind == "blip":
        ensure_blip_tokens(tokenizer)
    return ADAPTERS[found_kind](model.to(device).eval(), tokenizer)


def save_backbone(backbone: Backbone, path: str | Path) -> Path:
    """``save_pretrained`` of model and tokenizer into ``path``, atomically.

    Everything is written into a temporary folder next to ``path`` and renamed into place only
    once complete, so an interrupted save never replaces (or half-overwrites) a good folder."""
    path = Path(path)
    with atomic_dir(path) as tmp, quiet_hf():
        backbone.model.save_pretrained(tmp)
        backbone.tokenizer.save_pretrained(tmp)
        check_backbone_dir(tmp)
    return path


# -- building random backbones ---------------------------------------------------------------------


def build_backbone(config: PreTrainedConfig, tokenizer: PreTrainedTokenizerBase | None = None) -> BlipBackbone | ClipBackbone:
    """A randomly initialised backbone for ``config`` (any supported model_type).

    Without a tokenizer, the bundled MiniLM WordPiece is used (plus [DEC]/[ENC] for BLIP); its
    30522 ids fit real BLIP/CLIP vocabularies, so real-size configs work for speed/memory checks."""
    kind, model_cls = MODEL_TYPES[config.model_type]
    tokenizer = tokenizer if tokenizer is not None else minilm_tokenizer()
    if kind == "blip":
        ensure_blip_tokens(tokenizer)
    return ADAPTERS[kind](model_cls(config).eval(), tokenizer)


def small_blip_config(
    *,
    embed_dim: int = 256,
    text_hidden: int = 384,
    text_layers: int = 6,
    text_heads: int = 12,
    text_intermediate: int | None = None,
    vision_hidden: int = 256,
    stage_channels: tuple[int, ...] = (32, 64, 128, 128),
    image_size: int = 64,
    vocab_size: int = 30524,
) -> SmallBlipConfig:
    """Config of cirlab's small BLIP. Defaults mirror MiniLM-L6 (384 wide, 6 layers, 12 heads, 512
    positions) so :func:`init_text_from_minilm` can initialise the text encoder; vocab = MiniLM's
    30522 + [DEC] + [ENC]."""
    text = dict(
        vocab_size=vocab_size,
        hidden_size=text_hidden,
        num_hidden_layers=text_layers,
        num_attention_heads=text_heads,
        intermediate_size=text_intermediate or 4 * text_hidden,
        max_position_embeddings=512,
        bos_token_id=30522,
        pad_token_id=0,
        sep_token_id=102,
    )
    vision = dict(hidden_size=vision_hidden, stage_channels=list(stage_channels), image_size=image_size)
    return SmallBlipConfig(text_config=text, vision_config=vision, image_text_hidden_size=embed_dim)


def small_clip_config(
    *,
    embed_dim: int = 256,
    text_hidden: int = 256,
    text_layers: int = 4,
    text_heads: int = 4,
    text_intermediate: int | None = None,
    vision_hidden: int = 256,
    stage_channels: tuple[int, ...] = (32, 64, 128, 128),
    image_size: int = 64,
    vocab_size: int = 30522,
) -> SmallClipConfig:
    """Config of cirlab's small CLIP: CLIP's causal text transformer over the MiniLM WordPiece
    (EOS = [SEP] = 102, 77 positions) and the conv image tower."""
    text = dict(
        vocab_size=vocab_size,
        hidden_size=text_hidden,
        num_hidden_layers=text_layers,
        num_attention_heads=text_heads,
        intermediate_size=text_intermediate or 4 * text_hidden,
        max_position_embeddings=77,
        hidden_act="gelu",
        bos_token_id=101,
        eos_token_id=102,
        pad_token_id=0,
        projection_dim=embed_dim,
    )
    vision = dict(hidden_size=vision_hidden, stage_channels=list(stage_channels), image_size=image_size)
    return SmallClipConfig(text_config=text, vision_config=vision, projection_dim=embed_dim)


def build_small_blip(**sizes) -> BlipBackbone:
    """Random small BLIP with the MiniLM tokenizer; ``sizes`` go to :func:`small_blip_config`."""
    tokenizer = minilm_tokenizer()
    ensure_blip_tokens(tokenizer)
    return build_backbone(small_blip_config(vocab_size=len(tokenizer), **sizes), tokenizer)


def build_small_clip(**sizes) -> ClipBackbone:
    """Random small CLIP with the MiniLM tokenizer; ``sizes`` go to :func:`small_clip_config`."""
    tokenizer = minilm_tokenizer()
    return build_backbone(small_clip_config(vocab_size=len(tokenizer), **sizes), tokenizer)


def blip_base_config() -> BlipConfig:
    """BLIP ViT-B/16 at 384 px + BERT-base text (cross-attention) + 256-d projections, as in the
    BLIP retrieval checkpoints. Random weights: for memory and speed checks."""
    vision = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                  image_size=384, patch_size=16)
    text = dict(vocab_size=30524, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                num_attention_heads=12, max_position_embeddings=512)
    return BlipConfig(vision_config=vision, text_config=text, image_text_hidden_size=256)


_CLIP_SIZES = {
    # name: (vision width, layers, heads, patch, text width, layers, heads, projection)
    "ViT-B/32": (768, 12, 12, 32, 512, 12, 8, 512),
    "ViT-B/16": (768, 12, 12, 16, 512, 12, 8, 512),
    "ViT-L/14": (1024, 24, 16, 14, 768, 12, 12, 768),
}
_CLIP_ALIASES = {
    "openai/clip-vit-base-patch32": "ViT-B/32",
    "openai/clip-vit-base-patch16": "ViT-B/16",
    "openai/clip-vit-large-patch14": "ViT-L/14",
}


def clip_config(name: str) -> CLIPConfig:
    """The public OpenAI CLIP sizes at 224 px (ViT-B/32, ViT-B/16, ViT-L/14 or their HF ids), random
    weights, for memory/speed checks. eos_token_id is the legacy 2, as in the hub configs."""
    key = _CLIP_ALIASES.get(name, name)
    if key not in _CLIP_SIZES:
        raise ValueError(f"unknown CLIP size {name!r}; known: {', '.join([*_CLIP_SIZES, *_CLIP_ALIASES])}")
    vw, vl, vh, patch, tw, tl, th, proj = _CLIP_SIZES[key]
    vision = dict(hidden_size=vw, intermediate_size=4 * vw, num_hidden_layers=vl, num_attention_heads=vh,
                  patch_size=patch, image_size=224, projection_dim=proj)
    text = dict(hidden_size=tw, intermediate_size=4 * tw, num_hidden_layers=tl, num_attention_heads=th,
                max_position_embeddings=77, eos_token_id=2, projection_dim=proj)
    return CLIPConfig(vision_config=vision, text_config=text, projection_dim=proj)


# -- MiniLM initialisation of a BLIP text encoder ----------------------------------------------------


@dataclass
class TextInitReport:
    """Which BLIP text-encoder tensors :func:`init_text_from_minilm` filled and which stay random."""

    copied: list[str] = field(default_factory=list)
    random: list[str] = field(default_factory=list)


def init_text_from_minilm(blip: BlipBackbone | BlipForImageTextRetrieval) -> TextInitReport:
    """Copy MiniLM-L6's BertModel weights into a BLIP text encoder where they fit.

    Embeddings, self-attention, FFN and LayerNorms map one to one (BLIP's text encoder is a BERT
    with extra cross-attention blocks, which stay random). Word embeddings: MiniLM's 30522 rows go
    to the same ids (added tokens such as [DEC]/[ENC] keep their rows). BERT adds token-type
    embedding 0 to every token and BLIP has no token types, so that row is folded into the position
    embeddings: in text-only mode the BLIP encoder then computes exactly MiniLM's hidden states.
    Extra BLIP layers stay random, extra MiniLM layers are ignored."""
    encoder = blip.text_encoder
    ours = encoder.config
    minilm_cfg = read_json(minilm_path() / "config.json", "MiniLM config")
    if ours.num_attention_heads != minilm_cfg["num_attention_heads"] or ours.hidden_size != minilm_cfg["hidden_size"]:
        raise ValueError(
            f"init_text_from_minilm: text encoder is {ours.hidden_size} wide with {ours.num_attention_heads} heads; "
            f"MiniLM is {minilm_cfg['hidden_size']} wide with {minilm_cfg['num_attention_heads']} heads"
        )
    source = {k.removeprefix("bert."): v for k, v in load_file(minilm_path() / "model.safetensors").items()}
    type0 = source.pop("embeddings.token_type_embeddings.weight")[0]
    report = TextInitReport()
    with torch.no_grad():
        for name, param in encoder.named_parameters():
            src = source.get(name)
            if src is None:
                report.random.append(name)
                continue
            src = src.to(param.dtype)
            if name == "embeddings.position_embeddings.weight":
                src = src + type0
            if name in ("embeddings.word_embeddings.weight", "embeddings.position_embeddings.weight"):
                n = min(src.shape[0], param.shape[0])
                param[:n] = src[:n]
            elif src.shape == param.shape:
                param.copy_(src)
            else:
                report.random.append(name)
                continue
            report.copied.append(name)
    return report
