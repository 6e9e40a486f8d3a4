"""``cirlab pretrain|train``: run a method's training on the engine from a config file."""

from __future__ import annotations

import argparse
import importlib
import json
from pathlib import Path

from cirlab.config import load_config


def register(sub: argparse._SubParsersAction) -> None:
    for name, help_text in (("pretrain", "pretrain a small backbone on shapes scene captions"),
                            ("train", "train a method")):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--config", type=Path, help="experiment YAML (not with --resume: the run's own config.yaml is used)")
        p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config field, e.g. --set trainer.epochs=3")
        p.add_argument("--run-dir", type=Path, help="run directory (default: <trainer.output_dir>/<name>-<time>)")
        p.add_argument("--resume", action="store_true", help="continue the run in --run-dir from latest.pt")
        p.set_defaults(func=train)


def train(args: argparse.Namespace) -> int:
    from cirlab.data.images import collate_skip_none
    from cirlab.methods import METHODS
    from cirlab.training.engine import Trainer
    from cirlab.training.run import RunDir
    from cirlab.utils.seed import seed_everything

    if args.resume:
        if args.run_dir is None:
            raise ValueError("--resume needs --run-dir (the run to continue)")
        if args.config or args.overrides:
            raise ValueError("--resume continues with the run's own config.yaml; drop --config and --set")
        run = RunDir.open(args.run_dir)
        cfg = run.load_config()
    elif args.config is None:
        raise ValueError("--config is required (or --resume --run-dir DIR to continue a run)")
    else:
        run, cfg = None, load_config(args.config, args.overrides)
    name = cfg.method.get("name", "pretrain" if args.command == "pretrain" else None)
    method = importlib.import_module(METHODS[name]) if name in METHODS else None
    if method is None or not hasattr(method, "build"):
        trainable = sorted(n for n, m in METHODS.items() if hasattr(importlib.import_module(m), "build"))
        raise ValueError(f"{args.config}: method.name must be a trainable method, one of {trainable}; got {name!r}")
    seed_everything(cfg.seed)  # before build: the model's random initialisation is part of the run
    model, train_data, evaluate = method.build(cfg)
    run = run or RunDir.create(cfg, args.run_dir)  # only once the config has proved buildable
    trainer = Trainer(model, train_data, cfg, run, collate_fn=collate_skip_none, evaluate=evaluate, resume=args.resume,
                      param_groups=getattr(model, "param_groups", lambda: None)())
    metrics = trainer.fit()
    if hasattr(method, "export"):
        print(f"exported {method.export(model, run)}")
    print(json.dumps(metrics, indent=1))
    print(f"run directory: {run.path}")
    return 0
