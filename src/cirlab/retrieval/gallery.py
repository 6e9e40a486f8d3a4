"""A gallery to index (a folder of images or a benchmark split) and its vectors under a composer.

Vectors are computed exactly as evaluation computes them (:func:`cirlab.composers.vectors.gallery_vectors`
over the composer's cached features), so an exact index ranks as ``cirlab eval`` does. Under ``torchrun``
each rank encodes one contiguous slice and rank 0 merges the slices in gallery order.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from cirlab.composers import Composer
from cirlab.composers.vectors import gallery_vectors
from cirlab.data.base import CIRSplit, PathTable

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def folder_gallery(folder: str | Path) -> CIRSplit:
    """Every image under ``folder`` (recursively) as a gallery; an image's id is its path relative
    to the folder without the suffix (``shoes/red-1``). Two files with one id are an error."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder not found: {folder}")
    relpaths: dict[str, str] = {}
    for path in sorted(folder.rglob("*")):
        if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file():
            rel = path.relative_to(folder)
            image_id = rel.with_suffix("").as_posix()
            if image_id in relpaths:
                raise ValueError(f"{folder}: {relpaths[image_id]} and {rel} would both be image {image_id!r}")
            relpaths[image_id] = rel.as_posix()
    if not relpaths:
        raise ValueError(f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)})")
    return CIRSplit(dataset="folder", split=folder.name, queries=[], gallery=list(relpaths),
                    image_paths=PathTable(folder.resolve(), relpaths), exclude_reference=False,
                    name=f"folder:{folder}")


def gallery_paths(split: CIRSplit) -> dict[str, str]:
    """Absolute file of every gallery image; a missing one is an error naming it."""
    paths = {i: split.find_image(i) for i in split.gallery}
    missing = [i for i, p in paths.items() if p is None]
    if missing:
        raise FileNotFoundError(f"{split.name}: {len(missing)} gallery images missing on disk, e.g. {missing[:5]}")
    return {i: str(Path(p).resolve()) for i, p in paths.items()}


def encode_split_gallery(composer: Composer, split: CIRSplit, *, batch_size: int = 64) -> np.ndarray:
    """(N, d) float32 gallery vectors of ``split.gallery`` in order; sharded under torchrun."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if world > 1:
        return _sharded(composer, split, rank, world, batch_size)
    feats = composer.features(split, ids=list(split.gallery), fields=[composer.gallery_field], batch_size=batch_size)
    return gallery_vectors(composer, split, feats).cpu().numpy().astype(np.float32)


def _sharded(composer: Composer, split: CIRSplit, rank: int, world: int, batch_size: int) -> np.ndarray:
    """Each rank encodes ``gallery[rank*n/world:(rank+1)*n/world]``; rank 0 gathers (gloo)."""
    import dataclasses

    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo")
    n = len(split.gallery)
    lo, hi = rank * n // world, (rank + 1) * n // world
    part = dataclasses.replace(split, gallery=split.gallery[lo:hi], name=f"{split.name}[{lo}:{hi}]")
    os.environ["WORLD_SIZE"] = "1"  # encode the slice locally
    try:
        vectors = encode_split_gallery(composer, part, batch_size=batch_size) if hi > lo else None
    finally:
        os.environ["WORLD_SIZE"] = str(world)
    parts: list[np.ndarray | None] = [None] * world
    dist.all_gather_object(parts, vectors)
    return np.concatenate([p for p in parts if p is not None]).astype(np.float32)


def model_record(composer: Composer, path: str | Path) -> dict[str, str]:
    """What an index remembers of its model."""
    return {"fingerprint": composer.fingerprint(), "kind": composer.kind, "path": str(Path(path).resolve())}

