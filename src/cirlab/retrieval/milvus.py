"""The Milvus backend: the gallery's vectors live in a Milvus server, for galleries beyond one machine.

It talks to the server through ``pymilvus.MilvusClient``, so the same code serves a Milvus
cluster (``http://host:19530``) and a local ``milvus-lite server`` (what the tests start on
loopback). A collection holds ``id`` (VARCHAR primary key) and ``vector`` (FLOAT_VECTOR,
inner product, ``FLAT`` by default: exact, as faiss ``Flat``), with strong consistency, so that
a search sees every insert before it.

Each index folder has its own collection **alias** (``collection`` in the manifest; by default
``cirlab_<folder name>_<hash of its path>``). Each build fills a new collection
``<alias>_<8 hex>`` (``target``) that carries the index's identity (its ``index_id``, folder and
model) as a collection property; :meth:`MilvusIndex.save` then writes the folder naming it, points
the alias at it and drops the collection it replaces. The folder reads its ``target``, never the
alias: the folder's atomic save is the commit point, so a crash anywhere in a rebuild leaves the
folder naming a complete collection (the old one or the new), and the next build of the folder
drops what the crash left behind. The index folder keeps only the manifest, the id list and the
gallery paths.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import socket
import subprocess
import sys
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from cirlab.retrieval.vectors import IDS, MANIFEST, VectorIndex
from cirlab.utils.crash import crash_point, register
from cirlab.utils.io import dump_json, read_json

MAX_ID_LENGTH = 1024
INSERT_BATCH = 2048
TIMEOUT_S = 60.0  # every call: a hung server fails the caller instead of hanging it
SEARCH_TIMEOUT_S = 10.0  # a served query waits at most this for a server that hangs
CONNECT_TIMEOUT_S = 5.0  # a server that accepts but never answers fails a connect within seconds
PROBE_TIMEOUT_S = 2.0  # /healthz: answers within seconds whatever the server does
NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
MAX_NAME = 255  # Milvus's limit on collection and alias names
SUFFIX = 9  # "_" + 8 hex digits: a build's collection is named after its alias plus this
IDENTITY = "cirlab.index"  # the collection property that holds the index's identity (JSON)
NOT_LOADED = 101  # Milvus's code for "collection not loaded" (released, as after a restart)
CONNECT_FAILED = 2  # pymilvus's code for a failed (re)connect; Milvus's for "service unavailable"

FILLED = register("milvus.rebuild:filled", "retrieval/milvus.py save: the new collection filled, the index "
                  "folder not yet saved")
SAVED = register("milvus.rebuild:saved", "retrieval/milvus.py save: the folder saved naming the new collection, "
                 "the alias not yet switched")
SWITCHED = register("milvus.rebuild:switched", "retrieval/milvus.py save: the alias switched to the new collection, "
                    "the old one not yet dropped")


def default_collection(folder: str | Path) -> str:
    """The alias of the index in ``folder``: its name made a Milvus name, and a hash of its resolved
    path, so that two folders never share a collection (not even two folders of one name)."""
    path = Path(folder).resolve()
    name = re.sub(r"[^A-Za-z0-9_]", "_", path.name)[:64]
    return f"cirlab_{name}_{hashlib.sha256(str(path).encode()).hexdigest()[:8]}"


def check_collection_name(name: str) -> str:
    """``name`` if Milvus accepts it as a collection alias with room for a build's suffix; else a
    ValueError saying the rule (before any server is asked)."""
    if not NAME.fullmatch(name) or len(name) > MAX_NAME - SUFFIX:
        raise ValueError(f"Milvus collection name {name!r}: letters, digits and underscores, starting with a letter "
                         f"or an underscore, at most {MAX_NAME - SUFFIX} characters (each build appends _<8 hex>)")
    return name


class MilvusIndex(VectorIndex):
    """``create=True``: a new collection for the alias ``collection`` (refused where the alias names
    another index's); otherwise the collection ``target`` of a saved index (:meth:`read`)."""

    backend = "milvus"

    def __init__(self, dim: int, *, uri: str, collection: str, index_type: str = "FLAT",
                 model: dict[str, Any] | None = None, create: bool = False, folder: str | Path | None = None,
                 target: str = "", index_id: str = "", rows: list[str] | None = None):
        super().__init__(dim, model=model)
        self.uri, self.collection, self.index_type = uri, check_collection_name(collection), index_type
        self.folder = str(Path(folder).resolve()) if folder else ""
        self.client = _connect(uri)
        self._ids: dict[str, None] = dict.fromkeys(rows or [])
        self._switch_pending = create  # a new collection: save() points the alias at it
        if create:
            self.target, self.index_id = f"{collection}_{uuid.uuid4().hex[:8]}", str(uuid.uuid4())
            self._claim()
            self._create()
            self._call("load_collection", self.target)
        else:
            self.target, self.index_id = target, index_id

    # -- the server ----------------------------------------------------------------------------------
    def _call(self, method: str, *args: Any, timeout: float = TIMEOUT_S, **kwargs: Any) -> Any:
        """``client.<method>(...)``. A collection the server released (as a restart does) is loaded
        and the call made once more; a server that is away raises ConnectionError naming it."""
        try:
            try:
                return getattr(self.client, method)(*args, timeout=timeout, **kwargs)
            except Exception as e:
                if method == "load_collection" or not _released(e):
                    raise
            self.client.load_collection(self.target, timeout=TIMEOUT_S)
            return getattr(self.client, method)(*args, timeout=timeout, **kwargs)
        except Exception as e:
            if _unreachable(e):
                raise ConnectionError(f"Milvus at {self.uri} is not answering: {_reason(e)}") from None
            raise

    def probe(self) -> None:
        """One load-state call with a short timeout: a server that is away fails ``/healthz`` within
        seconds; a collection gone (the index rebuilt or removed under the server) fails it too."""
        from pymilvus.client.types import LoadState

        if self._call("get_load_state", self.target, timeout=PROBE_TIMEOUT_S)["state"] == LoadState.NotExist:
            raise ConnectionError(f"Milvus at {self.uri} no longer has collection {self.target!r} (the index was "
                                  f"rebuilt or removed): restart the server on the index folder")

    def _identity(self, name: str) -> dict[str, Any]:
        """The identity stored in collection ``name`` ({} for a collection cirlab did not make)."""
        properties = self._call("describe_collection", name).get("properties") or {}
        try:
            identity = json.loads(properties.get(IDENTITY, "{}"))
        except json.JSONDecodeError:
            return {}
        return identity if isinstance(identity, dict) else {}

    def _alias_target(self) -> str | None:
        """The collection the alias points at now (None: no such alias)."""
        if self.collection not in self._call("list_aliases")["aliases"]:
            return None
        return self._call("describe_alias", self.collection)["collection_name"]

    def _claim(self) -> None:
        """Refuse an alias that names another index's collection: building over it would hand that
        index these vectors. A rebuild of the same folder (or of the folder whose manifest names
        the alias and that index) may replace it."""
        current = self._alias_target()
        if current is None:
            if self._call("has_collection", self.collection):
                raise ValueError(f"Milvus at {self.uri} has a collection {self.collection!r} that is not a cirlab "
                                 f"index alias (an older cirlab's or another program's): pass another --collection")
            return
        owner = self._identity(current)
        if owner.get("folder") == self.folder or _names(self.folder, self.collection, owner.get("index_id")):
            return
        raise ValueError(f"Milvus collection {self.collection!r} at {self.uri} holds the index in "
                         f"{owner.get('folder') or '(not a cirlab index)'}, not {self.folder or 'this one'}: pass "
                         f"another --collection (or rebuild that folder)")

    def _create(self) -> None:
        from pymilvus import DataType

        schema = self.client.create_schema(auto_id=False)
        schema.add_field("id", DataType.VARCHAR, is_primary=True, max_length=MAX_ID_LENGTH)
        schema.add_field("vector", DataType.FLOAT_VECTOR, dim=self.dim)
        params = self.client.prepare_index_params()
        params.add_index(field_name="vector", index_type=self.index_type, metric_type="IP")
        identity = {"index_id": self.index_id, "folder": self.folder, "alias": self.collection,
                    "model": self.model.get("fingerprint", "")}
        self._call("create_collection", self.target, schema=schema, index_params=params, consistency_level="Strong",
                   properties={IDENTITY: json.dumps(identity)})

    # -- the interface -------------------------------------------------------------------------------
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
            self._call("insert", self.target, rows)
        self._ids.update(dict.fromkeys(ids))

    def _search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, list[list[str | None]]]:
        results = self._call("search", self.target, data=queries.tolist(), limit=k, anns_field="vector",
                             output_fields=["id"], search_params={"metric_type": "IP"}, consistency_level="Strong",
                             timeout=SEARCH_TIMEOUT_S)
        scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
        ids: list[list[str | None]] = []
        for q, hits in enumerate(results):
            row: list[str | None] = [None] * k
            for j, hit in enumerate(list(hits)[:k]):
                row[j], scores[q, j] = hit["id"], hit["distance"]
            ids.append(row)
        return scores, ids

    def _remove(self, ids: list[str]) -> None:
        self._call("delete", self.target, ids=ids)
        for i in ids:
            self._ids.pop(i, None)

    def backend_config(self) -> dict[str, Any]:
        return {"uri": self.uri, "collection": self.collection, "target": self.target, "index_id": self.index_id,
                "index_type": self.index_type}

    def save(self, path: str | Path) -> Path:
        """The folder first, then the alias, then the collection replaced: a crash between any two
        leaves the folder naming a complete collection, and the next build drops the leftovers."""
        if not self._switch_pending:
            return super().save(path)
        crash_point(FILLED)
        saved = super().save(path)
        crash_point(SAVED)
        previous = self._alias_target()
        if previous is None:
            self._call("create_alias", self.target, self.collection)
        elif previous != self.target:
            self._call("alter_alias", self.target, self.collection)
        crash_point(SWITCHED)
        for name in self._leftovers(previous):
            self._call("drop_collection", name)
        self._switch_pending = False
        return saved

    def _leftovers(self, previous: str | None) -> list[str]:
        """What this build replaces: the alias's previous collection, and the collections of this
        folder's earlier builds that a crash cut short (none is the target of any alias now)."""
        pattern = re.compile(re.escape(self.collection) + r"_[0-9a-f]{8}")
        ours = {n for n in self._call("list_collections") if pattern.fullmatch(n) and n != self.target
                and self._identity(n).get("folder") == self.folder}
        return sorted(ours | ({previous} if previous and previous != self.target else set()))

    def _write(self, folder: Path) -> None:
        (folder / IDS).write_text(dump_json(list(self._ids)) + "\n")

    @classmethod
    def read(cls, folder: Path, manifest: dict[str, Any]) -> MilvusIndex:
        """The index of ``folder``: its collection, checked to hold this folder's index and its count."""
        for key in ("uri", "collection", "target", "index_id"):
            if not isinstance(manifest.get(key), str):
                raise ValueError(f"{folder}: field {key!r} of the Milvus index manifest is missing (an index of an "
                                 f"older cirlab, whose collection other indexes could overwrite): rebuild it")
        rows = read_json(folder / IDS, "index ids")
        index = cls(manifest["dim"], uri=manifest["uri"], collection=manifest["collection"], folder=folder,
                    index_type=manifest.get("index_type", "FLAT"), model=manifest.get("model"),
                    target=manifest["target"], index_id=manifest["index_id"], rows=rows)
        index._check_collection(folder)
        index._call("load_collection", index.target)
        return index

    def _check_collection(self, folder: Path) -> None:
        """Refuse a collection that is not this folder's index (another index's, or a stale count)."""
        if not self._call("has_collection", self.target):
            raise ValueError(f"{folder}: Milvus at {self.uri} has no collection {self.target!r}; rebuild the index")
        owner = self._identity(self.target)
        if owner.get("index_id") != self.index_id:
            raise ValueError(f"{folder}: Milvus collection {self.target!r} at {self.uri} holds index "
                             f"{owner.get('index_id')} ({owner.get('folder') or 'no cirlab identity'}), not this "
                             f"folder's {self.index_id}; rebuild the index")
        count = int(self._call("get_collection_stats", self.target).get("row_count", len(self._ids)))
        if count != len(self._ids):
            raise ValueError(f"{folder}: Milvus collection {self.target!r} holds {count} vectors, {IDS} lists "
                             f"{len(self._ids)}; rebuild the index")


