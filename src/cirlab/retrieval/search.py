"""Composed search over an index: (reference image or gallery id, text) -> ranked gallery hits.

:class:`Searcher` is what ``cirlab search`` and the server share: a composer, the index built
with it (checked by fingerprint) and the index folder (for the gallery's image files). A
re-ranking composer re-ranks the index's top K with its second stage, as evaluation does.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from PIL import Image

from cirlab.composers import Composer, load
from cirlab.data.images import load_image
from cirlab.retrieval.index import Hit, VectorIndex, check_model, load_index


@dataclass
class Query:
    """A composed query: a reference given as an image or as a gallery id, and the change."""

    text: str
    image: Image.Image | None = None
    id: str | None = None

    def __post_init__(self) -> None:
        if (self.image is None) == (self.id is None):
            raise ValueError("a query needs exactly one reference: an image or a gallery id")


class Searcher:
    """A composer and the index built with it: composed queries in, ranked gallery hits out.
    What ``cirlab search`` and the server share; :meth:`open` checks that model and index match."""

    def __init__(self, composer: Composer, index: VectorIndex, folder: str | Path):
        self.composer, self.index, self.folder = composer, index, Path(folder)

    @classmethod
    def open(cls, index_dir: str | Path, model: str | Path | None = None, *, device: str = "cpu",
             mmap: bool = True) -> Searcher:
        """The index in ``index_dir`` and its model (``model`` or the path the index recorded);
        a model whose fingerprint differs from the index's is refused."""
        index = load_index(index_dir, mmap=mmap)
        model = model or index.model.get("path")
        if not model:
            raise ValueError(f"{index_dir}: the index names no model; pass --model")
        composer = load(model, device=device)
        check_model(index, composer.fingerprint(), model)
        return cls(composer, index, index_dir)

    @property
    def can_rerank(self) -> bool:
        """Whether the model has a second stage, so that :meth:`search` accepts ``rerank=K``."""
        return self.composer.reranks

    def image_path(self, image_id: str) -> Path:
        """The image file of a gallery id; ``KeyError`` for an id the index does not hold."""
        if image_id not in self.index:
            raise KeyError(image_id)
        return self.index.image_path(image_id, self.folder)

    def reference_image(self, query: Query) -> Image.Image:
        """The query's reference as an RGB image: the given image, or the gallery image of its id."""
        if query.image is not None:
            return query.image.convert("RGB")
        try:
            return load_image(self.image_path(query.id))
        except KeyError:
            raise KeyError(f"unknown gallery id {query.id!r}") from None

    @torch.no_grad()
    def search(self, queries: Sequence[Query], k: int = 10, rerank: int | None = None,
               exclude_reference: bool = True) -> list[list[Hit]]:
        """Top ``k`` hits per query, composed in one batch. ``rerank=K``: the index's top K re-ranked
        by the composer's second stage (re-ranking composers only). A query by gallery id leaves
        its own image out of the results (``exclude_reference``), as CIRR's protocol does."""
        if rerank is not None and not self.can_rerank:
            raise ValueError(f"this model ({self.composer.kind}) has no re-ranking stage")
        images = [self.reference_image(q) for q in queries]
        vectors = self.composer.encode_queries(images, [q.text for q in queries]).cpu().numpy()
        exclude = [q.id if exclude_reference else None for q in queries]
        hits = self.index.search(vectors, max(k, rerank or 0), exclude=exclude)
        if rerank:
            # the top K in the re-ranker's order, the rest below in stage-I order (as evaluation)
            hits = [self._rerank(image, q.text, h[:rerank]) + h[rerank:] for image, q, h in zip(images, queries, hits)]
        return [h[:k] for h in hits]

    def _rerank(self, image: Image.Image, text: str, hits: list[Hit]) -> list[Hit]:
        """The hits re-scored by the composer's second stage (:meth:`Composer.rerank_topk`, as
        evaluation calls it), best first: token rows 0 (the reference) and 1.. (the hits)."""
        if not hits:
            return hits
        ref = self.composer.image_features([image], ["tokens"])["tokens"]
        cand = self.composer.image_features([self.image_path(h.id) for h in hits], ["tokens"])["tokens"]
        table = torch.cat([ref, cand])
        stage1 = torch.tensor([[h.score for h in hits]])
        scores = self.composer.rerank_topk(lambda rows: table[rows.to(table.device)], torch.tensor([0]), [text],
                                           torch.arange(1, len(hits) + 1)[None], stage1)[0].tolist()
        return sorted((Hit(h.id, s) for h, s in zip(hits, scores)), key=lambda h: -h.score)
