"""The one record every loader produces, and the split interface every method consumes.

A loader reads a benchmark's real file layout into a :class:`CIRSplit`: a list of
:class:`Query` records (query mode) plus the gallery of image ids (gallery mode) and a
way to find each image on disk. Methods, evaluation and the submission writers only
see this interface, never a benchmark's JSON.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable


@dataclass(frozen=True)
class Query:
    """One composed query.

    ``qid``: CIRR/shapes ``str(pairid)``; FashionIQ ``<category>-<index>``; CIRCO ``str(id)``.
    ``captions``: the raw relative caption(s); FashionIQ has two, the others one.
    ``target``: the annotated target id, ``None`` on test splits.
    ``positives``: every id that counts as a hit (CIRR: target_hard only, as the official
    server; shapes: every image with the target's scene; CIRCO: gt_img_ids).
    ``subset``: CIRR's ``img_set.members`` (6 ids, the reference included), else ``None``.
    ``extra``: dataset-specific fields (reversed caption, scene captions, category...).
    """

    qid: str
    reference: str
    captions: tuple[str, ...]
    target: str | None = None
    positives: tuple[str, ...] = ()
    subset: tuple[str, ...] | None = None
    extra: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)


@dataclass
class CIRSplit:
    """One split of one benchmark (for FashionIQ: one category)."""

    dataset: str
    split: str
    queries: list[Query]
    gallery: list[str]
    image_paths: Callable[[str], list[Path]]
    exclude_reference: bool
    name: str = ""

    def __post_init__(self) -> None:
        self.name = self.name or f"{self.dataset}/{self.split}"

    def find_image(self, image_id: str) -> Path | None:
        """The first existing file for ``image_id`` (FashionIQ ships .png or .jpg), else None."""
        for p in self.image_paths(image_id):
            if p.is_file():
                return p
        return None

    @property
    def has_targets(self) -> bool:
        return any(q.target is not None for q in self.queries)