def _connect(uri: str) -> Any:
    from pymilvus import MilvusClient

    _quiet_pymilvus()
    try:
        return MilvusClient(uri=uri, timeout=CONNECT_TIMEOUT_S)
    except Exception as e:  # pymilvus raises its own exception types for every connection problem
        raise ConnectionError(f"Milvus at {uri} is not answering: {_reason(e)}") from None


def _quiet_pymilvus() -> None:
    """pymilvus logs every failed call with its traceback on stderr; cirlab raises a sentence
    naming the server instead, which the traceback would bury."""
    for name in ("pymilvus", "pymilvus.milvus_client"):
        logging.getLogger(name).setLevel(logging.CRITICAL)


def _unreachable(e: Exception) -> bool:
    """A server that is away: refused, reset, timed out, or pymilvus's failed reconnect."""
    import grpc
    from pymilvus.exceptions import MilvusException

    away = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
    if isinstance(e, grpc.RpcError):
        return e.code() in away
    return isinstance(e, MilvusException) and (e.code == CONNECT_FAILED or e.code in away)


def _released(e: Exception) -> bool:
    from pymilvus.exceptions import MilvusException

    return isinstance(e, MilvusException) and (e.code == NOT_LOADED or "not loaded" in str(e.message).lower()
                                               or "released" in str(e.message).lower())


