"""Import the official projection checkpoints as a projection model folder.

No Phi can be trained here at the papers' scale (CC3M, 20k steps on GPUs), but the released
ones can be used: this writes a CLIP backbone folder plus an official Phi (and optionally an RTD
text encoder) as one composer folder, which ``cirlab eval --model``, ``cirlab index``, the server
and the RTD and SPN stages take like any model trained here.

* Pic2Word (google-research/composed_image_retrieval): the checkpoint's ``state_dict_img2text``
  (``IM2TEXT``: ``[module.]layers.{0,1}.0`` and ``fc_out``);
* SEARLE / LinCIR (miccunifi/SEARLE, navervision/lincir; RTD's ``--phi_checkpoint``): ``{"Phi":
  state}`` with ``layers.{0,3,6}``; a bare state dict with those keys is read as well;
* RTD (jaeseokbyun/RTD) ``text_encoder_best.pt``: ``{"CLIPTextModelWithProjection": state}``,
  the tuned text tower and projection; it replaces the CLIP folder's (the image side stays).

The recipe is the zero-shot evaluation of SEARLE, LinCIR and RTD: "a photo of $ that {text}",
FashionIQ with both caption orders averaged, CLIP's own preprocessing (``resize``: LinCIR's and
RTD's ``--preprocess-type clip`` default; ``--transform targetpad`` for SEARLE's). Pic2Word's own
prompt ("a photo of $ , {text}", one FashionIQ order) differs; pass ``--prompt`` for it.

Usage: ``python -m cirlab.composers.convert phi_best.pt --clip checkpoints/clip-vit-large-patch14
--out models/lincir-l14 [--text-encoder text_encoder_best.pt]``.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import get_args

import torch

from cirlab.data.transforms import TransformKind
from cirlab.models import load_backbone
from cirlab.models.clip import ClipBackbone
from cirlab.models.convert import read_checkpoint, run_converter
from cirlab.models.phi import Phi

from .base import QueryRecipe
from .projection import MARKER, ProjectionComposer

PROMPT = f"a photo of {MARKER} that {{text}}"
_WRAPPERS = ("state_dict_img2text", "Phi", "phi", "state_dict")
# Pic2Word's IM2TEXT names -> our Phi("pic2word") Sequential (Linear, Dropout, ReLU) x 2, Linear
_PIC2WORD = {"layers.0.0": "layers.0", "layers.1.0": "layers.3", "fc_out": "layers.6"}
_TEXT_PREFIXES = ("text_model.", "text_projection.")


def _unwrap(checkpoint: dict, path: Path, keys: tuple[str, ...]) -> dict[str, torch.Tensor]:
    for key in keys:
        if isinstance(checkpoint.get(key), dict):
            checkpoint = checkpoint[key]
            break
    state = {k.removeprefix("module."): v for k, v in checkpoint.items() if isinstance(v, torch.Tensor)}
    if not state:
        raise ValueError(f"{path}: no tensors under any of {list(keys)} or at the top level")
    return state


def read_official_phi(path: str | Path) -> Phi:
    """A Pic2Word or SEARLE/LinCIR Phi from its official checkpoint; the style is read off the keys."""
    path = Path(path)
    state = _unwrap(read_checkpoint(path, "Phi checkpoint", "state_dict_img2text"), path, _WRAPPERS)
    if "fc_out.weight" in state:
        style, renamed = "pic2word", {}
        for name, tensor in state.items():
            module, _, kind = name.rpartition(".")
            if module not in _PIC2WORD:
                raise ValueError(f"{path}: unexpected Pic2Word tensor {name!r} (this Phi has 2 hidden layers)")
            renamed[f"{_PIC2WORD[module]}.{kind}"] = tensor
        state, dropout = renamed, 0.1
    elif "layers.6.weight" in state:
        style, dropout = "searle", 0.5
    else:
        raise ValueError(f"{path}: neither a Pic2Word (fc_out.*) nor a SEARLE/LinCIR Phi (layers.6.*); "
                         f"keys {sorted(state)[:6]}")
    phi = Phi(style, state["layers.0.weight"].shape[1], state["layers.6.weight"].shape[0],
              hidden_dim=state["layers.0.weight"].shape[0], dropout=dropout)
    result = phi.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(f"{path}: does not fit the {style} Phi; missing {result.missing_keys[:4]}, "
                         f"unexpected {result.unexpected_keys[:4]}")
    return phi.eval()


def load_text_encoder(backbone: ClipBackbone, path: str | Path) -> None:
    """Replace the text tower and projection of ``backbone`` by an RTD ``text_encoder_best.pt``."""
    path = Path(path)
    state = _unwrap(read_checkpoint(path, "text encoder checkpoint", "CLIPTextModelWithProjection"), path,
                    ("CLIPTextModelWithProjection",))
    state = {k: v for k, v in state.items() if not k.endswith("position_ids")}
    expected = {k for k in backbone.model.state_dict() if k.startswith(_TEXT_PREFIXES) and not k.endswith("position_ids")}
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise ValueError(f"{path}: not this CLIP's text encoder; missing {missing[:4]} ({len(missing)} in all), "
                         f"unexpected {unexpected[:4]}")
    own = backbone.model.state_dict()
    wrong = [k for k in state if state[k].shape != own[k].shape]
    if wrong:
        raise ValueError(f"{path}: tensor shapes differ from the CLIP folder's, e.g. {wrong[0]} "
                         f"{tuple(state[wrong[0]].shape)} vs {tuple(own[wrong[0]].shape)}")
    backbone.model.load_state_dict(state, strict=False)


def convert_projection(phi_path: str | Path, clip_dir: str | Path, out: str | Path,
                       text_encoder: str | Path | None = None, prompt: str = PROMPT,
                       transform: TransformKind = "resize") -> Path:
    """Write a projection model folder from a CLIP folder and official Phi (and RTD) checkpoints."""
    backbone = load_backbone(clip_dir, kind="clip")
    phi = read_official_phi(phi_path)
    if phi.input_dim != backbone.embed_dim:
        raise ValueError(f"{phi_path}: Phi takes {phi.input_dim}-d embeddings, {clip_dir} embeds in "
                         f"{backbone.embed_dim} dimensions (another CLIP?)")
    if text_encoder is not None:
        load_text_encoder(backbone, text_encoder)
    recipe = QueryRecipe(prompt=prompt, caption_orders="both", transform=transform)
    provenance = {"phi": str(phi_path), "clip": str(clip_dir), "text_encoder": str(text_encoder) if text_encoder else None}
    return ProjectionComposer(backbone, recipe, phi).save(out, provenance=provenance)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("phi", help="official Phi checkpoint (Pic2Word, SEARLE or LinCIR)")
    parser.add_argument("--clip", required=True, help="the CLIP folder it was trained on (HF save_pretrained)")
    parser.add_argument("--out", required=True, help="model folder to write")
    parser.add_argument("--text-encoder", help="RTD text_encoder_best.pt: replaces the CLIP text encoder")
    parser.add_argument("--prompt", default=PROMPT, help=f"the query prompt (default {PROMPT!r})")
    parser.add_argument("--transform", default="resize", choices=get_args(TransformKind),
                        help="image preprocessing (default: resize, CLIP's)")
    args = parser.parse_args(argv)
    return run_converter(lambda: convert_projection(args.phi, args.clip, args.out, args.text_encoder, args.prompt,
                                                    args.transform))


if __name__ == "__main__":
    raise SystemExit(main())
