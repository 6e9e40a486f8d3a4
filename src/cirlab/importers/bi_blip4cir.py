"""Bi-BLIP4CIR (Cuberick-Orion/Bi-Blip4CIR): stage I's ``tuned_blip_*.pt`` and stage II's
``combiner*.pt`` into a ``sum`` or ``combiner`` model folder.

Stage I trains BLIP's text encoder and ``text_proj`` only; its checkpoint (``src/utils.py``
``save_model``) holds ``{"epoch", "BLIPTextEncoder": state, "optimizer_state_dict"}`` with
``text_encoder.*`` and ``text_proj.*``. The image side is BLIP's pre-trained ViT and ``vision_proj``
from ``model_base.pth`` at 384 px (``BLIPImgEncoder``), so the import needs that file (or a BLIP
folder made from it by ``cirlab import blip``). Stage II's checkpoint holds ``{"Combiner": state}``
with CLIP4Cir's names (``text_projection_layer``, ``image_projection_layer``, ``combiner_layer``,
``output_layer``, ``dynamic_scalar.{0,3}``).

The recipe is the official one: the direction marker as the text prefix ``[FORWARD]``
(``direction: compat``), FashionIQ's "C1 and c2" with '.?, ' stripped, texts cut at 77 tokens,
TargetPad 1.25 at 384 px.
"""

from __future__ import annotations

from pathlib import Path

from cirlab.composers import CombinerComposer, QueryRecipe, SumComposer
from cirlab.models import BlipBackbone, load_backbone
from cirlab.models.combiner import Combiner

from .blip import blip_backbone, load_blip_state
from .common import Importer, check_state, provenance, read_checkpoint, state_dict

RECIPE = QueryRecipe(direction="compat", caption_orders="one", max_text_length=77, transform="targetpad",
                     target_ratio=1.25)
_COMBINER_NAMES = {"text_projection_layer.": "text_proj.", "image_projection_layer.": "image_proj."}


def blip_image_side(blip: str | Path, image_size: int = 384) -> BlipBackbone:
    """A BLIP backbone to take the image side from: ``model_base.pth`` or a BLIP backbone folder."""
    blip = Path(blip)
    if blip.is_dir():
        backbone = load_backbone(blip, kind="blip")
        if backbone.image_size != image_size:
            raise ValueError(f"{blip}: a BLIP folder at {backbone.image_size} px; Bi-BLIP4CIR runs {image_size} "
                             f"(import model_base.pth again with --image-size {image_size})")
        return backbone
    return blip_backbone(load_blip_state(blip), blip, "BLIP checkpoint", image_size=image_size)


def load_text_side(backbone: BlipBackbone, path: Path) -> None:
    """Replace ``text_encoder`` and ``text_proj`` by a stage-I checkpoint's."""
    state = state_dict(read_checkpoint(path, "Bi-BLIP4CIR stage-I checkpoint"), path, ["BLIPTextEncoder"])
    own = {f"{part}.{k}": v for part in ("text_encoder", "text_proj")
           for k, v in getattr(backbone.model, part).state_dict().items() if not k.endswith("position_ids")}
    check_state(state, {k: tuple(v.shape) for k, v in own.items()}, path, "Bi-BLIP4CIR stage-I checkpoint "
                "(BLIPTextEncoder: text_encoder.*, text_proj.*)", ignore=("position_ids",))
    for part in ("text_encoder", "text_proj"):
        getattr(backbone.model, part).load_state_dict(
            {k.removeprefix(f"{part}."): v for k, v in state.items() if k.startswith(f"{part}.")}, strict=False)


def read_combiner(path: Path, feature_dim: int) -> Combiner:
    """The official Combiner (CLIP4Cir's class), its sizes read off the tensors."""
    state = state_dict(read_checkpoint(path, "Combiner checkpoint"), path, ["Combiner"])
    for theirs, ours in _COMBINER_NAMES.items():
        state = {(ours + k.removeprefix(theirs)) if k.startswith(theirs) else k: v for k, v in state.items()}
    if "text_proj.weight" not in state or "combiner_layer.weight" not in state:
        raise ValueError(f"{path}: not a Combiner checkpoint: missing key "
                         f"{'text_projection_layer.weight' if 'text_proj.weight' not in state else 'combiner_layer.weight'!r}")
    projection, hidden = state["text_proj.weight"].shape[0], state["combiner_layer.weight"].shape[0]
    combiner = Combiner(feature_dim, projection, hidden)
    expected = {k: tuple(v.shape) for k, v in combiner.state_dict().items()}
    theirs = {k: v for k, v in state.items()}
    check_state(theirs, expected, path, f"Combiner over {feature_dim}-d features")
    combiner.load_state_dict(theirs)
    return combiner.eval()


def import_bi_blip4cir(stage1: str | Path, out: str | Path, *, blip: str | Path,
                       combiner: str | Path | None = None) -> Path:
    """Stage I (and with ``combiner`` stage II) of Bi-BLIP4CIR as a model folder."""
    stage1 = Path(stage1)
    backbone = blip_image_side(blip)
    load_text_side(backbone, stage1)
    if combiner is None:
        composer = SumComposer(backbone, RECIPE)
    else:
        composer = CombinerComposer(backbone, RECIPE, read_combiner(Path(combiner), backbone.embed_dim))
    return composer.save(out, provenance=provenance("bi-blip4cir", stage1=stage1, combiner=combiner, blip=blip))


def _arguments(parser) -> None:
    parser.add_argument("stage1", type=Path, help="the stage-I checkpoint, e.g. tuned_blip_mean.pt")
    parser.add_argument("--combiner", type=Path, help="the stage-II checkpoint, e.g. combiner_mean.pt "
                        "(without it: the stage-I model, image + text sum)")
    parser.add_argument("--blip", type=Path, required=True, help="BLIP's model_base.pth (the frozen image "
                        "side) or a folder made from it by `cirlab import blip`")


IMPORTERS = [Importer("bi-blip4cir", "Bi-BLIP4CIR stage I (+ Combiner) -> a sum / combiner model", _arguments,
                      lambda a: import_bi_blip4cir(a.stage1, a.out, blip=a.blip, combiner=a.combiner))]
