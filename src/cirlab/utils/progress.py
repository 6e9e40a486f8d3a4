"""Progress bars for long loops: rate and ETA on a terminal, sparse lines in log files,
silent on every rank but the main one."""

from __future__ import annotations

import sys
from typing import Any, Iterable, TypeVar

import torch.distributed as dist
from tqdm import tqdm

T = TypeVar("T")


def progress(iterable: Iterable[T] | None = None, *, desc: str, **kwargs: Any) -> tqdm:
    """``tqdm`` with cirlab's defaults; extra keyword arguments go to ``tqdm``."""
    tty = sys.stderr.isatty()
    kwargs.setdefault("disable", dist.is_initialized() and dist.get_rank() != 0)
    kwargs.setdefault("mininterval", 0.5 if tty else 30.0)  # a log file gets a line every 30 s
    kwargs.setdefault("dynamic_ncols", tty)
    return tqdm(iterable, desc=desc, **kwargs)
