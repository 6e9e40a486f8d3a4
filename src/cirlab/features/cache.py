"""Image features of a frozen backbone, computed once and memory-mapped from disk.

Training and evaluation with a frozen image encoder see the same images again and again;
``cached_features`` encodes them once and serves the stored arrays afterwards.

Layout: ``cache_dir/<entry>/`` holds one ``<field>.npy`` per output of ``encode`` (``embeds``,
optionally ``tokens``...) and a ``manifest.json``. ``<entry>`` is a hash of the canonical JSON
of ``key`` (backbone fingerprint, preprocessing, dataset...), of the ordered id list and of the
storage dtypes, so a change in any of them selects another entry: a stale one is never served.

Crash safety: an entry is built in a hidden temporary directory, the manifest is written last,
and the whole directory is renamed into place. Whatever a crash leaves behind is either a
hidden temporary directory (never looked up; ``prune_cache`` removes it) or nothing.
Each load checks the manifest, the file sizes, the ``.npy`` headers and a checksum; on any
failure it warns (naming the file and the reason) and rebuilds.

The cache is built by a single process before training starts; there is no lock and no
distributed code. Two processes building the same entry at once do not corrupt it: each builds
its own temporary directory and the last rename wins.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import tempfile
import warnings
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from tqdm import tqdm

from cirlab.utils.io import atomic_write_json, dump_json, read_json

FORMAT = 2  # 2: non-RGB images preprocessed in their own mode (cirlab.data.transforms)
MANIFEST = "manifest.json"

# Storage dtypes. Token sequences are large (BLIP ViT-B: 577 x 768 per image), so they are
# stored as float16 by default: half the disk and page cache, and an error of ~1e-3 relative,
# far below what a frozen-feature model can see. numpy has no bfloat16: store float16 and
# cast on use (``FeatureSet.get(..., dtype=torch.bfloat16)``).
DEFAULT_DTYPES: dict[str, torch.dtype] = {"embeds": torch.float32, "tokens": torch.float16}
FALLBACK_DTYPE = torch.float32
_NUMPY_DTYPES = {torch.float32: np.float32, torch.float16: np.float16}

# Checksums: files up to FULL_CHECK_BYTES are hashed whole on every load. A bigger file (token
# sequences of a whole gallery reach tens of GB) would have to be read entirely on every load,
# which defeats memory mapping; for those the digest covers the file size plus SAMPLE_BLOCKS
# evenly spaced blocks of SAMPLE_BLOCK_BYTES, the first (the .npy header) and the last (a
# truncated or zero-filled tail) included. That catches partial writes and truncation; a
# bit flip between sampled blocks goes unnoticed.
FULL_CHECK_BYTES = 256 * 2**20
SAMPLE_BLOCKS = 64
SAMPLE_BLOCK_BYTES = 2**20


class FeatureCacheWarning(UserWarning):
    """An entry on disk was found invalid and is being rebuilt."""


class _Invalid(Exception):
    """Why an entry on disk cannot be used (turned into a warning, then a rebuild)."""


@dataclass
class FeatureSet:
    """Features of ``ids``, row ``i`` belonging to ``ids[i]``.

    ``fields`` maps a field name to a CPU tensor backed by the memory-mapped ``.npy`` file:
    nothing is read until it is used. The mapping is copy-on-write, so the file can never be
    changed through the tensor; still, treat the tensors as read-only.
    """

    path: Path
    key: dict[str, Any]
    ids: list[str]
    fields: dict[str, torch.Tensor]
    _rows: dict[str, int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._rows = {id_: i for i, id_ in enumerate(self.ids)}

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self.fields:
            raise KeyError(f"no field {name!r} in {self.path} (fields: {sorted(self.fields)})")
        return self.fields[name]

    def index_of(self, id_: str) -> int:
        try:
            return self._rows[id_]
        except KeyError:
            raise KeyError(f"image id {id_!r} is not in the feature set {self.path}") from None

    def get(self, name: str, indices: Sequence[int] | torch.Tensor,
            dtype: torch.dtype | None = None) -> torch.Tensor:
        """Rows ``indices`` of field ``name`` as a new (in-memory) tensor, cast to ``dtype``."""
        rows = torch.as_tensor(indices, dtype=torch.long)
        out = self[name].index_select(0, rows)
        return out if dtype is None else out.to(dtype)


def cached_features(cache_dir: str | os.PathLike, *, key: dict[str, Any], ids: list[str],
                    encode: Callable[[list[str]], dict[str, torch.Tensor]], batch_size: int = 64,
                    dtype: dict[str, torch.dtype] | None = None, progress: bool = True) -> FeatureSet:
    """Features of ``ids`` under ``key``: loaded from ``cache_dir`` when a valid entry exists,
    else computed by ``encode`` (called on ``batch_size`` ids at a time, in order) and stored.

    ``key`` must be JSON-able and must change whenever the features would: backbone
    fingerprint, preprocessing, dataset. ``encode(batch_ids)`` returns ``{field: Tensor[b, ...]}``
    with the same fields and trailing shapes for every batch. ``dtype`` overrides the storage
    dtype per field (float32 or float16; defaults in ``DEFAULT_DTYPES``, float32 otherwise).
    """
    cache_dir = Path(cache_dir)
    ids = list(ids)
    _check_ids(ids)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    dtypes = {**DEFAULT_DTYPES, **(dtype or {})}
    for name, dt in dtypes.items():
        if dt not in _NUMPY_DTYPES:
            raise ValueError(f"storage dtype of field {name!r} must be torch.float32 or torch.float16, "
                             f"got {dt} (numpy cannot store bfloat16: store float16, cast on use)")
    try:
        key = _canonical(key)
    except TypeError as e:
        raise TypeError(f"feature cache key must be JSON-able: {e}") from None

    ids_digest = _sha256(dump_json(ids).encode())
    dtype_names = {name: str(dt).removeprefix("torch.") for name, dt in dtypes.items()}
    identity = {"format": FORMAT, "key": key, "ids_sha256": ids_digest, "dtypes": dtype_names}
    entry = cache_dir / _sha256(dump_json(identity).encode())[:24]

    if entry.exists():
        try:
            return _load(entry, identity, ids, verify=True)
        except _Invalid as e:
            warnings.warn(f"feature cache {e}; rebuilding {entry}", FeatureCacheWarning, stacklevel=2)
    _build(entry, identity, ids, encode, batch_size, dtypes, progress)
    return _load(entry, identity, ids, verify=False)


def cache_info(cache_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """One record per directory in ``cache_dir``: its key, size, fields and whether it is complete.

    Leftovers of an interrupted build (hidden ``.*.tmp`` / ``.*.old`` directories) and entries
    without a readable manifest are listed with ``complete=False``.
    """
    cache_dir = Path(cache_dir)
    if not cache_dir.is_dir():
        return []
    infos = []
    for path in sorted(p for p in cache_dir.iterdir() if p.is_dir()):
        size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        info: dict[str, Any] = {"name": path.name, "path": path, "bytes": size, "complete": False}
        if not path.name.startswith("."):
            try:
                manifest = read_json(path / MANIFEST, "feature cache manifest")
                info.update(complete=True, key=manifest["key"], n=manifest["n"], created=manifest["created"],
                            fields={k: {"shape": v["shape"], "dtype": v["dtype"]}
                                    for k, v in manifest["fields"].items()})
            except (OSError, ValueError, KeyError, TypeError):
                pass
        infos.append(info)
    return infos


def prune_cache(cache_dir: str | os.PathLike,
                keep: Callable[[dict[str, Any]], bool] = lambda info: True) -> list[Path]:
    """Delete incomplete entries and build leftovers, and every complete entry whose
    ``cache_info`` record fails ``keep`` (e.g. ``lambda i: i["key"]["backbone"] == fp``).
    Do not run it while a build is in progress. Returns the deleted paths."""
    removed = []
    for info in cache_info(cache_dir):
        if not info["complete"] or not keep(info):
            shutil.rmtree(info["path"])
            removed.append(info["path"])
    return removed


# --- building -------------------------------------------------------------------------------

def _build(entry: Path, identity: dict[str, Any], ids: list[str],
           encode: Callable[[list[str]], dict[str, torch.Tensor]], batch_size: int,
           dtypes: dict[str, torch.dtype], progress: bool) -> None:
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", suffix=".tmp", dir=entry.parent))
    try:
        shapes = _encode_into(tmp, ids, encode, batch_size, dtypes, progress)
        files = {}
        for name, shape in shapes.items():
            path = tmp / f"{name}.npy"
            with open(path, "rb") as f:
                os.fsync(f.fileno())
            files[name] = {"file": path.name, "shape": list(shape), "dtype": _storage(name, dtypes).__name__,
                           "bytes": path.stat().st_size, "checksum": _checksum(path)}
        manifest = {**identity, "n": len(ids), "fields": files,
                    "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        atomic_write_json(tmp / MANIFEST, manifest, indent=1)
        _install(tmp, entry)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _encode_into(tmp: Path, ids: list[str], encode: Callable[[list[str]], dict[str, torch.Tensor]],
                 batch_size: int, dtypes: dict[str, torch.dtype], progress: bool) -> dict[str, tuple[int, ...]]:
    """Run ``encode`` over ``ids`` and write each field into a preallocated ``.npy`` in ``tmp``."""
    arrays: dict[str, np.memmap] = {}
    with tqdm(total=len(ids), desc="caching features", unit="img", disable=not progress) as bar:
        for start in range(0, len(ids), batch_size):
            batch = ids[start:start + batch_size]
            with torch.inference_mode():
                out = encode(batch)
            where = f"encode() on ids[{start}:{start + len(batch)}]"
            if not isinstance(out, dict) or not out:
                raise TypeError(f"{where} must return a non-empty dict of tensors, got {type(out).__name__}")
            if not arrays:
                for name, value in out.items():
                    if not isinstance(name, str) or not name.isidentifier():
                        raise ValueError(f"{where}: field names must be identifiers, got {name!r}")
                    if not isinstance(value, torch.Tensor) or value.ndim < 1:
                        raise TypeError(f"{where}: field {name!r} must be a tensor [batch, ...]")
                    arrays[name] = np.lib.format.open_memmap(
                        tmp / f"{name}.npy", mode="w+", dtype=_storage(name, dtypes),
                        shape=(len(ids), *value.shape[1:]))
            if set(out) != set(arrays):
                raise ValueError(f"{where} returned fields {sorted(out)}, the first batch {sorted(arrays)}")
            for name, value in out.items():
                expected = (len(batch), *arrays[name].shape[1:])
                if tuple(value.shape) != expected:
                    raise ValueError(f"{where}: field {name!r} has shape {tuple(value.shape)}, expected {expected}")
                src = value.detach().to("cpu")
                stored = src.to(dtypes.get(name, FALLBACK_DTYPE))
                if not torch.isfinite(stored).all():
                    why = ("contains NaN or inf" if not torch.isfinite(src).all()
                           else "overflows float16 (|x| > 65504): store it as float32")
                    raise ValueError(f"{where}: field {name!r} {why}")
                arrays[name][start:start + len(batch)] = stored.numpy()
            bar.update(len(batch))
    for array in arrays.values():
        array.flush()
    return {name: array.shape for name, array in arrays.items()}


def _install(tmp: Path, entry: Path) -> None:
    """Rename a finished build to ``entry``, replacing what is there (a stale or corrupt entry,
    or the same entry from a concurrent writer: the last rename wins)."""
    for _ in range(5):
        try:
            os.rename(tmp, entry)
            return
        except OSError as e:
            if e.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
        # Move the existing entry aside first (a rename, so readers never see it half deleted).
        trash = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", suffix=".old", dir=entry.parent))
        try:
            os.rename(entry, trash / entry.name)
        except FileNotFoundError:
            pass
        finally:
            shutil.rmtree(trash, ignore_errors=True)
    raise RuntimeError(f"could not move the feature cache build {tmp} to {entry}: it keeps being replaced")


# --- loading and checking -------------------------------------------------------------------

def _load(entry: Path, identity: dict[str, Any], ids: list[str], *, verify: bool) -> FeatureSet:
    """Open ``entry``; raise ``_Invalid`` (naming the file) if anything does not match."""
    manifest_path = entry / MANIFEST
    try:
        manifest = read_json(manifest_path, "feature cache manifest")
    except (OSError, ValueError) as e:
        raise _Invalid(f"incomplete entry ({e})") from None
    try:
        fields_meta = manifest["fields"]
        if {k: manifest.get(k) for k in identity} != identity or manifest["n"] != len(ids):
            raise _Invalid(f"{manifest_path}: key, ids or dtypes differ from the requested ones")
        fields = {}
        for name, meta in fields_meta.items():
            path = entry / meta["file"]
            if not path.is_file():
                raise _Invalid(f"{path}: file missing")
            if path.stat().st_size != meta["bytes"]:
                raise _Invalid(f"{path}: {path.stat().st_size} bytes, manifest says {meta['bytes']} (truncated?)")
            shape = (len(ids), *meta["shape"][1:])
            try:
                array = np.load(path, mmap_mode="c")
            except (OSError, ValueError) as e:
                raise _Invalid(f"{path}: unreadable .npy ({e})") from None
            if array.shape != tuple(meta["shape"]) or array.shape != shape or array.dtype != np.dtype(meta["dtype"]):
                raise _Invalid(f"{path}: holds {array.dtype}{list(array.shape)}, {MANIFEST} says "
                               f"{meta['dtype']}{meta['shape']} for {len(ids)} ids")
            if verify and _checksum(path) != meta["checksum"]:
                raise _Invalid(f"{path}: checksum mismatch (corrupted)")
            fields[name] = torch.from_numpy(array)
    except (KeyError, TypeError) as e:
        raise _Invalid(f"{manifest_path}: malformed manifest ({type(e).__name__}: {e})") from None
    return FeatureSet(path=entry, key=manifest["key"], ids=ids, fields=fields)


def _checksum(path: Path) -> dict[str, str]:
    """blake2b of the whole file, or of its size and sampled blocks for big files (see top)."""
    size = path.stat().st_size
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        if size <= FULL_CHECK_BYTES:
            mode = "full"
            while chunk := f.read(2**22):
                h.update(chunk)
        else:
            mode = "sampled"
            h.update(str(size).encode())
            last = size - SAMPLE_BLOCK_BYTES
            for i in range(SAMPLE_BLOCKS):
                f.seek(last * i // (SAMPLE_BLOCKS - 1))
                h.update(f.read(SAMPLE_BLOCK_BYTES))
    return {"algo": "blake2b-128", "mode": mode, "digest": h.hexdigest()}


# --- small helpers --------------------------------------------------------------------------

def _check_ids(ids: list[str]) -> None:
    if not ids:
        raise ValueError("cannot cache features of an empty id list")
    if not all(isinstance(i, str) for i in ids):
        raise TypeError("image ids must be strings")
    if len(set(ids)) != len(ids):
        dup = next(i for i, count in Counter(ids).items() if count > 1)
        raise ValueError(f"duplicate image id {dup!r}: each id must appear once")


def _storage(name: str, dtypes: dict[str, torch.dtype]) -> type:
    return _NUMPY_DTYPES[dtypes.get(name, FALLBACK_DTYPE)]


def _canonical(key: dict[str, Any]) -> dict[str, Any]:
    """``key`` as it reads back from JSON (tuples become lists), so it compares with a manifest."""
    if not isinstance(key, dict):
        raise TypeError(f"expected a dict, got {type(key).__name__}")
    return json.loads(dump_json(key))


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
