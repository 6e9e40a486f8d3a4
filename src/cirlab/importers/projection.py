"""Projection-based zero-shot CIR: Pic2Word, SEARLE and LinCIR's Phi (and RTD's tuned text encoder)
over a CLIP folder, into a ``projection`` model folder.

No Phi can be trained here at the papers' scale, but the released ones can be used:

* Pic2Word (google-research/composed_image_retrieval ``src/main.py``): ``state_dict_img2text`` of
  ``IM2TEXT`` (``[module.]layers.{0,1}.0`` and ``fc_out``); the checkpoint's ``state_dict`` is the
  frozen CLIP itself (openai layout), which the CLIP folder given here replaces;
* SEARLE / LinCIR (miccunifi/SEARLE, navervision/lincir ``train_phi.py``; RTD's ``--phi_checkpoint``):
  ``{"Phi": state}`` with ``layers.{0,3,6}`` (a bare state dict with those keys is read as well);
* RTD (jaeseokbyun/RTD ``train_text_encoder.py``) ``text_encoder_best.pt``:
  ``{"CLIPTextModelWithProjection": state}``, the tuned text tower and projection; it replaces the
  CLIP folder's (the image side, hence every gallery vector, stays).

Recipes as each official evaluation: SEARLE, LinCIR and RTD "a photo of $ that {text}" with
FashionIQ's two orders averaged; Pic2Word "a photo of $ , {text}" with FashionIQ's "c2 and c1" (its
own marker is ``*``; the marker's embedding is replaced either way, docs/compat.md). Preprocessing:
SEARLE's default TargetPad 1.25 (``src/validate.py --preprocess-type targetpad``), CLIP's resize and
center crop for Pic2Word, LinCIR and RTD. RTD's and LinCIR's evaluation loads the text encoder in
fp16 (``validate.py``: ``mixed_precision='fp16'``), so an RTD text encoder is rounded to fp16 values
on import, as the official evaluation rounds it.
"""

from __future__ import annotations

from pathlib import Path
from typing import get_args

from cirlab.composers import ProjectionComposer, QueryRecipe
from cirlab.composers.projection import MARKER
from cirlab.data.transforms import TransformKind
from cirlab.models import load_backbone
from cirlab.models.clip import ClipBackbone
from cirlab.models.phi import Phi

from .common import Importer, check_state, provenance, read_checkpoint, state_dict

PROMPT = f"a photo of {MARKER} that {{text}}"
PIC2WORD_PROMPT = f"a photo of {MARKER} , {{text}}"
_WRAPPERS = ("state_dict_img2text", "Phi", "phi", "state_dict")
# Pic2Word's IM2TEXT names -> our Phi("pic2word") Sequential (Linear, Dropout, ReLU) x 2, Linear
_PIC2WORD = {"layers.0.0": "layers.0", "layers.1.0": "layers.3", "fc_out": "layers.6"}
_TEXT_PREFIXES = ("text_model.", "text_projection.")
# each method's default preprocessing at evaluation
TRANSFORMS: dict[str, TransformKind] = {"pic2word": "resize", "searle": "targetpad", "lincir": "resize", "rtd": "resize"}


def read_official_phi(path: str | Path) -> Phi:
    """A Pic2Word or SEARLE/LinCIR Phi from its official checkpoint; the style is read off the keys."""
    path = Path(path)
    checkpoint = read_checkpoint(path, "Phi checkpoint")
    state = state_dict(checkpoint, path, [k for k in _WRAPPERS if k != "state_dict" or "Phi" not in checkpoint])
    if "fc_out.weight" in state:
        style, renamed = "pic2word", {}
        for name, tensor in state.items():
            module, _, kind = name.rpartition(".")
            if module not in _PIC2WORD:
                raise ValueError(f"{path}: key {name!r} is not part of a Pic2Word Phi (IM2TEXT with 2 hidden layers)")
            renamed[f"{_PIC2WORD[module]}.{kind}"] = tensor
        state, dropout = renamed, 0.1
    elif "layers.6.weight" in state:
        style, dropout = "searle", 0.5
    else:
        raise ValueError(f"{path}: neither a Pic2Word (fc_out.*) nor a SEARLE/LinCIR Phi (layers.6.*); "
                         f"keys {sorted(state)[:6]}")
    phi = Phi(style, state["layers.0.weight"].shape[1], state["layers.6.weight"].shape[0],
              hidden_dim=state["layers.0.weight"].shape[0], dropout=dropout)
    check_state(state, {k: tuple(v.shape) for k, v in phi.state_dict().items()}, path, f"{style} Phi")
    phi.load_state_dict(state)
    return phi.eval()


