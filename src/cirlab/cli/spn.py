"""``cirlab spn generate``: SPN's generated positives, written as a training-split extension file
(the same as ``cirlab train`` on a config with ``method.stage: generate``; kept as SPN's own word)."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("spn", help="SPN's offline steps (stage 2 trains with `cirlab train`)")
    commands = p.add_subparsers(dest="spn_command", required=True, metavar="COMMAND")
    g = commands.add_parser("generate", help="caption the training images and write generated triplets")
    g.add_argument("--config", required=True, type=Path, help="a config with method.stage: generate")
    g.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set method.window=[10,100]")
    g.set_defaults(func=generate)


def generate(args: argparse.Namespace) -> int:
    from cirlab.config import load_config
    from cirlab.methods import spec_of

    cfg = load_config(args.config, args.overrides)
    spec = spec_of(cfg, str(args.config))
    if (spec.method, spec.stage) != ("spn", "generate"):
        raise ValueError(f"{args.config}: method must be spn with stage generate")
    spec.run(cfg)
    return 0
