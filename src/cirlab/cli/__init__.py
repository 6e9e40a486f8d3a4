"""The ``cirlab`` command: a thin dispatcher over the library.

Each module in :data:`COMMANDS` adds its sub-commands with ``register(subparsers)``;
the handler it sets as ``func`` receives the parsed arguments and returns an exit code.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import textwrap

COMMANDS = ["cirlab.cli.data", "cirlab.cli.score", "cirlab.cli.compare", "cirlab.cli.train", "cirlab.cli.evaluate", "cirlab.cli.curves",
            "cirlab.cli.demo", "cirlab.cli.importing", "cirlab.cli.index", "cirlab.cli.search", "cirlab.cli.serve", "cirlab.cli.spn"]


DESCRIPTION = """\
cirlab: composed image retrieval. A query is a reference image plus a text saying what to change
("make it blue"); the answer is the gallery images that match both.

Train and evaluate composed retrieval methods (Bi-BLIP4CIR, candidate re-ranking, SPN, RTD,
zero-shot baselines) on FashionIQ, CIRR, CIRCO or the built-in shapes benchmark, then index an
image folder and search it from the command line or a web page.

Start with `cirlab demo --quick` (a few minutes on a CPU); `cirlab COMMAND --help` explains each
command."""

EPILOG = """\
environment: CIRLAB_DEVICE=cpu trains on the CPU on a GPU machine; CIRLAB_CACHE moves the feature
cache; CIRLAB_PLUGINS names modules that register datasets, methods or backbones."""


class HelpFormatter(argparse.HelpFormatter):
    """Descriptions and epilogs keep their paragraphs (separated by a blank line), each wrapped
    to the terminal; option help is wrapped as usual."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        return "\n\n".join(textwrap.fill(" ".join(p.split()), width, initial_indent=indent, subsequent_indent=indent,
                                         break_on_hyphens=False) for p in text.split("\n\n"))

    def _split_lines(self, text: str, width: int) -> list[str]:
        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)  # "re-ranking", "--root" whole


class _Subparsers(argparse._SubParsersAction):
    """Sub-commands whose ``--help`` opens with their one-line help when they have no description."""

    def add_parser(self, name, **kwargs):
        parser = super().add_parser(name, **kwargs)
        if parser.description is None and kwargs.get("help") not in (None, argparse.SUPPRESS):
            parser.description = kwargs["help"]
        return parser


class Parser(argparse.ArgumentParser):
    """Every ``cirlab`` (sub-)parser: paragraphs in descriptions, sub-parsers of this class."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)
        self.register("action", "parsers", _Subparsers)


def version() -> str:
    """The installed package's version (``pip show cirlab``)."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    try:
        return installed("cirlab")
    except PackageNotFoundError:  # run from a source tree that was never installed
        from cirlab import __version__

        return __version__


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="cirlab", description=DESCRIPTION, epilog=EPILOG)
    parser.add_argument("--version", action="version", version=f"%(prog)s {version()}",
                        help="print cirlab's version and exit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    # transformers' progress bars ("Loading weights" on every start) only clutter a command's
    # output; set before transformers is first imported (HF_HUB_DISABLE_PROGRESS_BARS=0 keeps them)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # only a pass-through command (``cirlab import``, parsed in full by its handler) takes them
        if not hasattr(args, "argv"):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.argv = extra + args.argv
    try:
        return int(args.func(args) or 0)
    except USER_ERRORS as e:
        message = e.args[0] if isinstance(e, KeyError) and e.args else e  # KeyError's str() quotes it
        print(f"cirlab {args.command}: error: {message}", file=sys.stderr)
        return 2


# what a user can cause and fix (a path, a file, a server, a value, a diverging run): a sentence and
# exit 2; anything else is a bug in cirlab and keeps its traceback
USER_ERRORS = (OSError, ValueError, KeyError, FloatingPointError)