def load_text_encoder(backbone: ClipBackbone, path: str | Path) -> None:
    """Replace the text tower and projection of ``backbone`` by an RTD ``text_encoder_best.pt``, its
    weights rounded to fp16 values as RTD's evaluation loads them."""
    path = Path(path)
    state = state_dict(read_checkpoint(path, "text encoder checkpoint"), path, ["CLIPTextModelWithProjection"])
    own = backbone.model.state_dict()
    expected = {k: tuple(v.shape) for k, v in own.items() if k.startswith(_TEXT_PREFIXES) and not k.endswith("position_ids")}
    check_state(state, expected, path, "text encoder of this CLIP (CLIPTextModelWithProjection)",
                ignore=("position_ids",))
    # the official evaluation copies it into fp16 parameters: the same rounding (stored in fp32)
    backbone.model.load_state_dict({k: v.half().float() for k, v in state.items() if k in expected}, strict=False)


def import_projection(phi_path: str | Path, clip_dir: str | Path, out: str | Path, *,
                      text_encoder: str | Path | None = None, prompt: str | None = None,
                      transform: TransformKind | None = None, method: str | None = None) -> Path:
    """Write a projection model folder from a CLIP folder and official Phi (and RTD) checkpoints.
    ``method`` (pic2word, searle, lincir, rtd), when given, is checked against the Phi's layout and
    chooses the default ``transform`` (:data:`TRANSFORMS`)."""
    phi = read_official_phi(phi_path)
    pic2word = phi.style == "pic2word"
    if method is not None and (method == "pic2word") != pic2word:
        raise ValueError(f"{phi_path}: a {'Pic2Word' if pic2word else 'SEARLE/LinCIR'} Phi, not {method}'s "
                         f"(import it with `cirlab import {'pic2word' if pic2word else 'lincir'}`)")
    backbone = load_backbone(clip_dir, kind="clip")
    if phi.input_dim != backbone.embed_dim:
        raise ValueError(f"{phi_path}: Phi takes {phi.input_dim}-d embeddings, {clip_dir} embeds in "
                         f"{backbone.embed_dim} dimensions (another CLIP?)")
    if text_encoder is not None:
        load_text_encoder(backbone, text_encoder)
    recipe = QueryRecipe(prompt=prompt or (PIC2WORD_PROMPT if pic2word else PROMPT),
                         caption_orders="pic2word" if pic2word else "both",
                         transform=transform or TRANSFORMS.get(method, "resize"))
    record = provenance(method or phi.style, phi=phi_path, clip=clip_dir, text_encoder=text_encoder)
    return ProjectionComposer(backbone, recipe, phi).save(out, provenance=record)


def _arguments(method: str):
    def add(parser) -> None:
        if method == "rtd":
            parser.add_argument("text_encoder", type=Path, help="RTD's text_encoder_best.pt")
            parser.add_argument("--phi", type=Path, required=True, help="the Phi it was tuned with "
                                "(RTD's --phi_checkpoint: LinCIR's or SEARLE's phi_best.pt)")
        else:
            parser.add_argument("phi", type=Path, help=f"the {method} Phi checkpoint")
        parser.add_argument("--clip", type=Path, required=True, help="the CLIP folder it was trained on "
                            "(HF save_pretrained, e.g. openai/clip-vit-large-patch14)")
        parser.add_argument("--prompt", help=f"the query prompt (default: the method's own, {PROMPT!r} or "
                            f"Pic2Word's {PIC2WORD_PROMPT!r})")
        parser.add_argument("--transform", choices=get_args(TransformKind), help=f"image preprocessing (default: "
                            f"{TRANSFORMS[method]}, the method's own)")
    return add


def _run(method: str):
    return lambda a: import_projection(a.phi, a.clip, a.out, text_encoder=getattr(a, "text_encoder", None),
                                       prompt=a.prompt, transform=a.transform, method=method)


IMPORTERS = [Importer(method, f"{name}'s Phi over a CLIP folder -> a projection model", _arguments(method), _run(method))
             for method, name in (("pic2word", "Pic2Word"), ("searle", "SEARLE"), ("lincir", "LinCIR"))]
IMPORTERS.append(Importer("rtd", "RTD's tuned text encoder + its Phi over a CLIP folder -> a projection model",
                          _arguments("rtd"), _run("rtd")))
