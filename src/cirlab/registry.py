"""Registries: a name (or a pair of names) -> what a module registered under it.

Stages (``cirlab.methods``) and benchmarks (``cirlab.data``) register themselves with a decorator or
a call where they are defined; nothing lists them. A registry fills itself on its first lookup by
importing every module of its package, and the modules named in ``$CIRLAB_PLUGINS``
(comma-separated), so a user's own method or benchmark is one module: register it there, name the
module in ``CIRLAB_PLUGINS`` (or import it before loading a config), and configs find it by name.
This module imports nothing of cirlab: every layer may use it.
"""

from __future__ import annotations

import importlib
import os
import pkgutil
from typing import Generic, Hashable, Iterator, TypeVar

T = TypeVar("T")


def _import_package(package: str) -> None:
    """Import ``package`` and every module directly inside it."""
    pkg = importlib.import_module(package)
    for info in pkgutil.iter_modules(getattr(pkg, "__path__", [])):
        importlib.import_module(f"{package}.{info.name}")


def import_plugins() -> None:
    """Import the modules named in ``$CIRLAB_PLUGINS`` (a user's own stages and benchmarks)."""
    for name in filter(None, (n.strip() for n in os.environ.get("CIRLAB_PLUGINS", "").split(","))):
        try:
            importlib.import_module(name)
        except ImportError as e:
            raise ValueError(f"CIRLAB_PLUGINS names {name!r}, which cannot be imported: {e}") from None


class Registry(Generic[T]):
    """Entries of one kind (``what``: "stage", "benchmark"), discovered from ``package``."""

    def __init__(self, what: str, package: str):
        self.what, self.package = what, package
        self._entries: dict[Hashable, T] = {}
        self._discovered = False

    def add(self, key: Hashable, entry: T) -> T:
        if key in self._entries and self._entries[key] is not entry:
            raise ValueError(f"{self.what} {key!r} is registered twice")
        self._entries[key] = entry
        return entry

    def discover(self) -> None:
        """Import the package's modules (once) and the plugins (each time: cheap once imported,
        and ``$CIRLAB_PLUGINS`` may have been set since)."""
        if not self._discovered:
            self._discovered = True  # set first: the modules imported below look entries up too
            _import_package(self.package)
        import_plugins()

    def get(self, key: Hashable) -> T | None:
        if key not in self._entries:
            self.discover()
        return self._entries.get(key)

    def __getitem__(self, key: Hashable) -> T:
        entry = self.get(key)
        if entry is None:
            raise KeyError(f"unknown {self.what} {key!r}; known: {', '.join(map(str, self.keys()))}")
        return entry

    def keys(self) -> list[Hashable]:
        self.discover()
        return list(self._entries)

    def items(self) -> Iterator[tuple[Hashable, T]]:
        self.discover()
        return iter(list(self._entries.items()))


# the two registries of cirlab: a method's stages (cirlab.methods) and benchmarks (cirlab.data)
STAGES: Registry = Registry("stage", "cirlab.methods")
BENCHMARKS: Registry = Registry("benchmark", "cirlab.data")
