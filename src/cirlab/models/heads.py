"""Trained heads (the Combiner, the re-ranker) as self-describing folders.

A head folder holds ``head.json`` (its kind, the sizes to rebuild it, and the fingerprint of the
backbone whose features it works on) and ``model.safetensors``. A composer folder
(:mod:`cirlab.composers`) holds its heads next to that backbone; loading a head with another
backbone is refused, since its weights only mean something on the features they were trained on.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from cirlab.utils.io import atomic_dir, dump_json, read_json

FORMAT = "cirlab-head"


def save_head(module: nn.Module, path: str | Path, kind: str, config: dict[str, Any],
              backbone: str | None = None) -> Path:
    """Write ``module``'s weights and ``config`` (what its constructor needs) atomically;
    ``backbone`` is the fingerprint of the backbone it works on."""
    path = Path(path)
    meta = {"format": FORMAT, "kind": kind, "config": config, "backbone": backbone}
    with atomic_dir(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()},
                  str(tmp / "model.safetensors"))
        (tmp / "head.json").write_text(dump_json(meta, indent=1) + "\n")
    return path


def read_head(path: str | Path, kind: str, backbone: str | None = None) -> tuple[dict[str, Any], dict]:
    """``(config, state_dict)`` of a head folder, checked to be ``kind`` and, given the
    ``backbone`` fingerprint it is loaded with, to have been trained on that backbone."""
    path = Path(path)
    meta = read_json(path / "head.json", f"{kind} folder")
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("kind") != kind:
        found = meta.get("kind") if isinstance(meta, dict) else None
        raise ValueError(f"{path / 'head.json'}: not a cirlab {kind} folder (kind {found!r})")
    if backbone is not None and meta.get("backbone") not in (None, backbone):
        raise ValueError(f"{path / 'head.json'}: this {kind} was trained on another backbone "
                         f"(fingerprint {meta.get('backbone')}, loaded with {backbone})")
    weights = path / "model.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(f"{kind} weights not found: {weights}")
    try:
        state = load_file(str(weights))
    except SafetensorError as e:  # its message names no file
        raise ValueError(f"{weights} is not a readable safetensors file (truncated?): {e}") from None
    return meta["config"], state
