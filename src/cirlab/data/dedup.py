"""Pixel-identical images, found so that an image is never a negative of its own copy.

SPN's ``deduplicate_images.py`` (BUAADreamer/SPN4CIR) maps duplicate training images to one
bank id. Here two images are duplicates when their decoded RGB pixels are equal (size included),
whatever their file format or metadata.
"""

from __future__ import annotations

import hashlib
from typing import Sequence

import numpy as np

from cirlab.data.base import CIRSplit
from cirlab.data.images import load_image
from cirlab.utils.progress import progress


def pixel_digest(image) -> str:
    rgb = np.asarray(image.convert("RGB"))
    return hashlib.blake2b(f"{rgb.shape}".encode() + rgb.tobytes(), digest_size=16).hexdigest()


def duplicate_map(split: CIRSplit, ids: Sequence[str]) -> dict[str, str]:
    """``id -> canonical id``: the first of ``ids`` with the same pixels. Images that cannot be
    read map to themselves (they are reported where they are used)."""
    first: dict[str, str] = {}
    out: dict[str, str] = {}
    for image_id in progress(list(dict.fromkeys(ids)), desc="finding duplicate images"):
        path = split.find_image(image_id)
        if path is None:
            out[image_id] = image_id
            continue
        try:
            digest = pixel_digest(load_image(path))
        except OSError:
            out[image_id] = image_id
            continue
        out[image_id] = first.setdefault(digest, image_id)
    return out
