"""Gallery indexes: image ids and normalised vectors in, the top k by inner product out.

One small interface (:class:`VectorIndex`: add, search, remove, save, load; defined in
:mod:`cirlab.retrieval.vectors` and importable from here) and two backends: faiss embedded
(:class:`FaissIndex`, the default) and Milvus for galleries beyond one machine
(:mod:`cirlab.retrieval.milvus`). Composer vectors are L2-normalised, so inner product is the
cosine that evaluation ranks by; the default faiss index is exact (``Flat``), so a served
ranking equals ``cirlab eval``'s. The folder layout is described in :mod:`cirlab.retrieval.vectors`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from cirlab.retrieval.vectors import FORMAT, GALLERY, IDS, MANIFEST, VERSION, Hit, VectorIndex, check_files
from cirlab.utils.io import dump_json, read_json, recover_dir

__all__ = ["BACKENDS", "FORMAT", "GALLERY", "IDS", "MANIFEST", "VERSION", "FaissIndex", "Hit", "VectorIndex",
           "check_model", "load_index", "new_index", "read_index_manifest"]


class FaissIndex(VectorIndex):
    """faiss, embedded. ``factory`` is a faiss index-factory string: ``Flat`` (exact, the default),
    ``HNSW32``, ``IVF4096,PQ32np,RFlat`` (IVF-PQ with an exact refine step; ``np``: no polysemous
    training, which costs ~40x the training time for a search mode cirlab does not use)...;
    ``params`` are search-time parameters in faiss's ParameterSpace syntax: ``nprobe=32``,
    ``efSearch=128``, and for a refine step ``k_factor_rf=4`` (re-score 4k candidates exactly;
    faiss's default re-scores only the k it returns, which gains nothing)."""

    backend = "faiss"

    def __init__(self, dim: int, factory: str = "Flat", params: str = "", *, model: dict[str, Any] | None = None,
                 index: Any = None, rows: list[str | None] | None = None):
        super().__init__(dim, model=model)
        import faiss

        self.factory, self.params = factory, params
        if index is None:
            try:
                index = faiss.index_factory(dim, f"IDMap2,{factory}", faiss.METRIC_INNER_PRODUCT)
            except RuntimeError as e:
                raise ValueError(f"faiss factory {factory!r}: {str(e).splitlines()[-1]}") from None
        self.index = index
        self.rows: list[str | None] = rows or []  # faiss label -> id
        self.label = {i: n for n, i in enumerate(self.rows) if i is not None}
        if params:
            try:
                faiss.ParameterSpace().set_index_parameters(self.index, params)
            except RuntimeError as e:
                raise ValueError(f"faiss search parameters {params!r}: {str(e).splitlines()[-1]}") from None

    def ids(self) -> list[str]:
        return [i for i in self.rows if i is not None]

    def __len__(self) -> int:
        return len(self.label)

    def _add(self, ids: list[str], vectors: np.ndarray) -> None:
        if not self.index.is_trained:
            try:
                self.index.train(vectors)
            except RuntimeError as e:
                raise ValueError(f"faiss {self.factory!r} could not be trained on {len(vectors)} vectors: "
                                 f"{str(e).splitlines()[-1]}") from None
        labels = np.arange(len(self.rows), len(self.rows) + len(ids), dtype=np.int64)
        self.index.add_with_ids(vectors, labels)
        self.rows.extend(ids)
        self.label.update({i: int(n) for i, n in zip(ids, labels)})

    def _search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, list[list[str | None]]]:
        scores, labels = self.index.search(queries, k)
        return scores, [[self.rows[n] if n >= 0 else None for n in row] for row in labels.tolist()]

    def _remove(self, ids: list[str]) -> None:
        labels = np.array([self.label[i] for i in ids], dtype=np.int64)
        try:
            self.index.remove_ids(labels)
        except RuntimeError:
            raise ValueError(f"faiss {self.factory!r} indexes cannot remove or replace vectors; rebuild the "
                             f"index (Flat and IVF without a refine step can)") from None
        for i in ids:
            self.rows[self.label.pop(i)] = None

    def backend_config(self) -> dict[str, Any]:
        return {"factory": self.factory, "params": self.params}

    def files(self) -> tuple[str, ...]:
        return ("index.faiss",)

    def _write(self, folder: Path) -> None:
        import faiss

        faiss.write_index(self.index, str(folder / "index.faiss"))
        (folder / IDS).write_text(dump_json(self.rows) + "\n")

    @classmethod
    def read(cls, folder: Path, manifest: dict[str, Any], *, mmap: bool = False) -> FaissIndex:
        """The index in ``folder`` (use :func:`load_index`, which checks the folder first);
        ``mmap``: mapped read-only, shared between processes."""
        import faiss

        flags = faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY if mmap else 0
        file = folder / "index.faiss"
        if not file.is_file():
            raise FileNotFoundError(f"{folder}: no index.faiss")
        try:
            index = faiss.read_index(str(file), flags)
        except RuntimeError as e:
            raise ValueError(f"{file} cannot be read by faiss (damaged or truncated; rebuild the index): "
                             f"{str(e).strip().splitlines()[-1]}") from None
        rows = read_json(folder / IDS, "index ids")
        if index.ntotal != sum(r is not None for r in rows) or index.d != manifest["dim"]:
            raise ValueError(f"{folder}: index.faiss holds {index.ntotal} vectors of dim {index.d}, "
                             f"{IDS} and {MANIFEST} say {sum(r is not None for r in rows)} of dim {manifest['dim']}")
        return cls(manifest["dim"], manifest.get("factory", "Flat"), manifest.get("params", ""),
                   model=manifest.get("model"), index=index, rows=rows)


