"""Progress bars for long loops: rate and ETA on a terminal, plain lines in log files,
silent on every rank but the main one.

On a terminal a bar redraws itself in place. Anywhere else (a redirected log, a pipe, a CI
console) each update is one plain line ending in a newline, at most one every 30 s, plus the
final count: no carriage returns, no bar characters, nothing a log reader has to untangle.
"""

from __future__ import annotations

import sys
from typing import Any, Iterable, TextIO, TypeVar

import torch.distributed as dist
from tqdm import tqdm

T = TypeVar("T")

LOG_INTERVAL = 30.0  # seconds between two lines in a log file
# a log line: the counts, times and postfix of tqdm's bar, without the bar
LOG_FORMAT = "{desc}: {percentage:3.0f}% {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}{postfix}]"


def _is_terminal(file: Any) -> bool:
    try:
        return bool(file.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed file
        return False


class LineWriter:
    """A file for tqdm that turns its in-place redraws into plain lines.

    tqdm writes ``"\\r" + status + padding`` for each refresh and a bare ``"\\n"`` or ``"\\r"``
    when it closes; each non-empty status becomes one line ending in ``"\\n"``, the rest is
    dropped."""

    def __init__(self, file: TextIO) -> None:
        self.file = file

    def write(self, text: str) -> int:
        for part in text.replace("\n", "\r").split("\r"):
            part = part.rstrip()
            if part:
                self.file.write(part + "\n")
        return len(text)

    def flush(self) -> None:
        self.file.flush()

    @property
    def encoding(self) -> str | None:
        return getattr(self.file, "encoding", None)

    def isatty(self) -> bool:
        return False


class LogLines(tqdm):
    """``tqdm`` for a log file (give it a :class:`LineWriter`): no line for the 0 of the start
    (the first comes after ``mininterval``) and no second line for a count already printed."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._shown: float | None = None  # the count of the last line, None before the first
        self._ready = False
        super().__init__(*args, **kwargs)
        self._ready = True

    def display(self, msg: str | None = None, pos: int | None = None) -> bool:
        if msg is None:  # a status line (msg="" is tqdm clearing its bar: nothing to clear in a log)
            if not self._ready or (self.disable and self._shown == self.n):  # start; closing on a printed count
                return True
            self._shown = self.n
        return super().display(msg, pos)


def _total(iterable: Iterable[Any] | None, kwargs: dict[str, Any]) -> float | None:
    if kwargs.get("total") is not None:
        return kwargs["total"]
    try:
        return len(iterable)  # type: ignore[arg-type]
    except TypeError:
        return None


def progress(iterable: Iterable[T] | None = None, *, desc: str, **kwargs: Any) -> tqdm:
    """``tqdm`` with cirlab's defaults; extra keyword arguments go to ``tqdm``.

    On a terminal: a bar refreshed every 0.5 s. Elsewhere (``file``, default stderr, is not a
    terminal): one line per refresh, at most every 30 s, and the final line."""
    file = kwargs.get("file") or sys.stderr
    kwargs.setdefault("disable", dist.is_initialized() and dist.get_rank() != 0)
    if _is_terminal(file):
        kwargs.setdefault("mininterval", 0.5)
        kwargs.setdefault("dynamic_ncols", True)
        return tqdm(iterable, desc=desc, **kwargs)
    kwargs["file"] = LineWriter(file)
    kwargs.setdefault("mininterval", LOG_INTERVAL)
    # tqdm's monitor thread forces a refresh after maxinterval (default 10 s) when updates slow down
    kwargs.setdefault("maxinterval", max(kwargs["mininterval"], LOG_INTERVAL))
    kwargs.setdefault("dynamic_ncols", False)
    if _total(iterable, kwargs) is not None:  # unknown totals: tqdm's own format has no bar
        kwargs.setdefault("bar_format", LOG_FORMAT)
    return LogLines(iterable, desc=desc, **kwargs)
