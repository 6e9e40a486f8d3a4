"""Crash points: named places in the write paths where a test can kill the process.

``CIRLAB_CRASH_AT=<point>[@<text>][#<n>]`` ends the process at the ``n``-th time (default the
first) it passes the point ``<point>`` with a detail (the file being written) that contains
``<text>``, with ``os._exit``: no ``finally``, no flush, as a kill -9 or a power cut would. A
test runs a write path that way and checks what it leaves behind. Unset, a crash point costs
one environment lookup. :data:`POINTS` lists every point, so that a test can prove it covers all.
"""

from __future__ import annotations

import os
import re

CRASH_EXIT = 86  # the exit code of a process ended by a crash point (tests tell it from a failure)

POINTS: dict[str, str] = {}  # name -> where it is, filled by :func:`register`
_hits: dict[str, int] = {}
_SPEC = re.compile(r"(?P<point>[^@#]+)(?:@(?P<text>[^#]*))?(?:#(?P<n>\d+))?")


def register(name: str, where: str) -> str:
    """Declare a crash point (at import time, next to the code that uses it)."""
    POINTS[name] = where
    return name


def crash_point(name: str, detail: str = "") -> None:
    """End the process here when ``$CIRLAB_CRASH_AT`` names this point (and its detail and count)."""
    if name not in POINTS:
        raise KeyError(f"undeclared crash point {name!r}")
    spec = os.environ.get("CIRLAB_CRASH_AT")
    if not spec:
        return
    m = _SPEC.fullmatch(spec)
    if m is None or m["point"] != name or (m["text"] and m["text"] not in detail):
        return
    _hits[spec] = _hits.get(spec, 0) + 1
    if _hits[spec] == int(m["n"] or 1):
        os._exit(CRASH_EXIT)
