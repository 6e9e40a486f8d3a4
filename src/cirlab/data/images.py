"""Image files: decoding, and tolerance of the files every public FashionIQ mirror lacks.

Missing images are a fact of FashionIQ (CLIP4Cir issue #1, SPN4CIR issue #5): the CLIP4Cir
loaders (ABaldrati/CLIP4Cir) return None for them and the collate function drops the None.
cirlab does the same, and counts what it skipped in a :class:`MissingImages` tracker that
warns once instead of once per file.

Every reader here reads the header first and refuses an image over :data:`MAX_PIXELS` unread
(:func:`open_image`). Datasets decode as the official pipelines do (:func:`decode_image`); a
photo a user gives as a query is decoded as a viewer shows it (:func:`to_rgb`: EXIF orientation,
16-bit grey, transparency).
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import IO, Any, Iterable

import numpy as np
from PIL import Image, ImageOps
from torch.utils.data import default_collate

log = logging.getLogger("cirlab.data")


class UnreadableImage(OSError):
    """A file that exists but cannot be decoded; an OSError so that every caller that skips
    absent images (``FileNotFoundError``) skips these too."""


class ImageTooLarge(UnreadableImage):
    """An image whose header declares more than :data:`MAX_PIXELS` pixels (refused unread)."""


def _pixel_limit() -> int:
    """``CIRLAB_MAX_IMAGE_PIXELS``, or Pillow's own bomb limit: twice ``Image.MAX_IMAGE_PIXELS``."""
    value = os.environ.get("CIRLAB_MAX_IMAGE_PIXELS")
    if value is None:
        return 2 * Image.MAX_IMAGE_PIXELS
    if not value.strip().isdigit() or int(value) < 1:
        raise ValueError(f"CIRLAB_MAX_IMAGE_PIXELS={value!r}: expected a whole number of pixels, at least 1")
    return int(value)


MAX_PIXELS = _pixel_limit()
"""Images with more pixels are refused from their header, never decoded: by default Pillow's
decompression-bomb limit (178,956,970 pixels, twice its 89.5 Mpx warning level, so a 144 Mpx
photo decodes); the environment's ``CIRLAB_MAX_IMAGE_PIXELS`` sets another."""

# Pillow refuses above twice its own MAX_IMAGE_PIXELS before cirlab looks: lift it under a larger limit
Image.MAX_IMAGE_PIXELS = max(Image.MAX_IMAGE_PIXELS, -(-MAX_PIXELS // 2))

WIDE_GREY = ("I", "I;16", "I;16L", "I;16B", "I;16N")  # 16-bit grey (PNG, TIFF) and Pillow's 32-bit ints


def open_image(source: str | Path | IO[bytes], name: str | None = None) -> Image.Image:
    """``source`` with its header read and its size checked, not decoded yet (cheap: what
    ``cirlab data check`` does to every file). Raises :class:`ImageTooLarge` above
    :data:`MAX_PIXELS` and :class:`UnreadableImage` for anything that is not an image, both
    naming ``name`` (default: the path); an absent file raises FileNotFoundError."""
    name = name or str(source)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # a warning level, not the limit
            image = Image.open(source)
    except FileNotFoundError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageTooLarge(f"{name}: {e}; set CIRLAB_MAX_IMAGE_PIXELS to decode larger images") from e
    except Exception as e:  # Pillow raises OSError, SyntaxError, ValueError, ... for a corrupt file
        raise UnreadableImage(f"{name}: unreadable image ({type(e).__name__}: {e})") from e
    width, height = image.size
    if width * height > MAX_PIXELS:
        image.close()
        raise ImageTooLarge(f"{name}: {width}x{height} = {width * height} pixels, over the limit of {MAX_PIXELS} "
                            "pixels (a decompression bomb?); set CIRLAB_MAX_IMAGE_PIXELS to decode larger images")
    return image


def decoded(image: Image.Image, name: str) -> Image.Image:
    """The pixels of an :func:`open_image` image (its first frame), decoded in the file's own mode."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return image.copy()
    except Exception as e:  # truncated data, a broken chunk, ...
        raise UnreadableImage(f"{name}: unreadable image ({type(e).__name__}: {e})") from e


def load_image(path: str | Path) -> Image.Image:
    """Decode ``path`` fully into an RGB image (see :func:`decode_image`)."""
    return decode_image(path).convert("RGB")


def decode_image(path: str | Path) -> Image.Image:
    """Decode ``path`` fully, in the file's own mode (what preprocessing takes: it converts to RGB
    last, as the official torchvision pipelines do, see :mod:`cirlab.data.transforms`).

    An absent file raises FileNotFoundError; any file Pillow cannot decode raises
    :class:`UnreadableImage` naming it, and one above :data:`MAX_PIXELS` :class:`ImageTooLarge`
    (never decoded into gigabytes of memory).
    """
    with open_image(path) as image:
        return decoded(image, str(path))  # the file is closed on leaving


def load_as_shown(path: str | Path) -> Image.Image:
    """Decode ``path`` into the RGB image a viewer shows (:func:`to_rgb`): what a query photo
    given by a user (``cirlab search --image``, an upload) is encoded from."""
    return to_rgb(decode_image(path))


def upright(image: Image.Image) -> Image.Image:
    """``image`` turned by its EXIF orientation; an EXIF block Pillow cannot parse is ignored, as
    viewers ignore it (the pixels are fine)."""
    try:
        return ImageOps.exif_transpose(image)
    except Exception:  # SyntaxError, struct.error, ValueError, ...: whatever a corrupt TIFF header raises
        return image


def to_rgb(image: Image.Image) -> Image.Image:
    """``image`` in 8-bit RGB as a viewer shows it: turned upright by its EXIF orientation (a phone
    photo), 16- and 32-bit grey scaled to 8 bits (0..65535 -> 0..255; a plain conversion clips
    everything above 255 to white), and transparency composited on white (the hidden colour of
    transparent pixels differs between encoders; white is what a page shows)."""
    image = upright(image)
    if image.mode in WIDE_GREY:
        grey = np.clip(np.asarray(image, dtype=np.float64), 0, 65535) / 257
        image = Image.fromarray(np.rint(grey).astype(np.uint8))
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, image.convert("RGBA")).convert("RGB")
    return image.convert("RGB")


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
