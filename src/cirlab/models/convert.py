"""Convert an original BLIP checkpoint (salesforce/BLIP ``model_base.pth``) into a backbone folder.

The BLIP4CIR papers start from BLIP's *pre-trained* ``model_base.pth``, which the HF hub does not
host in HF format (it has the COCO/Flickr retrieval fine-tunes, e.g. Salesforce/blip-itm-base-coco).
This maps the original names onto ``BlipForImageTextRetrieval``:

* ``visual_encoder.*`` (timm-style ViT) -> ``vision_model.*``; ``pos_embed`` is resized bicubically
  when the target resolution differs (model_base was pre-trained at 224 px, the CIR repos run 384).
* ``text_encoder.*``, ``vision_proj``, ``text_proj``, ``itm_head`` keep their names (HF's BLIP text
  model mirrors BLIP's ``med.py``).
* momentum copies (``*_m``), queues, ``temp`` and the captioning ``text_decoder`` are dropped.

Usage: ``python -m cirlab.models.convert model_base.pth backbones/blip_base [--image-size 384]``.
"""

from __future__ import annotations

import argparse
import pickle
import re
import sys
from pathlib import Path
from typing import Callable

import torch
from torch.nn import functional as F
from transformers import BlipConfig, BlipForImageTextRetrieval

from .blip import BlipBackbone
from .loading import save_backbone
from .tokenizer import ensure_blip_tokens, minilm_tokenizer

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
_KEPT_PREFIXES = ("text_encoder.", "vision_proj.", "text_proj.", "itm_head.")


def hf_name(name: str) -> str | None:
    """HF ``BlipForImageTextRetrieval`` name of an original BLIP tensor; None = not part of it."""
    if name.endswith("position_ids") or name.startswith("text_encoder.pooler."):
        return None  # a buffer HF rebuilds itself; a pooler the retrieval model does not have
    if name.startswith("visual_encoder."):
        rest = name.removeprefix("visual_encoder.")
        if rest in _VIT_FIXED:
            return "vision_model." + _VIT_FIXED[rest]
        match = re.fullmatch(r"blocks\.(\d+)\.(.+)\.(weight|bias)", rest)
        if match and match.group(2) in _VIT_BLOCK:
            layer, part, kind = match.groups()
            return f"vision_model.encoder.layers.{layer}.{_VIT_BLOCK[part]}.{kind}"
        raise KeyError(f"unexpected ViT tensor {name!r} in the BLIP checkpoint")
    if name.startswith(_KEPT_PREFIXES):
        return name
    return None


def _resize_pos_embed(pos: torch.Tensor, grid: int) -> torch.Tensor:
    """(1, 1 + g*g, d) -> (1, 1 + grid*grid, d), bicubic over the patch grid; the CLS row is kept."""
    old = int(round((pos.shape[1] - 1) ** 0.5))
    if old == grid:
        return pos
    patches = pos[:, 1:].reshape(1, old, old, -1).permute(0, 3, 1, 2).float()
    patches = F.interpolate(patches, size=(grid, grid), mode="bicubic", align_corners=False)
    return torch.cat([pos[:, :1], patches.permute(0, 2, 3, 1).reshape(1, grid * grid, -1).to(pos.dtype)], dim=1)


def blip_config_from_state(state: dict[str, torch.Tensor], image_size: int) -> BlipConfig:
    """Sizes read off the tensors; heads = width / 64 (true for BLIP base and large), dropout 0.1
    and LayerNorm eps as in BLIP's med_config.json and timm ViT."""
    width = state["visual_encoder.cls_token"].shape[-1]
    depth = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("visual_encoder.blocks."))
    vision = dict(hidden_size=width, intermediate_size=state["visual_encoder.blocks.0.mlp.fc1.weight"].shape[0],
                  num_hidden_layers=depth, num_attention_heads=width // 64, image_size=image_size,
                  patch_size=state["visual_encoder.patch_embed.proj.weight"].shape[-1], layer_norm_eps=1e-6)
    vocab, hidden = state["text_encoder.embeddings.word_embeddings.weight"].shape
    layers = 1 + max(int(k.split(".")[3]) for k in state if k.startswith("text_encoder.encoder.layer."))
    text = dict(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=hidden // 64,
                intermediate_size=state["text_encoder.encoder.layer.0.intermediate.dense.weight"].shape[0],
                max_position_embeddings=state["text_encoder.embeddings.position_embeddings.weight"].shape[0],
                hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
    return BlipConfig(vision_config=vision, text_config=text, image_text_hidden_size=state["vision_proj.weight"].shape[0])


def read_checkpoint(path: Path, what: str, key: str) -> dict:
    """An official checkpoint, loaded without running its pickled code (``weights_only``); the
    error of a file that holds more says how to re-save the weights under ``key``."""
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise ValueError(
            f"{path}: holds more than tensors ({err}); if you trust the file, re-save only its weights with "
            f"torch.save(torch.load(src, weights_only=False)['{key}'], 'weights.pth') and convert that"
        ) from None


def run_converter(convert: Callable[[], Path]) -> int:
    """A converter's command-line exit: print the folder written, or the error (1)."""
    try:
        print(convert())
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


def convert_blip_checkpoint(src: str | Path, out_dir: str | Path, image_size: int = 384) -> Path:
    """Write ``src`` (an original BLIP .pth) as a backbone folder loadable by ``load_backbone``.

    The tokenizer is the bundled BERT-uncased WordPiece plus [DEC]/[ENC] (ids 30522/30523), i.e.
    BLIP's own bert-base-uncased tokenizer."""
    src = Path(src)
    checkpoint = read_checkpoint(src, "BLIP checkpoint", "model")
    state = checkpoint.get("model", checkpoint)
    config = blip_config_from_state(state, image_size)
    model = BlipForImageTextRetrieval(config)
    grid = image_size // config.vision_config.patch_size
    converted = {}
    for name, tensor in state.items():
        target = hf_name(name)
        if target is None:
            continue
        if name == "visual_encoder.pos_embed":
            tensor = _resize_pos_embed(tensor, grid)
        converted[target] = tensor
    result = model.load_state_dict(converted, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("position_ids")]
    if missing or result.unexpected_keys:
        raise ValueError(
            f"{src}: does not fit BlipForImageTextRetrieval; missing {missing[:4]} ({len(missing)} in all), "
            f"unexpected {result.unexpected_keys[:4]}"
        )
    tokenizer = minilm_tokenizer()
    ensure_blip_tokens(tokenizer)
    return save_backbone(BlipBackbone(model.eval(), tokenizer), out_dir)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint", help="original BLIP .pth (e.g. model_base.pth)")
    parser.add_argument("out_dir", help="backbone folder to write")
    parser.add_argument("--image-size", type=int, default=384)
    args = parser.parse_args(argv)
    return run_converter(lambda: convert_blip_checkpoint(args.checkpoint, args.out_dir, args.image_size))


if __name__ == "__main__":
    raise SystemExit(main())
