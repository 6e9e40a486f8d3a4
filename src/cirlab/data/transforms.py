"""Image preprocessing of the CIR repositories (CLIP4Cir's ``targetpad``, ABaldrati/CLIP4Cir, and
the plain CLIP pipeline of the zero-shot repos), without torchvision.

Supervised repos (CLIP4Cir lineage): ``TargetPad(1.25) -> Resize(dim, bicubic) -> CenterCrop(dim)
-> RGB -> tensor -> Normalize(CLIP mean/std)``; ``squarepad`` pads to a square instead; the
zero-shot repos use the plain CLIP pipeline (``resize``: no padding). Every step reproduces
torchvision's arithmetic (output sizes, crop offsets) so that features match the official code.
The geometric steps run in the image's own mode and the RGB conversion comes last, as in the
official pipelines (``_convert_image_to_rgb`` after the crop): an RGBA image is padded with
transparent black and resampled with premultiplied alpha, a palette image (mode P) is resampled
nearest (Pillow's rule for that mode); pass images decoded with
:func:`cirlab.data.images.decode_image` (docs/compat.md measures the difference it makes).
Steps are small classes, not closures, so a transform pickles into DataLoader workers.
"""

from __future__ import annotations

from typing import Callable, Literal

import numpy as np
import torch
from PIL import Image, ImageOps

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

TransformKind = Literal["targetpad", "squarepad", "resize"]


def _pad(image: Image.Image, hp: int, vp: int) -> Image.Image:
    """Zero (black) padding: ``hp`` on the left and right, ``vp`` on the top and bottom."""
    if hp == 0 and vp == 0:
        return image
    return ImageOps.expand(image, border=(hp, vp, hp, vp), fill=0)


class TargetPad:
    """Pad an elongated image symmetrically until max(w, h) / min(w, h) == ``target_ratio``.

    Images already closer to square than the ratio are left alone, so the later centre crop
    cuts off at most a ``target_ratio`` share instead of the ends of a long garment.
    """

    def __init__(self, target_ratio: float = 1.25) -> None:
        self.target_ratio = target_ratio

    def __call__(self, image: Image.Image) -> Image.Image:
        w, h = image.size
        if max(w, h) / min(w, h) < self.target_ratio:
            return image
        scaled = max(w, h) / self.target_ratio
        return _pad(image, max(int((scaled - w) / 2), 0), max(int((scaled - h) / 2), 0))


class SquarePad:
    """Pad to a square (the short side grows by ``int((max - side) / 2)`` on each end)."""

    def __call__(self, image: Image.Image) -> Image.Image:
        w, h = image.size
        side = max(w, h)
        return _pad(image, int((side - w) / 2), int((side - h) / 2))


class Resize:
    """Resize the shorter side to ``dim`` (bicubic), the longer to ``int(dim * long / short)``."""

    def __init__(self, dim: int) -> None:
        self.dim = dim

    def __call__(self, image: Image.Image) -> Image.Image:
        w, h = image.size
        short, long = min(w, h), max(w, h)
        new_long = int(self.dim * long / short)
        size = (self.dim, new_long) if w <= h else (new_long, self.dim)
        if size == (w, h):
            return image
        return image.resize(size, Image.Resampling.BICUBIC)


class CenterCrop:
    """Crop the central ``dim`` x ``dim`` square with torchvision's rounding of the offsets."""

    def __init__(self, dim: int) -> None:
        self.dim = dim

    def __call__(self, image: Image.Image) -> Image.Image:
        w, h = image.size
        top = int(round((h - self.dim) / 2.0))
        left = int(round((w - self.dim) / 2.0))
        return image.crop((left, top, left + self.dim, top + self.dim))


def to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> float32 tensor (3, H, W) in [0, 1]."""
    array = np.asarray(image.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(255.0)


class Normalize:
    def __init__(self, mean: tuple[float, ...] = CLIP_MEAN, std: tuple[float, ...] = CLIP_STD) -> None:
        self.mean = torch.tensor(mean).view(-1, 1, 1)
        self.std = torch.tensor(std).view(-1, 1, 1)

    def __call__(self, tensor: torch.Tensor) -> torch.Tensor:
        return (tensor - self.mean) / self.std


class Compose:
    """Apply callables in order (PIL steps, then ``to_tensor``, then tensor steps)."""

    def __init__(self, steps: list[Callable]) -> None:
        self.steps = steps

    def __call__(self, x):
        for step in self.steps:
            x = step(x)
        return x


def build_transform(kind: TransformKind, dim: int, target_ratio: float = 1.25) -> Compose:
    """The PIL -> normalised tensor (3, dim, dim) pipeline named by ``kind``."""
    pads: dict[str, list[Callable]] = {
        "targetpad": [TargetPad(target_ratio)],
        "squarepad": [SquarePad()],
        "resize": [],
    }
    if kind not in pads:
        raise ValueError(f"unknown transform {kind!r}; expected one of {sorted(pads)}")
    return Compose([*pads[kind], Resize(dim), CenterCrop(dim), to_tensor, Normalize()])
