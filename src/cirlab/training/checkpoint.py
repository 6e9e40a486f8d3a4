"""Checkpoint files: written atomically, read with errors that name the file.

A training checkpoint is a plain dict: ``model`` and ``optimizer`` state dicts, the position
(``epoch``, ``step``, ``step_in_epoch``), ``best_metric``, ``rng`` (one state per rank),
``world_size`` and the ``config``. The weights under ``"model"`` need nothing but ``torch.load``::

    model.load_state_dict(load_model_state("runs/x/best.pt"))

Everything in it is tensors and python values, so it loads with ``weights_only=True``.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch

from cirlab.utils.io import atomic_path

FORMAT = "cirlab-checkpoint-1"


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """Write to a temporary file in the same folder, then rename: a crash mid-write leaves
    the previous checkpoint intact and no partial file behind. A failed write (on a full disk
    torch says only "unexpected pos ...") is re-raised naming the file and the free space."""
    try:
        with atomic_path(path) as tmp:
            torch.save({"format": FORMAT, **state}, tmp)
    except (OSError, RuntimeError) as e:
        free = shutil.disk_usage(Path(path).parent).free / 2**20
        raise OSError(f"could not write checkpoint {path} ({free:.0f} MiB free on its disk; the previous "
                      f"checkpoint, if any, is intact): {e}") from e


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises RuntimeError, EOFError, UnpicklingError... for bad files
        raise ValueError(f"checkpoint {path} is corrupted or truncated and cannot be read: {e}") from None
    if not isinstance(state, dict) or "model" not in state:
        raise ValueError(f"checkpoint {path} is not a cirlab checkpoint: expected a dict with a 'model' entry")
    return state


def load_model_state(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """The model's ``state_dict`` from a checkpoint, without any training code."""
    return load_checkpoint(path, map_location)["model"]
