"""What every importer shares: reading an official checkpoint safely, finding its state dict, and
checking it key by key before anything is written.

Errors name the file and the key: a truncated file, a missing entry, a tensor of another shape or
a key the layout does not know. Importers build the whole model in memory and write it with
:meth:`Composer.save` / :func:`save_backbone` (atomic folders), so a refused import leaves nothing.
"""

from __future__ import annotations

import argparse
import hashlib
import pickle
import zipfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class Importer:
    """One ``cirlab import KIND``: its one-line help, the arguments it adds to its sub-parser (the
    checkpoint files and options; ``--out`` is common) and what it runs (returns the folder)."""

    kind: str
    help: str
    arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], Path]


def read_checkpoint(path: str | Path, what: str) -> dict:
    """An official ``torch.save`` file, loaded without running pickled code (``weights_only``).

    The official trainers save ``{"epoch": int, "<Model>": state_dict, "optimizer_state_dict": ...}``;
    all of that loads as plain containers. A file holding other objects is refused with the
    one-line way to re-save its weights."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise ValueError(f"{path}: holds more than tensors and plain containers ({str(err).splitlines()[0]}); if "
                         f"you trust the file, re-save its state dict with torch.save(torch.load(src, "
                         f"weights_only=False)[KEY], 'weights.pt') and import that") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile) as err:  # truncated or not a torch file
        raise ValueError(f"{path}: not a readable {what} (truncated or not a torch.save file): "
                         f"{str(err).splitlines()[0]}") from None
    if not isinstance(checkpoint, dict):
        raise ValueError(f"{path}: expected a dict (a state dict or the official trainer's checkpoint), "
                         f"got {type(checkpoint).__name__}")
    return checkpoint


def state_dict(checkpoint: dict, path: Path, keys: Iterable[str], prefix: str = "") -> dict[str, torch.Tensor]:
    """The tensors under the first of ``keys`` present in ``checkpoint`` (or at its top level),
    with DistributedDataParallel's ``module.`` and then ``prefix`` removed from every name; names
    without ``prefix`` are left out."""
    keys = list(keys)
    for key in keys:
        if isinstance(checkpoint.get(key), Mapping):
            checkpoint = checkpoint[key]
            break
    state = {}
    for name, value in checkpoint.items():
        if not isinstance(value, torch.Tensor):
            continue
        name = name.removeprefix("module.")
        if name.startswith(prefix):
            state[name.removeprefix(prefix)] = value
    if not state:
        where = " or ".join(repr(k) for k in keys) if keys else "the top level"
        raise ValueError(f"{path}: no tensors{f' named {prefix}*' if prefix else ''} under {where}; "
                         f"top-level entries: {sorted(checkpoint)[:8]}")
    return state


def check_state(state: Mapping[str, torch.Tensor], expected: Mapping[str, tuple[int, ...]], path: Path,
                what: str, *, ignore: Iterable[str] = ()) -> None:
    """Every expected key present with its shape, nothing unknown (besides names containing one
    of ``ignore``); the error names the file, the first offending key and how many there are."""
    ignored = tuple(ignore)
    missing = [k for k in expected if k not in state]
    unknown = [k for k in state if k not in expected and not any(part in k for part in ignored)]
    wrong = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k])]
    if missing:
        raise ValueError(f"{path}: not a {what}: missing key {missing[0]!r} ({len(missing)} missing in all)")
    if wrong:
        k = wrong[0]
        raise ValueError(f"{path}: key {k!r} has shape {tuple(state[k].shape)}, a {what} has {tuple(expected[k])} "
                         f"({len(wrong)} such keys)")
    if unknown:
        raise ValueError(f"{path}: key {unknown[0]!r} is not part of a {what} ({len(unknown)} unknown keys)")


def file_digests(path: str | Path) -> dict[str, str]:
    """SHA-1 (what the authors publish, see :mod:`cirlab.importers.zoo`) and SHA-256 of a file, in one read."""
    sha1, sha256 = hashlib.sha1(), hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            sha1.update(block)
            sha256.update(block)
    return {"sha1": sha1.hexdigest(), "sha256": sha256.hexdigest()}


def provenance(kind: str, **files: str | Path | None) -> dict:
    """What an imported folder records of where it came from: the kind and each source file's
    path and hashes (folders by path only)."""
    out: dict = {"imported": kind}
    for role, path in files.items():
        if path is None:
            continue
        path = Path(path)
        out[role] = {"path": str(path.resolve()), **(file_digests(path) if path.is_file() else {})}
    return out
