"""Atomic file writes: a reader never sees a half-written checkpoint, index or cache."""

from __future__ import annotations

import ctypes
import errno
import fcntl
import glob
import json
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from cirlab.utils.crash import crash_point, register

_UMASK = os.umask(0)
os.umask(_UMASK)


_TMP, _OLD = ".tmp", ".old"  # suffixes of the work files and folders beside a written path
FILE_WRITTEN = register("atomic_path:written", "utils/io.py atomic_path: the new file written, not yet renamed over the old")


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it over ``path`` only on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_dead_work(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=_TMP, dir=path.parent)
    os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600; outputs are meant to be shared
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb") as f:
            os.fsync(f.fileno())
        crash_point(FILE_WRITTEN, str(path))
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux ``renameat2(RENAME_EXCHANGE)``); False where the
    system or the file system cannot, so that the caller falls back to two renames."""
    fn = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if fn is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _siblings(path: Path, suffix: str) -> list[tuple[int, Path]]:
    """(pid, folder) of the work folders ``.<name>.<pid>.<random><suffix>`` next to ``path``."""
    name = re.compile(rf"\.{re.escape(path.name)}\.(\d+)\.[a-z0-9_]+{re.escape(suffix)}")
    return [(int(m.group(1)), p) for p in path.parent.glob(f".{glob.escape(path.name)}.*{suffix}")
            if (m := name.fullmatch(p.name))]


def recover_dir(path: str | os.PathLike) -> Path:
    """Undo what a crash inside :func:`atomic_dir` left: where ``path`` is missing (a writer died
    between the two renames of the fallback swap), put back the old copy; remove work folders of
    writers that are no longer running. Loaders call it, so a crash never costs the old folder."""
    path = Path(path)
    if not path.parent.is_dir():
        return path
    if not path.exists():
        olds = sorted((p for _, p in _siblings(path, _OLD) if (p / path.name).exists()),
                      key=lambda p: (p / path.name).stat().st_mtime, reverse=True)
        if olds:
            os.replace(olds[0] / path.name, path)
    _remove_dead_work(path)
    return path


def _remove_dead_work(path: Path) -> None:
    """Remove the temporary files and folders that writers of ``path`` which died left beside it."""
    for pid, work in _siblings(path, _TMP) + _siblings(path, _OLD):
        if not _alive(pid):
            shutil.rmtree(work, ignore_errors=True) if work.is_dir() else work.unlink(missing_ok=True)


def _fsync_tree(folder: Path) -> None:
    for p in folder.rglob("*"):
        if p.is_file() and not p.is_symlink():
            with open(p, "rb") as f:
                os.fsync(f.fileno())


def _workdir(path: Path, suffix: str) -> Path:
    work = Path(tempfile.mkdtemp(prefix=f".{path.name}.{os.getpid()}.", suffix=suffix, dir=path.parent))
    os.chmod(work, 0o777 & ~_UMASK)  # mkdtemp makes 0700; outputs are meant to be shared
    return work


SWAP_FILLED = register("atomic_dir:filled", "utils/io.py atomic_dir: the new folder written, not yet swapped in")
SWAP_EXCHANGED = register("atomic_dir:exchanged", "utils/io.py atomic_dir: new and old swapped, the old not yet removed")
SWAP_MOVED_OLD = register("atomic_dir:moved-old", "utils/io.py atomic_dir, two-rename fallback: the old folder "
                          "moved aside, the new one not yet in place")


@contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder next to ``path``; on success it replaces ``path`` in one step
    (an exchange rename), so that a reader, or a crash at any instant, sees the whole old folder
    or the whole new one. Where the file system cannot exchange, two renames with the old copy
    kept aside, which :func:`recover_dir` puts back if the writer dies between them."""
    path = recover_dir(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _workdir(path, _TMP)
    try:
        yield tmp
        _fsync_tree(tmp)
        crash_point(SWAP_FILLED, str(path))
        if path.exists() and _exchange(tmp, path):
            crash_point(SWAP_EXCHANGED, str(path))  # tmp now holds the old folder
        else:
            old = None
            if path.exists():
                old = _workdir(path, _OLD)
                os.replace(path, old / path.name)
                crash_point(SWAP_MOVED_OLD, str(path))
            os.replace(tmp, path)
            if old is not None:
                shutil.rmtree(old)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


@contextmanager
def exclusive(path: str | os.PathLike, what: str) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``.<name>.lock`` next to ``path`` for the block: one writer of
    a folder at a time (a second is refused with FileExistsError naming the holder's pid). The
    lock file lives beside the folder because :func:`atomic_dir` replaces the folder itself; the
    kernel drops the lock when its process dies, so a crash leaves no stale lock."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = path.parent / f".{path.name}.lock"
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            raise FileExistsError(f"{what} {path} is being written by another process (pid {holder}, which "
                                  f"holds {lock}); wait for it to finish") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def dump_json(obj: Any, *, indent: int | None = None) -> str:
    """Deterministic JSON (sorted keys) so that identical content gives identical bytes."""
    return json.dumps(obj, indent=indent, sort_keys=True, ensure_ascii=False)


def atomic_write_json(path: str | os.PathLike, obj: Any, *, indent: int | None = None) -> None:
    atomic_write_text(path, dump_json(obj, indent=indent) + "\n")


class _DuplicateKey(ValueError):
    pass


def _unique_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj: dict[str, Any] = {}
    for key, value in pairs:
        if key in obj:
            raise _DuplicateKey(key)
        obj[key] = value
    return obj


def read_json(path: str | os.PathLike, what: str = "file", *, unique_keys: bool = False) -> Any:
    """Read JSON with an error that names the file (and what it was supposed to be).

    ``unique_keys=True`` rejects an object that repeats a key, which ``json`` would resolve
    silently by keeping the last value (for a predictions file, a query ranked twice).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"), object_pairs_hook=_unique_pairs if unique_keys else None)
    except json.JSONDecodeError as e:
        raise ValueError(f"{what} {path} is not valid JSON: {e}") from None
    except _DuplicateKey as e:
        raise ValueError(f"{what} {path} holds the key {e.args[0]!r} more than once") from None