BACKENDS = ("faiss", "milvus")


def new_index(backend: str, dim: int, *, model: dict[str, Any] | None = None, factory: str = "Flat",
              params: str = "", uri: str | None = None, collection: str | None = None,
              folder: str | Path | None = None) -> VectorIndex:
    """An empty index of ``backend``, to be saved in ``folder`` (Milvus needs ``uri``; its collection
    alias defaults to one named after ``folder``, so that no two index folders share one)."""
    if backend == "faiss":
        return FaissIndex(dim, factory, params, model=model)
    if backend == "milvus":
        from cirlab.retrieval.milvus import MilvusIndex, default_collection

        if not uri:
            raise ValueError("the milvus backend needs a server uri (--uri http://host:19530)")
        if not (collection or folder):
            raise ValueError("a Milvus index needs its folder or a collection name")
        return MilvusIndex(dim, uri=uri, collection=collection or default_collection(folder), model=model,
                           create=True, folder=folder)
    raise ValueError(f"unknown index backend {backend!r}; expected one of {list(BACKENDS)}")


def read_index_manifest(path: str | Path) -> dict[str, Any]:
    """The checked ``index.json`` of an index folder; errors name the file and field."""
    path = Path(path)
    file = path / MANIFEST
    if not file.is_file():
        raise FileNotFoundError(f"{path} is not a cirlab index folder: no {MANIFEST}")
    manifest = read_json(file, "index manifest")
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ValueError(f"{file}: not a cirlab index manifest (format {FORMAT!r} expected)")
    if manifest.get("version") != VERSION:
        raise ValueError(f"{file}: unsupported version {manifest.get('version')!r} (this cirlab reads {VERSION})")
    if manifest.get("backend") not in BACKENDS:
        raise ValueError(f"{file}: field 'backend' is {manifest.get('backend')!r}, expected one of {list(BACKENDS)}")
    if not isinstance(manifest.get("dim"), int):
        raise ValueError(f"{file}: field 'dim' is missing or not an integer")
    return manifest


def load_index(path: str | Path, *, mmap: bool = False) -> VectorIndex:
    """The index saved in ``path``; ``mmap=True`` maps a faiss index read-only instead of reading it
    (what the server does: start-up is instant and pages are shared between worker processes)."""
    path = recover_dir(path)
    manifest = read_index_manifest(path)
    check_files(path, manifest)
    if manifest["backend"] == "faiss":
        index: VectorIndex = FaissIndex.read(path, manifest, mmap=mmap)
    else:
        from cirlab.retrieval.milvus import MilvusIndex

        index = MilvusIndex.read(path, manifest)
    gallery = read_json(path / GALLERY, "index gallery")
    if not isinstance(gallery, dict) or set(gallery) != set(index.ids()):
        raise ValueError(f"{path / GALLERY}: its ids differ from the index's ({len(gallery)} vs {len(index)})")
    index.gallery = gallery
    return index


def check_model(index: VectorIndex, fingerprint: str, where: str | os.PathLike) -> None:
    """Refuse a model other than the one whose vectors the index holds: its queries would live in
    another space and every ranking would be silently wrong."""
    expected = index.model.get("fingerprint")
    if expected != fingerprint:
        raise ValueError(f"{where}: the index was built with model {index.model.get('path', '?')} (fingerprint "
                         f"{expected}), not with this model (fingerprint {fingerprint}); rebuild it with "
                         f"`cirlab index build` or query it with its own model")
