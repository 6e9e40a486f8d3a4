"""``cirlab import``: released checkpoints of the official repositories as cirlab model folders.

One module per source, each listing its :class:`~cirlab.importers.common.Importer` entries; the
folder an importer writes is taken by ``cirlab.load``, ``cirlab eval``, ``cirlab index``, ``cirlab
serve`` and the second stages (SPN's bank, the re-ranker) like any model trained here. What each
import was checked against (the official code, at real size): docs/compat.md; the checkpoints
and the papers' numbers: docs/models.md.
"""

from . import bi_blip4cir, blip, projection, rerank, spn
from .bi_blip4cir import import_bi_blip4cir
from .blip import import_blip
from .common import Importer
from .projection import import_projection
from .rerank import import_rerank_stage1, import_rerank_stage2
from .spn import import_spn_blip4cir

IMPORTERS: dict[str, Importer] = {i.kind: i for m in (blip, bi_blip4cir, rerank, spn, projection) for i in m.IMPORTERS}

__all__ = ["IMPORTERS", "Importer", "import_bi_blip4cir", "import_blip", "import_projection", "import_rerank_stage1",
           "import_rerank_stage2", "import_spn_blip4cir"]
