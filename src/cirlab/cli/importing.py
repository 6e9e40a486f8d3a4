"""``cirlab import KIND CHECKPOINT... --out DIR``: an official checkpoint as a cirlab model folder."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    from cirlab.importers import IMPORTERS

    p = sub.add_parser("import", help="import a released checkpoint of the official code (docs/models.md)",
                       description=__doc__.splitlines()[0])
    kinds = p.add_subparsers(dest="kind", required=True, metavar="KIND")
    for importer in IMPORTERS.values():
        k = kinds.add_parser(importer.kind, help=importer.help, description=importer.help)
        importer.arguments(k)
        k.add_argument("--out", type=Path, required=True, help="the model folder to write (atomically; an existing "
                       "folder is replaced only once the new one is complete)")
        k.set_defaults(func=lambda args, run=importer.run: print(run(args)) or 0)
