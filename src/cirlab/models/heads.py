"""Trained heads (the Combiner, the re-ranker) as self-describing folders.

A head folder holds ``head.json`` (its kind, the sizes to rebuild it, and the backbone folder it
works on) and ``model.safetensors``. An index builder or a server rebuilds the head from the
folder alone, without the training code or the run's config.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file
from torch import nn

from cirlab.utils.io import atomic_dir, dump_json, read_json

FORMAT = "cirlab-head"


def save_head(module: nn.Module, path: str | Path, kind: str, config: dict[str, Any],
              backbone: str | Path | None = None) -> Path:
    """Write ``module``'s weights and ``config`` (what its constructor needs) atomically."""
    path = Path(path)
    meta = {"format": FORMAT, "kind": kind, "config": config,
            "backbone": str(Path(backbone).resolve()) if backbone else None}
    with atomic_dir(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()},
                  str(tmp / "model.safetensors"))
        (tmp / "head.json").write_text(dump_json(meta, indent=1) + "\n")
    return path


def read_head(path: str | Path, kind: str) -> tuple[dict[str, Any], dict, str | None]:
    """``(config, state_dict, backbone folder)`` of a head folder, checked to be ``kind``."""
    path = Path(path)
    meta = read_json(path / "head.json", f"{kind} folder")
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("kind") != kind:
        found = meta.get("kind") if isinstance(meta, dict) else None
        raise ValueError(f"{path / 'head.json'}: not a cirlab {kind} folder (kind {found!r})")
    weights = path / "model.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(f"{kind} weights not found: {weights}")
    return meta["config"], load_file(str(weights)), meta.get("backbone")
