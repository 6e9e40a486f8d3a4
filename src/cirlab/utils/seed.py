"""Seeding and RNG state capture, so that a resumed run draws the same random numbers.

Every RNG that training touches is covered: python ``random``, numpy's global RNG,
torch's CPU generator and, once CUDA is in use, the current CUDA device's generator (each
data-parallel process owns one device; touching the others would create contexts on them).
States are stored as plain tensors and python values so that checkpoints load with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import random
from contextlib import contextmanager
from typing import Any, Iterator

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device


def rng_state() -> dict[str, Any]:
    name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {
            "name": name,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(_as_tuple(state["python"]))
    n = state["numpy"]
    np.random.set_state(
        (n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


@contextmanager
def preserve_rng() -> Iterator[None]:
    """Run a block (e.g. evaluation) without moving the training RNG streams, so that
    evaluating or not never changes the training trajectory."""
    saved = rng_state()
    try:
        yield
    finally:
        set_rng_state(saved)


def _as_tuple(x: Any) -> Any:
    """``random.setstate`` needs tuples; a round trip through a checkpoint may give lists."""
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x
