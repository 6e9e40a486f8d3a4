"""The Milvus backend: the gallery's vectors live in a Milvus server, for galleries beyond one machine.

It talks to the server through ``pymilvus.MilvusClient``, so the same code serves a Milvus
cluster (``http://host:19530``) and a local ``milvus-lite server`` (what the tests start on
loopback). The collection holds ``id`` (VARCHAR primary key) and ``vector`` (FLOAT_VECTOR,
inner product, ``FLAT`` by default: exact, as faiss ``Flat``), with strong consistency, so that
a search sees every insert before it. The index folder keeps only the
manifest (uri, collection), the id list and the gallery paths.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from cirlab.retrieval.vectors import IDS, VectorIndex
from cirlab.utils.io import dump_json, read_json

MAX_ID_LENGTH = 1024
INSERT_BATCH = 2048
TIMEOUT_S = 60.0  # every call: a hung server fails the caller instead of hanging it


class MilvusIndex(VectorIndex):
    backend = "milvus"

    def __init__(self, dim: int, *, uri: str, collection: str = "cirlab", index_type: str = "FLAT",
                 model: dict[str, Any] | None = None, create: bool = False, rows: list[str] | None = None):
        super().__init__(dim, model=model)
        from pymilvus import DataType, MilvusClient

        self.uri, self.collection, self.index_type = uri, collection, index_type
        try:
            self.client = MilvusClient(uri=uri)
        except Exception as e:  # pymilvus raises its own exception types for every connection problem
            raise ConnectionError(f"cannot reach Milvus at {uri}: {e}") from None
        self._ids: dict[str, None] = dict.fromkeys(rows or [])
        if create:
            if self.client.has_collection(collection, timeout=TIMEOUT_S):
                self.client.drop_collection(collection, timeout=TIMEOUT_S)
            schema = self.client.create_schema(auto_id=False)
            schema.add_field("id", DataType.VARCHAR, is_primary=True, max_length=MAX_ID_LENGTH)
            schema.add_field("vector", DataType.FLOAT_VECTOR, dim=dim)
            params = self.client.prepare_index_params()
            params.add_index(field_name="vector", index_type=index_type, metric_type="IP")
            self.client.create_collection(collection, schema=schema, index_params=params,
                                          consistency_level="Strong", timeout=TIMEOUT_S)
        elif not self.client.has_collection(collection, timeout=TIMEOUT_S):
            raise ValueError(f"Milvus at {uri} has no collection {collection!r}; rebuild the index")
        self.client.load_collection(collection, timeout=TIMEOUT_S)

    def ids(self) -> list[str]:
        return list(self._ids)

    def __len__(self) -> int:
        return len(self._ids)

    def _add(self, ids: list[str], vectors: np.ndarray) -> None:
        long = [i for i in ids if len(i.encode()) > MAX_ID_LENGTH]
        if long:
            raise ValueError(f"Milvus ids are at most {MAX_ID_LENGTH} bytes: {long[0][:80]!r}...")
        for s in range(0, len(ids), INSERT_BATCH):
            rows = [{"id": i, "vector": v} for i, v in zip(ids[s:s + INSERT_BATCH], vectors[s:s + INSERT_BATCH].tolist())]
            self.client.insert(self.collection, rows, timeout=TIMEOUT_S)
        self._ids.update(dict.fromkeys(ids))

    def _search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, list[list[str | None]]]:
        results = self.client.search(self.collection, data=queries.tolist(), limit=k, anns_field="vector",
                                     output_fields=["id"], search_params={"metric_type": "IP"},
                                     consistency_level="Strong", timeout=TIMEOUT_S)
        scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
        ids: list[list[str | None]] = []
        for q, hits in enumerate(results):
            row: list[str | None] = [None] * k
            for j, hit in enumerate(list(hits)[:k]):
                row[j], scores[q, j] = hit["id"], hit["distance"]
            ids.append(row)
        return scores, ids

    def _remove(self, ids: list[str]) -> None:
        self.client.delete(self.collection, ids=ids, timeout=TIMEOUT_S)
        for i in ids:
            self._ids.pop(i, None)

    def backend_config(self) -> dict[str, Any]:
        return {"uri": self.uri, "collection": self.collection, "index_type": self.index_type}

    def _write(self, folder: Path) -> None:
        (folder / IDS).write_text(dump_json(list(self._ids)) + "\n")

    @classmethod
    def read(cls, folder: Path, manifest: dict[str, Any]) -> MilvusIndex:
        for key in ("uri", "collection"):
            if not isinstance(manifest.get(key), str):
                raise ValueError(f"{folder}: field {key!r} of the Milvus index manifest is missing")
        rows = read_json(folder / IDS, "index ids")
        index = cls(manifest["dim"], uri=manifest["uri"], collection=manifest["collection"],
                    index_type=manifest.get("index_type", "FLAT"), model=manifest.get("model"), rows=rows)
        stats = index.client.get_collection_stats(index.collection, timeout=TIMEOUT_S)
        if int(stats.get("row_count", len(rows))) != len(rows):
            raise ValueError(f"{folder}: Milvus collection {index.collection!r} holds {stats['row_count']} vectors, "
                             f"{IDS} lists {len(rows)}; rebuild the index")
        return index


@contextmanager
def milvus_lite_server(data_dir: str | Path, timeout: float = 60.0) -> Iterator[str]:
    """The uri of a ``milvus-lite server`` on a free 127.0.0.1 port for the block (tests, checks)."""
    exe = Path(sys.executable).with_name("milvus-lite")
    if not exe.exists():
        raise FileNotFoundError(f"milvus-lite is not installed next to {sys.executable}")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([str(exe), "server", "--data-dir", str(data_dir), "--host", "127.0.0.1", "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"milvus-lite server did not start within {timeout} s") from None
                time.sleep(0.2)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
