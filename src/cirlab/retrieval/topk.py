"""The stage-I top-K candidate file of candidate re-ranking (Liu et al., Candidate Set Re-ranking
for Composed Image Retrieval with Dual Multi-modal Encoder; official code:
Cuberick-Orion/Candidate-Reranking-CIR, whose ``validate.py --save-topk`` writes such lists).

Stage I ranks the whole gallery once per query; stage II re-scores only each query's K best
candidates, so the list is stored and reused by re-ranking runs. One ``.pt`` file per
(dataset, split), written atomically, holding a plain dict (loadable with ``weights_only=True``):

    format "cirlab-topk", version 1, dataset, split, k,
    query_ids (Q strings), gallery_ids (N strings),
    indices  int32 (Q, K): rows into gallery_ids, best first,
    scores   float32 (Q, K): the stage-I similarities, descending,
    reference_excluded: whether each query's reference image was removed before ranking (CIRR protocol),
    backbone: fingerprint of the stage-I model that ranked.

The official code stored names; indices + ids keep the file small and make rows checkable.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Sequence

import torch

from cirlab.utils.io import atomic_path

FORMAT = "cirlab-topk"
VERSION = 1


@dataclass
class TopK:
    """Each query's K best gallery items by stage-I score, best first."""

    dataset: str
    split: str
    query_ids: list[str]
    gallery_ids: list[str]
    indices: torch.Tensor  # (Q, K) int32 into gallery_ids
    scores: torch.Tensor  # (Q, K) float32
    reference_excluded: bool
    backbone: str = ""

    @property
    def k(self) -> int:
        return self.indices.shape[1]

    @cached_property
    def _row_of(self) -> dict[str, int]:
        return {q: i for i, q in enumerate(self.query_ids)}

    def candidates(self, query_id: str) -> list[str]:
        """The query's K candidate gallery ids, best first."""
        return [self.gallery_ids[j] for j in self.indices[self._row_of[query_id]].tolist()]

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "version": VERSION, "dataset": self.dataset, "split": self.split, "k": self.k,
                "query_ids": list(self.query_ids), "gallery_ids": list(self.gallery_ids),
                "indices": self.indices, "scores": self.scores,
                "reference_excluded": self.reference_excluded, "backbone": self.backbone}


def topk_from_similarity(
    sim: torch.Tensor,
    query_ids: Sequence[str],
    gallery_ids: Sequence[str],
    k: int,
    *,
    exclude: Sequence[int | None] | None = None,
    dataset: str,
    split: str,
    backbone: str = "",
) -> TopK:
    """Top-K of a (Q, N) stage-I similarity matrix. ``exclude[i]`` is the gallery index of query
    i's reference image, removed before ranking (None: nothing to remove for that query); passing
    ``exclude`` marks the file ``reference_excluded``."""
    q, n = sim.shape
    if (len(query_ids), len(gallery_ids)) != (q, n):
        raise ValueError(f"similarity is {q}x{n} but there are {len(query_ids)} queries, {len(gallery_ids)} gallery ids")
    available = n - 1 if exclude is not None else n
    if not 0 < k <= available:
        raise ValueError(f"k={k} must be in 1..{available} (gallery of {n}"
                         + (", reference excluded)" if exclude is not None else ")"))
    sim = sim.detach().float()
    if exclude is not None:
        if len(exclude) != q:
            raise ValueError(f"exclude has {len(exclude)} entries for {q} queries")
        rows = [i for i, j in enumerate(exclude) if j is not None]
        sim = sim.clone()
        sim[rows, [exclude[i] for i in rows]] = float("-inf")
    scores, indices = sim.topk(k, dim=1)
    topk = TopK(dataset, split, list(query_ids), list(gallery_ids), indices.to("cpu", torch.int32),
                scores.cpu(), reference_excluded=exclude is not None, backbone=backbone)
    _check(topk.to_dict(), "top-K")
    return topk


def save_topk(path: str | os.PathLike, topk: TopK) -> Path:
    """Write ``topk`` atomically (a crash leaves the old file or none, never half of one)."""
    path = Path(path)
    data = topk.to_dict()
    _check(data, str(path))
    with atomic_path(path) as tmp:
        torch.save(data, tmp)
    return path


def load_topk(path: str | os.PathLike) -> TopK:
    """Read and check a top-K file; ValueError naming the file (and field) if it is not a valid one."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"top-K file not found: {path}")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, not a torch file, foreign pickled objects...
        raise ValueError(f"{path} is not a readable top-K file: {type(e).__name__}: {e}") from None
    _check(data, str(path))
    return TopK(data["dataset"], data["split"], data["query_ids"], data["gallery_ids"], data["indices"],
                data["scores"], data["reference_excluded"], data["backbone"])


_TYPES = {"dataset": str, "split": str, "k": int, "query_ids": list, "gallery_ids": list,
          "indices": torch.Tensor, "scores": torch.Tensor, "reference_excluded": bool, "backbone": str}


def _check(data: Any, where: str) -> None:
    """Raise ValueError naming ``where`` and the field when ``data`` is not a consistent top-K dict."""
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ValueError(f"{where} is not a cirlab top-K file (no format={FORMAT!r})")
    if data.get("version") != VERSION:
        raise ValueError(f"{where}: unsupported top-K version {data.get('version')!r} (this cirlab reads {VERSION})")

    def bad(name: str, why: str) -> ValueError:
        return ValueError(f"{where}: field {name!r} {why}")

    for name, kind in _TYPES.items():
        if not isinstance(data.get(name), kind):
            raise bad(name, f"is missing or not a {kind.__name__}")
    for name in ("query_ids", "gallery_ids"):
        if not all(isinstance(x, str) for x in data[name]) or len(set(data[name])) != len(data[name]):
            raise bad(name, "must hold distinct strings")
    q, n, k = len(data["query_ids"]), len(data["gallery_ids"]), data["k"]
    idx, scores = data["indices"], data["scores"]
    if idx.dtype != torch.int32 or tuple(idx.shape) != (q, k):
        raise bad("indices", f"must be int32 of shape ({q}, {k}), got {idx.dtype} {tuple(idx.shape)}")
    if not scores.is_floating_point() or scores.shape != idx.shape:
        raise bad("scores", f"must be floating of shape ({q}, {k}), got {scores.dtype} {tuple(scores.shape)}")
    if idx.numel() and not (0 <= int(idx.min()) and int(idx.max()) < n):
        raise bad("indices", f"has rows outside the gallery of {n}")
    if k > 1 and (idx.sort(dim=1).values.diff(dim=1) == 0).any():
        raise bad("indices", "repeats a candidate within a row")
