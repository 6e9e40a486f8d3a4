"""``cirlab pretrain|train``: run a method's training on the engine from a config file.

The run ends with one self-contained folder named by what the stage produces, ``<run>/model``
(pretraining: ``<run>/backbone``), written from the checkpoint that ``trainer.select_metric``
chose. A stage that produces files (``spn`` stage ``generate``) runs in one pass instead."""

from __future__ import annotations

import argparse
from pathlib import Path

from cirlab.config import load_config


DESCRIPTIONS = {
    "pretrain": "Pretrain a small BLIP on the shapes benchmark's scene captions (image-text "
                "contrastive), from a config such as configs/pretrain/shapes_blip.yaml.",
    "train": "Train a method from an experiment config (configs/<method>/<dataset>_*.yaml).",
}
DESCRIPTION = """{what}

Where the result goes: the run directory (--run-dir, default <trainer.output_dir>/<name>-<time>, \
i.e. runs/<name>-<time>) holds config.yaml, metrics.jsonl, the checkpoints (latest.pt, best.pt) \
and, at the end, the exported {produces} folder <run-dir>/{produces}, written from best.pt when \
trainer.select_metric is set (else from the final weights). {use}

Device: the first CUDA GPU when one is visible, else the CPU; CIRLAB_DEVICE=cpu forces the CPU. \
Several GPUs: torchrun --standalone --nproc_per_node N -m cirlab {command} ... (one process per \
GPU, data parallel). Precision: trainer.precision (auto: bf16 where the hardware runs it \
natively, else fp32; CIRLAB_PRECISION overrides). docs/training.md has the details.

A stage that writes files instead of a model (SPN's method.stage: generate) runs in one pass and \
prints what it wrote."""
USES = {"pretrain": "Use it as model.backbone of a later config.",
        "train": "Evaluate it with cirlab eval --model <run-dir>/model, index it with cirlab index "
                 "build --model <run-dir>/model, or load it in Python with cirlab.load(\"<run-dir>/model\")."}


def register(sub: argparse._SubParsersAction) -> None:
    for name, help_text, produces in (("pretrain", "pretrain a small backbone on shapes scene captions", "backbone"),
                                      ("train", "train a method; the model ends up in <run-dir>/model", "model")):
        p = sub.add_parser(name, help=help_text, description=DESCRIPTION.format(
            what=DESCRIPTIONS[name], produces=produces, use=USES[name], command=name))
        p.add_argument("--config", type=Path, help="experiment YAML (not with --resume: the run's own config.yaml is used)")
        p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config field, e.g. --set trainer.epochs=3 (repeatable)")
        p.add_argument("--run-dir", type=Path, help="run directory (default: <trainer.output_dir>/<name>-<time>, "
                       f"e.g. runs/<name>-20250101-120000); the result is <run-dir>/{produces}")
        p.add_argument("--resume", action="store_true", help="continue the run in --run-dir from latest.pt")
        p.set_defaults(func=train)


def train(args: argparse.Namespace) -> int:
    from cirlab.data.images import collate_skip_none
    from cirlab.methods import spec_of
    from cirlab.training import distributed
    from cirlab.training.checkpoint import load_checkpoint
    from cirlab.training.engine import Trainer
    from cirlab.training.run import RunDir
    from cirlab.utils.report import format_metrics
    from cirlab.utils.seed import seed_everything

    if args.resume:
        if args.run_dir is None:
            raise ValueError("--resume needs --run-dir (the run to continue)")
        if args.config or args.overrides:
            raise ValueError("--resume continues with the run's own config.yaml; drop --config and --set")
        run = RunDir.open(args.run_dir, lock=True)  # a second resumer fails here, before building
        cfg = run.load_config()
    elif args.config is None:
        raise ValueError("--config is required (or --resume --run-dir DIR to continue a run)")
    else:
        run, cfg = None, load_config(args.config, args.overrides)
    source = args.config or run.config_path
    spec = spec_of(cfg, str(source))
    if spec.produces == "composers":
        raise ValueError(f"{source}: method {spec.label} is not trained (evaluate it with cirlab eval --config)")
    seed_everything(cfg.seed)  # before build: the model's random initialisation is part of the run
    if spec.produces == "files":  # one pass, no engine: the stage writes where its config says
        for path in spec.run(cfg):
            print(f"wrote {path}")
        return 0
    select = cfg.trainer.select_metric
    stage = spec.build(cfg)
    if select is not None and select not in stage.metric_names:
        raise ValueError(f"{source}: trainer.select_metric {select!r} is not a validation metric of this stage "
                         f"(one of {', '.join(stage.metric_names)})")
    run = run or RunDir.create(cfg, args.run_dir)  # only once the config has proved buildable
    trainer = Trainer(stage.model, stage.train_data, cfg, run, collate_fn=collate_skip_none, evaluate=stage.evaluate,
                      resume=args.resume, param_groups=stage.param_groups)
    metrics = trainer.fit()
    distributed.barrier()  # the main rank's last checkpoint is on disk before anyone reads it
    if not distributed.is_main():
        return 0
    provenance = {"run": str(run.path.resolve()), "checkpoint": "final", "step": metrics.get("step")}
    if select is not None and run.best.is_file():
        best = load_checkpoint(run.best)
        stage.model.load_state_dict(best["model"])
        provenance.update(checkpoint="best.pt", step=best["step"], select_metric=select, value=best["best_metric"])
    folder = stage.export(stage.model, run.path / spec.produces, provenance)
    which = f"best.pt (step {provenance['step']}, {select} = {provenance['value']:.2f})" \
        if provenance["checkpoint"] == "best.pt" else f"the final weights (step {provenance['step']})"
    print(f"exported {folder} from {which}")
    print(format_metrics(metrics))
    print(f"run directory: {run.path}")
    return 0
