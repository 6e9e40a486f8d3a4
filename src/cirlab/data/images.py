"""Image files: decoding, and tolerance of the files every public FashionIQ mirror lacks.

Missing images are a fact of FashionIQ (CLIP4Cir issue #1, SPN4CIR issue #5): the CLIP4Cir
loaders (ABaldrati/CLIP4Cir) return None for them and the collate function drops the None.
cirlab does the same, and counts what it skipped in a :class:`MissingImages` tracker that
warns once instead of once per file.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any, Iterable

from PIL import Image
from torch.utils.data import default_collate

log = logging.getLogger("cirlab.data")


class UnreadableImage(OSError):
    """A file that exists but cannot be decoded; an OSError so that every caller that skips
    absent images (``FileNotFoundError``) skips these too."""


def load_image(path: str | Path) -> Image.Image:
    """Decode ``path`` fully into an RGB image (see :func:`decode_image`)."""
    return decode_image(path).convert("RGB")


def decode_image(path: str | Path) -> Image.Image:
    """Decode ``path`` fully, in the file's own mode (what preprocessing takes: it converts to RGB
    last, as the official torchvision pipelines do, see :mod:`cirlab.data.transforms`).

    An absent file raises FileNotFoundError; any file Pillow cannot decode raises
    :class:`UnreadableImage` naming it. That includes images above ``Image.MAX_IMAGE_PIXELS``
    (Pillow's 89.5 Mpx, far above any benchmark image): Pillow itself only warns
    (DecompressionBombWarning) up to twice that and raises a non-OSError beyond it; both
    are treated as unreadable rather than decoded into gigabytes of memory.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                return image.copy()  # decoded; the file is closed on leaving
    except FileNotFoundError:
        raise
    except Exception as e:  # Pillow raises OSError, SyntaxError, ValueError, ... for a corrupt file
        raise UnreadableImage(f"{path}: unreadable image ({type(e).__name__}: {e})") from e


class MissingImages:
    """Ids of images that were absent or unreadable; :meth:`report` warns once per new batch of them.

    ``pending`` holds ids added since the last :meth:`drain`, so that a DataLoader worker can
    ship what it found back to the main process (see ``torch_data.make_loader``).
    """

    def __init__(self, what: str = "images", examples: int = 5) -> None:
        self.what = what
        self.examples = examples
        self.ids: set[str] = set()
        self.pending: list[str] = []
        self._reported = 0

    def add(self, image_id: str) -> None:
        if image_id not in self.ids:
            self.ids.add(image_id)
            self.pending.append(image_id)

    def update(self, image_ids: Iterable[str]) -> None:
        for image_id in image_ids:
            self.add(image_id)

    def drain(self) -> list[str]:
        pending, self.pending = self.pending, []
        return pending

    def __len__(self) -> int:
        return len(self.ids)

    def message(self) -> str:
        shown = ", ".join(sorted(self.ids)[: self.examples])
        more = ", ..." if len(self.ids) > self.examples else ""
        return f"{len(self.ids)} {self.what} missing or unreadable, skipped (e.g. {shown}{more})"

    def report(self) -> str | None:
        """Log one warning line if images went missing since the last report; return it."""
        if len(self.ids) == self._reported:
            return None
        self._reported = len(self.ids)
        message = self.message()
        log.warning(message)
        return message


def collate_skip_none(batch: list[Any]) -> Any:
    """``default_collate`` over the items that are not None; None when nothing is left."""
    items = [item for item in batch if item is not None]
    return default_collate(items) if items else None
