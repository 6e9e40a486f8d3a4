"""Image features of a split under a frozen backbone, through the feature cache.

Training (cached image tokens) and evaluation (the gallery) ask for features here (so will the
planned index builder), so each image is encoded once per backbone and preprocessing.

The cache lives in ``$CIRLAB_CACHE`` when set, else ``$XDG_CACHE_HOME/cirlab/features``
(``~/.cache/cirlab/features``): one per user, wherever a command is run from.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Callable, Literal

import torch

from cirlab.data.base import CIRSplit
from cirlab.data.images import decode_image
from cirlab.features.cache import FeatureSet, cached_features
from cirlab.utils.io import dump_json


def default_cache_dir() -> Path:
    """``$CIRLAB_CACHE``, else the per-user cache folder."""
    if os.environ.get("CIRLAB_CACHE"):
        return Path(os.environ["CIRLAB_CACHE"])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "cirlab" / "features"


def split_image_ids(split: CIRSplit) -> list[str]:
    """Gallery ids, then any reference id outside the gallery, in a fixed order."""
    ids = dict.fromkeys(split.gallery)
    ids.update(dict.fromkeys(q.reference for q in split.queries))
    return list(ids)


def files_digest(paths: dict[str, Path]) -> str:
    """A digest of each image file's identity (absolute path, size, modification time), so that a
    re-generated or edited image under the same id selects a new cache entry."""
    h = hashlib.sha256()
    for image_id, path in paths.items():
        st = path.stat()
        h.update(dump_json([image_id, str(path.resolve()), st.st_size, st.st_mtime_ns]).encode())
    return h.hexdigest()


TokenDtype = Literal["float16", "float32"]


def image_features(backbone, split: CIRSplit, transform: Callable, transform_name: str, *,
                   ids: list[str] | None = None, tokens: bool = False, embeds: bool = True,
                   cache_dir: str | Path | None = None, batch_size: int = 128,
                   token_dtype: TokenDtype = "float16") -> FeatureSet:
    """``embeds`` and/or ``tokens`` of ``ids`` (default: :func:`split_image_ids`).

    ``token_dtype``: how token sequences are stored (float16 halves disk and page cache; the
    official code keeps float32, which the CIRR / FashionIQ / CIRCO data configs choose; the
    measured difference: docs/compat.md). Embeddings are always float32.

    Keyed by the fingerprint of the backbone's image side (:meth:`Backbone.image_fingerprint`;
    a tokens-only set does not depend on the image projection), the preprocessing, the id list
    and the files' identity. Images missing on disk raise, since a gallery with holes would
    silently change the metrics (:func:`cirlab.data.check.drop_missing` removes them first)."""
    ids = split_image_ids(split) if ids is None else ids
    paths = {i: split.find_image(i) for i in ids}
    missing = [i for i, p in paths.items() if p is None]
    if missing:
        raise FileNotFoundError(f"{split.name}: {len(missing)} images missing on disk, e.g. {missing[:5]}; "
                                f"run `cirlab data check` and remove them from the split")
    names = [f for f, on in (("embeds", embeds), ("tokens", tokens)) if on]
    if not names:
        raise ValueError("image_features: ask for embeds, tokens or both")

    def read(image_id: str) -> torch.Tensor:
        try:
            return transform(decode_image(paths[image_id]))
        except OSError as e:  # a corrupt file: name it, and how to leave such files out
            raise ValueError(f"{split.name}: image {image_id!r}: {e}; `cirlab data check --decode` lists every such "
                             f"file, `cirlab eval --decode` leaves them out") from None

    @torch.no_grad()
    def encode(batch_ids: list[str]) -> dict[str, torch.Tensor]:
        pixels = torch.stack([read(i) for i in batch_ids]).to(backbone.device)
        # validation runs under the training autocast; the cache is shared with fp32 evaluation
        with torch.autocast(backbone.device.type, enabled=False):
            out = backbone.encode_image(pixels)
        return {f: getattr(out, f).float().cpu() for f in names}

    key = {"backbone": backbone.image_fingerprint(projection=embeds), "transform": transform_name,
           "files": files_digest(paths), "fields": names}
    return cached_features(cache_dir or default_cache_dir(), key=key, ids=ids, encode=encode,
                           batch_size=batch_size, dtype={"tokens": getattr(torch, token_dtype)})
