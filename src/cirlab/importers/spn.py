"""SPN4CIR (BUAADreamer/SPN4CIR): the BLIP4CIR variant's stage-2 checkpoint into a ``grounded`` folder.

``blip4cir/train.py`` fine-tunes the re-ranking paper's stage-I model (BLIP's image-grounded text
encoder over a frozen ViT) against the static bank and saves ``{"epoch", "state_dict": ...}``
(``blip4cir/utils.py``) of its wrapper: the learned ``tau`` and the BLIP retrieval model under
``blip.*``. The query and gallery are those of the filter, so the folder is a ``grounded`` model;
a re-ranker can be put over it (``cirlab train`` with ``configs/rerank/*_reranker.yaml``).

SPN4CIR's CLIP4CIR variant stands on OpenAI's RN50x4 (a ResNet with attention pooling, ``clip``'s
``ModifiedResNet``), which HF transformers does not implement; it cannot be imported
(docs/models.md).
"""

from __future__ import annotations

from pathlib import Path

from cirlab.composers import GroundedComposer

from .blip import blip_backbone
from .common import Importer, provenance, read_checkpoint, state_dict
from .rerank import RECIPE


def import_spn_blip4cir(checkpoint: str | Path, out: str | Path) -> Path:
    path = Path(checkpoint)
    state = state_dict(read_checkpoint(path, "SPN4CIR BLIP4CIR checkpoint"), path, ["state_dict"], prefix="blip.")
    backbone = blip_backbone(state, path, "SPN4CIR BLIP4CIR checkpoint (state_dict: blip.*)", itm_head=False)
    return GroundedComposer(backbone, RECIPE).save(out, provenance=provenance("spn-blip4cir", checkpoint=path))


def _arguments(parser) -> None:
    parser.add_argument("checkpoint", type=Path, help="SPN4CIR's blip4cir stage-2 checkpoint (best.pt)")


IMPORTERS = [Importer("spn-blip4cir", "SPN4CIR's BLIP4CIR stage 2 -> a grounded model", _arguments,
                      lambda a: import_spn_blip4cir(a.checkpoint, a.out))]
