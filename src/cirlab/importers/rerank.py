"""Candidate Re-ranking (Cuberick-Orion/Candidate-Reranking-CIR): stage I (the grounded filter) into a
``grounded`` model folder, stage II (the dual encoder) with its stage I into a ``rerank`` folder.

Both trainers save ``{"epoch", "<Model>": state, "optimizer_state_dict"}`` (``src/utils.py``):
* stage I ``BLIP_Retrieval``: the whole BLIP retrieval model at 384 px (``visual_encoder.*`` with 577
  positions, ``text_encoder.*``, ``vision_proj``, ``text_proj``, the learned ``temp``), no ITM head;
* stage II ``BLIP_NLVR``: its own copy of the (frozen) ViT, a text encoder whose every attention
  block has two branches (``attention.self0/self1``, ``output.dense0/dense1``,
  ``output.LayerNormA/B``; cross-attention the same plus ``output.merge_layer`` from layer 6 on),
  one shared FFN per layer, and ``cls_head.{0,2}``. Branch 0 (``self0``, ``dense0``, ``LayerNormA``)
  reads z_t, branch 1 the text (``src/nlvr_encoder.py``); cirlab's
  :class:`~cirlab.models.dual_encoder.DualEncoderReranker` names them ``attention.0`` / ``.1``.

The rerank folder has one image encoder, stage II's (the one ``validate_stage2.py`` re-ranks with);
in the official recipe it equals stage I's (both are ``model_base``'s, frozen). Recipes as the
official evaluation: no truncation of the text (BERT's 512 positions), FashionIQ "C1 and c2",
TargetPad 1.25, and below the top K nothing ranked (``beyond_k: official``).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import torch

from cirlab.composers import GroundedComposer, QueryRecipe, RerankComposer
from cirlab.models import BlipBackbone
from cirlab.models.dual_encoder import DualEncoderReranker

from .blip import blip_backbone, hf_name, official_name
from .common import Importer, check_state, provenance, read_checkpoint, state_dict

RECIPE = QueryRecipe(caption_orders="one", max_text_length=512, transform="targetpad", target_ratio=1.25)


def stage1_backbone(path: Path) -> BlipBackbone:
    state = state_dict(read_checkpoint(path, "re-ranking stage-I checkpoint"), path, ["BLIP_Retrieval"])
    return blip_backbone(state, path, "re-ranking stage-I checkpoint (BLIP_Retrieval)", itm_head=False)


def import_rerank_stage1(checkpoint: str | Path, out: str | Path) -> Path:
    """Stage I (``blip_mean.pt`` of ``stage1_train.py``) as a ``grounded`` model folder."""
    path = Path(checkpoint)
    composer = GroundedComposer(stage1_backbone(path), RECIPE)
    return composer.save(out, provenance=provenance("rerank-stage1", stage1=path))


def official_reranker_name(name: str) -> str:
    """The official ``BLIP_NLVR`` name of a :class:`DualEncoderReranker` tensor."""
    if name.startswith("cls_head."):
        return name
    if name.startswith("embeddings."):
        return "text_encoder." + name
    layer, rest = re.fullmatch(r"layers\.(\d+)\.(.+)", name).groups()
    prefix = f"text_encoder.encoder.layer.{layer}."
    if rest.startswith("merge_layer."):
        return prefix + "crossattention.output." + rest
    block = re.fullmatch(r"(attention|crossattention)\.([01])\.(self|output)\.(\w+)\.(weight|bias)", rest)
    if block is None:  # intermediate.dense.*, output.dense.*, output.LayerNorm.*: the shared FFN
        return prefix + rest
    kind, branch, part, module, param = block.groups()
    if part == "self":
        return f"{prefix}{kind}.self{branch}.{module}.{param}"
    module = f"dense{branch}" if module == "dense" else "LayerNorm" + "AB"[int(branch)]
    return f"{prefix}{kind}.output.{module}.{param}"


def read_reranker(path: Path, stage1: BlipBackbone) -> tuple[DualEncoderReranker, dict[str, torch.Tensor]]:
    """The stage-II re-ranker and the checkpoint's ViT tensors (BLIP names)."""
    state = state_dict(read_checkpoint(path, "re-ranking stage-II checkpoint"), path, ["BLIP_NLVR"])
    model = DualEncoderReranker(stage1.text_encoder.config, enc_token_id=stage1.enc_token_id)
    names = {official_reranker_name(k): k for k in model.state_dict() if not k.endswith("position_ids")}
    vit = {k: v for k, v in state.items() if k.startswith("visual_encoder.")}
    expected = {theirs: tuple(model.state_dict()[ours].shape) for theirs, ours in names.items()}
    check_state({k: v for k, v in state.items() if k not in vit}, expected, path,
                "re-ranking stage-II checkpoint (BLIP_NLVR)", ignore=("position_ids",))
    model.load_state_dict({ours: state[theirs] for theirs, ours in names.items()}, strict=False)
    return model.eval(), vit


