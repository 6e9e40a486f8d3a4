"""salesforce/BLIP: ``model_base.pth`` into a BLIP backbone folder, and the name mapping that every
BLIP-based official checkpoint (Bi-BLIP4CIR, Candidate Re-ranking, SPN4CIR) shares.

The official BLIP code (``models/vit.py``, ``models/med.py``) names its tensors as timm's ViT and
a BERT with cross-attention; HF's ``BlipForImageTextRetrieval`` mirrors ``med.py`` for the text
side, so only the ViT is renamed:

* ``visual_encoder.*`` -> ``vision_model.*`` (``blocks.i.attn.qkv`` -> ``encoder.layers.i.self_attn.qkv``,
  ...); ``pos_embed`` is resized bicubically over the patch grid when the target resolution differs
  (model_base was pre-trained at 224 px; the CIR repos run 384, as BLIP's own ``interpolate_pos_embed``);
* ``text_encoder.*``, ``vision_proj``, ``text_proj``, ``itm_head`` keep their names;
* ``position_ids`` buffers, momentum copies (``*_m``), queues, ``temp`` and the captioning
  ``text_decoder`` are not part of the retrieval model and are left out.

The tokenizer is bert-base-uncased (the bundled MiniLM vocabulary is that vocabulary) plus [DEC]
and [ENC] as ids 30522 and 30523, as BLIP's ``init_tokenizer``.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch.nn import functional as F
from transformers import BlipConfig, BlipForImageTextRetrieval

from cirlab.models import BlipBackbone, ensure_blip_tokens, minilm_tokenizer, save_backbone

from .common import Importer, check_state, read_checkpoint, state_dict

_VIT_FIXED = {
    "cls_token": "embeddings.class_embedding",
    "pos_embed": "embeddings.position_embedding",
    "patch_embed.proj.weight": "embeddings.patch_embedding.weight",
    "patch_embed.proj.bias": "embeddings.patch_embedding.bias",
    "norm.weight": "post_layernorm.weight",
    "norm.bias": "post_layernorm.bias",
}
_VIT_BLOCK = {"norm1": "layer_norm1", "attn.qkv": "self_attn.qkv", "attn.proj": "self_attn.projection",
              "norm2": "layer_norm2", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
_KEPT = ("text_encoder.", "vision_proj.", "text_proj.", "itm_head.")
# entries of the official models that the retrieval backbone does not have
IGNORED = ("position_ids", "temp", "_m.", "image_queue", "text_queue", "queue_ptr", "idx_queue", "ptr_queue",
           "text_decoder.", "text_encoder.pooler.")


def hf_name(name: str) -> str:
    """HF ``BlipForImageTextRetrieval`` name of an official BLIP tensor."""
    if name.startswith("visual_encoder."):
        rest = name.removeprefix("visual_encoder.")
        if rest in _VIT_FIXED:
            return "vision_model." + _VIT_FIXED[rest]
        match = re.fullmatch(r"blocks\.(\d+)\.(.+)\.(weight|bias)", rest)
        if match and match.group(2) in _VIT_BLOCK:
            layer, part, kind = match.groups()
            return f"vision_model.encoder.layers.{layer}.{_VIT_BLOCK[part]}.{kind}"
    if name.startswith(_KEPT):
        return name
    raise KeyError(name)


def official_name(name: str) -> str:
    """The inverse of :func:`hf_name`."""
    if name.startswith("vision_model."):
        rest = name.removeprefix("vision_model.")
        for ours, theirs in _VIT_FIXED.items():
            if rest == theirs:
                return "visual_encoder." + ours
        layer, part, kind = re.fullmatch(r"encoder\.layers\.(\d+)\.(.+)\.(weight|bias)", rest).groups()
        return f"visual_encoder.blocks.{layer}.{next(k for k, v in _VIT_BLOCK.items() if v == part)}.{kind}"
    return name


def resize_pos_embed(pos: torch.Tensor, grid: int) -> torch.Tensor:
    """(1, 1 + g*g, d) -> (1, 1 + grid*grid, d), bicubic over the patch grid; the CLS row is kept."""
    old = int(round((pos.shape[1] - 1) ** 0.5))
    if old == grid:
        return pos
    patches = pos[:, 1:].reshape(1, old, old, -1).permute(0, 3, 1, 2).float()
    patches = F.interpolate(patches, size=(grid, grid), mode="bicubic", align_corners=False)
    return torch.cat([pos[:, :1], patches.permute(0, 2, 3, 1).reshape(1, grid * grid, -1).to(pos.dtype)], dim=1)


def blip_config(state: dict[str, torch.Tensor], image_size: int | None, path: Path) -> BlipConfig:
    """Sizes read off the tensors (heads = width / 64, as BLIP base and large; dropout 0.1 and
    LayerNorm eps as BLIP's med_config.json and timm's ViT). ``image_size`` None: the resolution
    the position embedding was trained at."""
    for key in ("visual_encoder.cls_token", "visual_encoder.pos_embed", "visual_encoder.patch_embed.proj.weight",
                "text_encoder.embeddings.word_embeddings.weight", "vision_proj.weight"):
        if key not in state:
            raise ValueError(f"{path}: not a BLIP checkpoint: missing key {key!r}")
    width = state["visual_encoder.cls_token"].shape[-1]
    patch = state["visual_encoder.patch_embed.proj.weight"].shape[-1]
    grid = int(round((state["visual_encoder.pos_embed"].shape[1] - 1) ** 0.5))
    depth = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("visual_encoder.blocks."))
    vision = dict(hidden_size=width, intermediate_size=state["visual_encoder.blocks.0.mlp.fc1.weight"].shape[0],
                  num_hidden_layers=depth, num_attention_heads=width // 64, image_size=image_size or grid * patch,
                  patch_size=patch, layer_norm_eps=1e-6)
    vocab, hidden = state["text_encoder.embeddings.word_embeddings.weight"].shape
    layers = 1 + max(int(k.split(".")[3]) for k in state if k.startswith("text_encoder.encoder.layer."))
    text = dict(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=hidden // 64,
                intermediate_size=state["text_encoder.encoder.layer.0.intermediate.dense.weight"].shape[0],
                max_position_embeddings=state["text_encoder.embeddings.position_embeddings.weight"].shape[0],
                encoder_hidden_size=width, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
    return BlipConfig(vision_config=vision, text_config=text, image_text_hidden_size=state["vision_proj.weight"].shape[0])


def blip_backbone(state: dict[str, torch.Tensor], path: Path, what: str, *, image_size: int | None = None,
                  itm_head: bool = True) -> BlipBackbone:
    """A BLIP backbone from official BLIP names (checked key by key against the layout).

    ``itm_head=False``: the checkpoint has no image-text matching head (the re-ranking and SPN
    retrieval models drop it); the backbone gets a zero one, which no composer reads."""
    config = blip_config(state, image_size, path)
    model = BlipForImageTextRetrieval(config)
    grid = config.vision_config.image_size // config.vision_config.patch_size
    expected = {official_name(k): tuple(v.shape) for k, v in model.state_dict().items()
                if not k.endswith("position_ids") and (itm_head or not k.startswith("itm_head."))}
    source_pos = state["visual_encoder.pos_embed"]
    expected["visual_encoder.pos_embed"] = tuple(source_pos.shape)  # any grid: resized below
    check_state(state, expected, path, what, ignore=IGNORED)
    converted = {hf_name(k): v for k, v in state.items() if k in expected}
    converted["vision_model.embeddings.position_embedding"] = resize_pos_embed(source_pos, grid)
    if not itm_head:
        converted.update({k: torch.zeros_like(v) for k, v in model.state_dict().items() if k.startswith("itm_head.")})
    model.load_state_dict(converted, strict=False)
    tokenizer = minilm_tokenizer()
    ensure_blip_tokens(tokenizer)
    return BlipBackbone(model.float().eval(), tokenizer)


def load_blip_state(path: str | Path, *, keys=("model",), prefix: str = "") -> dict[str, torch.Tensor]:
    """The BLIP-named tensors of an official checkpoint file."""
    path = Path(path)
    return state_dict(read_checkpoint(path, "BLIP checkpoint"), path, keys, prefix)


def import_blip(checkpoint: str | Path, out: str | Path, image_size: int = 384) -> Path:
    """``model_base.pth`` (or any BLIP retrieval checkpoint, ``{"model": state}``) as a backbone
    folder at ``image_size``; ``cirlab.load`` of it is a zero-shot composer."""
    path = Path(checkpoint)
    backbone = blip_backbone(load_blip_state(path), path, "BLIP checkpoint", image_size=image_size)
    save_backbone(backbone, out)
    return Path(out)


def _arguments(parser) -> None:
    parser.add_argument("checkpoint", type=Path, help="salesforce/BLIP model_base.pth (or model_large.pth)")
    parser.add_argument("--image-size", type=int, default=384, help="resolution of the backbone (default 384, "
                        "the CIR repos'; model_base's position embeddings are resized from 224 bicubically)")


IMPORTERS = [Importer("blip", "BLIP model_base.pth -> a BLIP backbone folder (cirlab.load: a zero-shot model)",
                      _arguments, lambda a: import_blip(a.checkpoint, a.out, a.image_size))]
