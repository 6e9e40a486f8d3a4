"""The training engine: run directories, checkpoints, schedules, data parallelism, the loop."""

from cirlab.training.checkpoint import load_checkpoint, load_model_state, save_checkpoint
from cirlab.training.engine import Trainer, build_optimizer
from cirlab.training.run import RunDir

__all__ = ["RunDir", "Trainer", "build_optimizer", "load_checkpoint", "load_model_state", "save_checkpoint"]
