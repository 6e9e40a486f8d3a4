"""Image features of a split under a frozen backbone, through the feature cache.

Training (cached image tokens), evaluation (the gallery) and, later, the index builder all
ask for features here, so each image of a dataset is encoded once per backbone and
preprocessing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from cirlab.data.base import CIRSplit
from cirlab.data.images import load_image
from cirlab.retrieval.feature_cache import FeatureSet, cached_features

DEFAULT_CACHE = Path("runs/cache/features")


def split_image_ids(split: CIRSplit) -> list[str]:
    """Gallery ids, then any reference id outside the gallery, in a fixed order."""
    ids = dict.fromkeys(split.gallery)
    ids.update(dict.fromkeys(q.reference for q in split.queries))
    return list(ids)


def image_features(backbone, split: CIRSplit, transform: Callable, transform_name: str, *,
                   ids: list[str] | None = None, tokens: bool = False, embeds: bool = True,
                   cache_dir: str | Path = DEFAULT_CACHE, batch_size: int = 128) -> FeatureSet:
    """``embeds`` and/or ``tokens`` of ``ids`` (default: :func:`split_image_ids`). A tokens-only
    set does not depend on the image projection, so it is keyed without it.

    Keyed by the fingerprint of the backbone's image side (:meth:`Backbone.image_fingerprint`), the preprocessing and the id list; images that are
    missing on disk raise, since a gallery with holes would silently change the metrics
    (filter them first with ``cirlab data check``).
    """
    ids = split_image_ids(split) if ids is None else ids
    paths = {i: split.find_image(i) for i in ids}
    missing = [i for i, p in paths.items() if p is None]
    if missing:
        raise FileNotFoundError(f"{split.name}: {len(missing)} images missing on disk, e.g. {missing[:5]}; "
                                f"run `cirlab data check` and remove them from the split")

    @torch.no_grad()
    def encode(batch_ids: list[str]) -> dict[str, torch.Tensor]:
        pixels = torch.stack([transform(load_image(paths[i])) for i in batch_ids]).to(backbone.device)
        out = backbone.encode_image(pixels)
        fields = {}
        if embeds:
            fields["embeds"] = out.embeds.float().cpu()
        if tokens:
            fields["tokens"] = out.tokens.float().cpu()
        return fields

    names = [f for f, on in (("embeds", embeds), ("tokens", tokens)) if on]
    if not names:
        raise ValueError("image_features: ask for embeds, tokens or both")
    key = {"backbone": backbone.image_fingerprint(projection=embeds), "transform": transform_name,
           "dataset": split.name, "fields": names}
    return cached_features(cache_dir, key=key, ids=ids, encode=encode, batch_size=batch_size)