def _reason(e: Exception) -> str:
    import grpc

    if isinstance(e, grpc.RpcError):
        return f"{e.code().name.lower()}: {e.details()}"
    return str(getattr(e, "message", "") or e)


def _names(folder: str, alias: str, index_id: Any) -> bool:
    """Whether the index saved in ``folder`` names ``alias`` and ``index_id`` (its rebuild may replace them)."""
    try:
        manifest = read_json(Path(folder) / MANIFEST, "index manifest") if folder else {}
    except (OSError, ValueError):
        return False
    return isinstance(manifest, dict) and manifest.get("collection") == alias and manifest.get("index_id") == index_id


class LiteServer:
    """A ``milvus-lite server`` on 127.0.0.1 (tests, checks). Its port and data dir are fixed at
    construction, so that :meth:`kill` (SIGKILL, as a crash) then :meth:`start` is a restart of the
    same server: same uri, same collections."""

    def __init__(self, data_dir: str | Path, timeout: float = 60.0):
        self.exe = Path(sys.executable).with_name("milvus-lite")
        if not self.exe.exists():
            raise FileNotFoundError(f"milvus-lite is not installed next to {sys.executable}")
        self.data_dir, self.timeout = Path(data_dir), timeout
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> str:
        """Start it; return once its port accepts connections (within ``timeout`` seconds)."""
        self.proc = subprocess.Popen([str(self.exe), "server", "--data-dir", str(self.data_dir), "--host", "127.0.0.1",
                                      "--port", str(self.port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return self.uri
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.kill()
                    raise RuntimeError(f"milvus-lite server did not start on port {self.port} within "
                                       f"{self.timeout} s") from None
                time.sleep(0.1)

    def kill(self) -> None:
        """SIGKILL: no shutdown, no flush, as a crash or a power cut."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(10)
            self.proc = None

    def stop(self) -> None:
        """End the server process (terminate, then kill after 10 s); its data folder stays."""
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                pass
            self.kill()


@contextmanager
def milvus_lite_server(data_dir: str | Path, timeout: float = 60.0) -> Iterator[str]:
    """The uri of a ``milvus-lite server`` on a free 127.0.0.1 port for the block (tests, checks)."""
    server = LiteServer(data_dir, timeout)
    server.start()
    try:
        yield server.uri
    finally:
        server.stop()
