"""What several methods share: their splits, the cached image-feature table, in-batch CE."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from cirlab.config import ExperimentConfig
from cirlab.data.base import CIRSplit
from cirlab.data.registry import load_splits
from cirlab.data.transforms import build_transform
from cirlab.models import Backbone
from cirlab.retrieval.encode import image_features


def method_splits(cfg: ExperimentConfig, split: str) -> list[CIRSplit]:
    """The config's dataset split (FashionIQ: one per configured category)."""
    categories = cfg.data.categories if cfg.data.dataset == "fashioniq" else None
    return load_splits(cfg.data.dataset, cfg.data.root, split, categories=categories)


def triplet_ids(split: CIRSplit) -> list[str]:
    """Every reference and target image of a split's queries (what training reads)."""
    return list(dict.fromkeys(i for q in split.queries for i in (q.reference, q.target) if i is not None))


def image_table(backbone: Backbone, splits: list[CIRSplit], cfg: ExperimentConfig,
                ids_of: Callable[[CIRSplit], list[str]] | None = None,
                tokens: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """``({"embeds": (N, d)}, id -> row)`` of the images the splits need, or with ``tokens``
    ``({"tokens": (N, L, h)}, ...)``, through the feature cache (each image encoded once per
    image tower and preprocessing)."""
    transform = build_transform(cfg.data.transform, backbone.image_size, cfg.data.target_ratio)
    name = f"{cfg.data.transform}-{cfg.data.target_ratio}-{backbone.image_size}"
    fields = ["tokens"] if tokens else ["embeds"]
    parts: dict[str, list[torch.Tensor]] = {f: [] for f in fields}
    rows: dict[str, int] = {}
    offset = 0
    for split in splits:
        feats = image_features(backbone, split, transform, name, ids=ids_of(split) if ids_of else None,
                               tokens=tokens, embeds=not tokens, batch_size=cfg.evaluation.batch_size)
        for k, i in enumerate(feats.ids):
            rows.setdefault(i, offset + k)
        for f in fields:
            parts[f].append(feats[f].float())
        offset += len(feats)
    return {f: torch.cat(p) for f, p in parts.items()}, rows


def diagonal_ce(logits: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of a (B, B) in-batch score matrix whose positives lie on the diagonal."""
    return F.cross_entropy(logits, torch.arange(logits.shape[0], device=logits.device))
