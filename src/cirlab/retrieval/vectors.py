"""The index interface shared by every backend: :class:`VectorIndex` (add, search, remove, save),
:class:`Hit`, and the index folder's file names and format.

Backends (:mod:`cirlab.retrieval.index` for faiss and the backend choice,
:mod:`cirlab.retrieval.milvus`) import this module; it imports neither of them.

Folder layout (written atomically: a reader sees the old index or the new one, never half)::

    index.json     format, version, backend, dim, factory, count, the model's fingerprint, and
                   the sha256 of every other file (a damaged or swapped file is refused on load)
    ids.json       row -> image id (faiss labels are row numbers; removed rows are null)
    gallery.json   image id -> image file (absolute, or relative to the index folder)
    index.faiss    the faiss index (faiss backend; Milvus keeps its vectors in the server)
"""

from __future__ import annotations

import hashlib
import shutil
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Sequence

import numpy as np

from cirlab.utils.io import atomic_dir, dump_json

FORMAT, VERSION = "cirlab-index", 1
MANIFEST, IDS, GALLERY = "index.json", "ids.json", "gallery.json"


def file_sha256(path: Path) -> str:
    """The sha256 of a file's bytes, as the manifest records it for every file of an index folder."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def check_files(folder: Path, manifest: dict[str, Any]) -> None:
    """Refuse a folder whose files are not the ones its manifest was written with (a truncated
    ``index.faiss``, a file copied in from another index). Manifests before the field: no check."""
    for name, digest in (manifest.get("sha256") or {}).items():
        file = folder / name
        if not file.is_file():
            raise FileNotFoundError(f"{folder}: {name} is missing (the manifest lists it); rebuild the index")
        if file_sha256(file) != digest:
            raise ValueError(f"{file} is not the file this index was saved with (its sha256 differs from "
                             f"{MANIFEST}'s): it was damaged or replaced; rebuild the index")


@dataclass(frozen=True)
class Hit:
    """One search result: a gallery image id and its score (inner product, the cosine for
    normalised vectors; higher is better)."""

    id: str
    score: float


class VectorIndex(ABC):
    """Ids + (N, dim) float32 vectors; ``search`` ranks by inner product, best first.

    ``gallery`` maps each id to its image file (what the server shows and ``--grid`` draws);
    ``model`` records the fingerprint, kind and path of the model that made the vectors."""

    backend: ClassVar[str] = ""

    def __init__(self, dim: int, *, model: dict[str, Any] | None = None):
        if dim < 1:
            raise ValueError(f"index dimension must be >= 1, got {dim}")
        self.dim, self.model = dim, dict(model or {})
        self.gallery: dict[str, str] = {}

    # -- the interface -----------------------------------------------------------------------------
    @abstractmethod
    def _add(self, ids: list[str], vectors: np.ndarray) -> None: ...

    @abstractmethod
    def _search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, list[list[str | None]]]:
        """(Q, k) scores and ids (None where fewer than k exist)."""

    @abstractmethod
    def _remove(self, ids: list[str]) -> None: ...

    @abstractmethod
    def ids(self) -> list[str]:
        """The ids the index holds."""

    def __len__(self) -> int:
        return len(self.ids())

    def __contains__(self, image_id: str) -> bool:
        return image_id in self.gallery

    def add(self, ids: Sequence[str], vectors: np.ndarray, paths: Sequence[str | Path] | None = None) -> None:
        """Add (or replace: an id already present gets its new vector) ``ids`` with their vectors."""
        ids = [str(i) for i in ids]
        vectors = self._check(vectors, len(ids), "vectors")
        seen: set[str] = set()
        dup = next((i for i in ids if i in seen or seen.add(i)), None)
        if dup is not None:
            raise ValueError(f"index add: id {dup!r} given more than once")
        present = [i for i in ids if i in self.gallery]
        if present:
            self._remove(present)
        self._add(ids, vectors)
        for i, p in zip(ids, paths if paths is not None else [""] * len(ids)):
            self.gallery[i] = str(p)

    def remove(self, ids: Sequence[str]) -> int:
        """Remove ``ids``; unknown ids are an error (naming them), so a typo never passes silently."""
        ids = list(dict.fromkeys(str(i) for i in ids))
        unknown = [i for i in ids if i not in self.gallery]
        if unknown:
            raise KeyError(f"not in the index: {unknown[:5]}")
        self._remove(ids)
        for i in ids:
            del self.gallery[i]
        return len(ids)

    def search(self, queries: np.ndarray, k: int, exclude: Sequence[str | None] | None = None) -> list[list[Hit]]:
        """Top ``k`` hits per query row; ``exclude[i]``: an id left out of query i's list (its
        reference image, as the CIRR protocol does)."""
        queries = self._check(queries, None, "queries")
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if exclude is not None and len(exclude) != len(queries):
            raise ValueError(f"exclude has {len(exclude)} entries for {len(queries)} queries")
        extra = int(exclude is not None and any(e is not None for e in exclude))
        depth = min(k + extra, len(self))
        if depth == 0:
            return [[] for _ in queries]
        scores, ids = self._search(queries, depth)
        out = []
        for q, (row_scores, row_ids) in enumerate(zip(scores.tolist(), ids)):
            skip = exclude[q] if exclude is not None else None
            hits = [Hit(i, s) for i, s in zip(row_ids, row_scores) if i is not None and i != skip]
            out.append(hits[:k])
        return out

    def _check(self, x: np.ndarray, n: int | None, what: str) -> np.ndarray:
        x = np.ascontiguousarray(np.asarray(x, dtype=np.float32))
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"{what}: expected shape (n, {self.dim}), got {tuple(x.shape)}")
        if n is not None and len(x) != n:
            raise ValueError(f"{what}: {len(x)} rows for {n} ids")
        if not np.isfinite(x).all():
            raise ValueError(f"{what}: not finite (NaN or inf)")
        return x

    # -- folders -------------------------------------------------------------------------------------
    def manifest(self) -> dict[str, Any]:
        """The ``index.json`` fields (before the files' checksums): format, backend, dim, count, model."""
        return {"format": FORMAT, "version": VERSION, "backend": self.backend, "dim": self.dim, "metric": "ip",
                "count": len(self), "model": self.model, **self.backend_config()}

    def backend_config(self) -> dict[str, Any]:
        """The backend's own settings, saved in the manifest so that
        :func:`~cirlab.retrieval.index.load_index` rebuilds it as it was (faiss: factory and search
        parameters)."""
        return {}

    def probe(self) -> None:
        """Raise ConnectionError when the backend cannot answer now (a server that is away);
        what ``/healthz`` asks. An embedded index is always there."""

    def save(self, path: str | Path) -> Path:
        """Write the index folder atomically; files of the old folder that the index does not
        write itself (images added through the server) are carried over."""
        path = Path(path)
        with atomic_dir(path) as tmp:
            if path.is_dir():
                for old in path.iterdir():
                    if old.name not in (MANIFEST, IDS, GALLERY, *self.files()):
                        (shutil.copytree if old.is_dir() else shutil.copy2)(old, tmp / old.name)
            self._write(tmp)
            (tmp / GALLERY).write_text(dump_json(self.gallery) + "\n")
            sha256 = {name: file_sha256(tmp / name) for name in (IDS, GALLERY, *self.files())}
            manifest = {**self.manifest(), "sha256": sha256}
            (tmp / MANIFEST).write_text(dump_json(manifest, indent=1) + "\n")  # last: marks it complete
        return path

    def files(self) -> tuple[str, ...]:
        """The backend's own files in the folder."""
        return ()

    @abstractmethod
    def _write(self, folder: Path) -> None: ...

    def image_path(self, image_id: str, folder: Path) -> Path:
        """The file of a gallery image (relative paths are relative to the index folder)."""
        p = Path(self.gallery[image_id])
        return p if p.is_absolute() else folder / p
