"""The ``cirlab`` command: a thin dispatcher over the library.

Each module in :data:`COMMANDS` adds its sub-commands with ``register(subparsers)``;
the handler it sets as ``func`` receives the parsed arguments and returns an exit code.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = ["cirlab.cli.data", "cirlab.cli.score", "cirlab.cli.compare", "cirlab.cli.train", "cirlab.cli.evaluate", "cirlab.cli.curves",
            "cirlab.cli.demo", "cirlab.cli.importing", "cirlab.cli.index", "cirlab.cli.search", "cirlab.cli.serve", "cirlab.cli.spn"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cirlab", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
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