def import_rerank_stage2(checkpoint: str | Path, out: str | Path, *, stage1: str | Path, k: int = 50) -> Path:
    """Stage II (``BLIP_NLVR``) over its stage I as a ``rerank`` model folder re-ranking the top ``k``
    (official: 50 on CIRR, 100 on FashionIQ).

    The folder's image encoder is stage II's, as ``validate_stage2.py`` encodes both the candidates
    and the reference that z_t reads with it; the text side and ``vision_proj`` are stage I's. In
    the official recipe both ViTs are ``model_base``'s, frozen; if they differ, the import says so,
    since the first-stage ranking then runs on stage II's ViT too."""
    path, stage1 = Path(checkpoint), Path(stage1)
    backbone = stage1_backbone(stage1)
    reranker, vit = read_reranker(path, backbone)
    own = backbone.model.vision_model.state_dict()
    check_state(vit, {official_name(f"vision_model.{k}"): tuple(v.shape) for k, v in own.items()}, path,
                "re-ranking stage-II checkpoint's ViT (visual_encoder.* at stage I's resolution)")
    theirs = {hf_name(k).removeprefix("vision_model."): v for k, v in vit.items()}
    differs = [k for k, v in theirs.items() if not torch.equal(own[k], v.to(own[k].dtype))]
    backbone.model.vision_model.load_state_dict(theirs)
    if differs:
        print(f"warning: {path}: its ViT differs from stage I's ({stage1}), e.g. {differs[0]}; the folder uses stage "
              f"II's for every image (as validate_stage2.py for the candidates and z_t), so its first stage no "
              f"longer ranks exactly as stage I did", file=sys.stderr)
    composer = RerankComposer(GroundedComposer(backbone, RECIPE), reranker, k=k, beyond_k="official")
    record = provenance("rerank-stage2", stage2=path, stage1=stage1)
    record["vit"] = "stage2, differs from stage1" if differs else "stage2 = stage1"
    return composer.save(out, provenance=record)


def _stage1_arguments(parser) -> None:
    parser.add_argument("checkpoint", type=Path, help="stage I's checkpoint (stage1_train.py, BLIP_Retrieval)")


def _stage2_arguments(parser) -> None:
    parser.add_argument("checkpoint", type=Path, help="stage II's checkpoint (stage2_train.py, BLIP_NLVR)")
    parser.add_argument("--stage1", type=Path, required=True, help="the stage-I checkpoint it re-ranks")
    parser.add_argument("--k", type=int, default=50, help="re-ranking depth (official: CIRR 50, FashionIQ 100)")


IMPORTERS = [
    Importer("rerank-stage1", "Candidate Re-ranking stage I (grounded filter) -> a grounded model",
             _stage1_arguments, lambda a: import_rerank_stage1(a.checkpoint, a.out)),
    Importer("rerank-stage2", "Candidate Re-ranking stage II (dual encoder) + stage I -> a rerank model",
             _stage2_arguments, lambda a: import_rerank_stage2(a.checkpoint, a.out, stage1=a.stage1, k=a.k)),
]
