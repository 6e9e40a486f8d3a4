"""``cirlab import KIND CHECKPOINT... --out DIR``: an official checkpoint as a cirlab model folder.

The kinds and their arguments come from :mod:`cirlab.importers` (one module per source); they are
parsed only once ``cirlab import`` runs, so that the other commands start without loading the
importers' model code."""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = "import a released checkpoint of the official code (docs/models.md)"
DESCRIPTION = ("Turn a checkpoint released with a method's official code into a cirlab model folder: "
               "cirlab import KIND CHECKPOINT... --out DIR. cirlab eval --model, cirlab index build and "
               "cirlab.load() then use it like a model trained here. cirlab import KIND --help lists a "
               "kind's arguments; docs/models.md lists the releases and where they come from.")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("import", help=HELP, add_help=False, description=HELP)
    p.add_argument("argv", nargs=argparse.REMAINDER, help="KIND and its arguments (cirlab import --help)")
    p.set_defaults(func=run)


def parser() -> argparse.ArgumentParser:
    """The full ``cirlab import`` parser, one sub-parser per importer kind."""
    from cirlab.importers import IMPORTERS

    from cirlab.cli import Parser

    p = Parser(prog="cirlab import", description=DESCRIPTION)
    kinds = p.add_subparsers(dest="kind", required=True, metavar="KIND")
    for importer in IMPORTERS.values():
        k = kinds.add_parser(importer.kind, help=importer.help, description=importer.help)
        importer.arguments(k)
        k.add_argument("--out", type=Path, required=True, help="the model folder to write (atomically; an existing "
                       "folder is replaced only once the new one is complete)")
        k.set_defaults(run=importer.run)
    return p


def run(args: argparse.Namespace) -> int:
    parsed = parser().parse_args(args.argv)
    print(parsed.run(parsed))
    return 0
