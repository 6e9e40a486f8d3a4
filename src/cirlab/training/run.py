"""The run directory: everything needed to understand, reproduce and resume one training run.

::

    runs/<name>-<YYYYmmdd-HHMMSS>/
        config.yaml      the full validated ExperimentConfig
        env.json         seed, package versions, git commit, device, world size, command line,
                         the precision training ran in
        metrics.jsonl    one JSON object per event ("train" every log_every_steps, "eval")
        latest.pt        full training state, rewritten atomically
        best.pt          the same, at the best value of trainer.select_metric
        .lock            flock'ed by the process writing the run (see RunDir.lock)
        tb/              TensorBoard event files, with CIRLAB_TENSORBOARD=1

Only the main rank writes; under ``torchrun`` the other ranks receive the path from rank 0.
"""

from __future__ import annotations

import fcntl
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
import yaml

from cirlab.config import ExperimentConfig, validate
from cirlab.training import distributed
from cirlab.utils.io import atomic_write_json, atomic_write_text, dump_json, read_json

_LOCKS: dict[Path, int] = {}  # run folder -> descriptor of its flock'ed .lock, for this process


@dataclass(frozen=True)
class RunDir:
    path: Path

    @property
    def config_path(self) -> Path:
        return self.path / "config.yaml"

    @property
    def env_path(self) -> Path:
        return self.path / "env.json"

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def latest(self) -> Path:
        return self.path / "latest.pt"

    @property
    def best(self) -> Path:
        return self.path / "best.pt"

    @property
    def tensorboard_dir(self) -> Path:
        return self.path / "tb"

    @classmethod
    def create(cls, cfg: ExperimentConfig, out: str | Path | None = None) -> RunDir:
        """A new run directory: ``out`` if given (it must not hold a run yet), otherwise
        ``<trainer.output_dir>/<name>-<YYYYmmdd-HHMMSS>`` (suffixed ``-1``, ``-2``... on a clash)."""
        distributed.init_distributed()
        path: Path | None = None
        if distributed.is_main():
            path = _make_dir(cfg, out)  # locked
            atomic_write_text(path / "config.yaml", yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
            atomic_write_json(path / "env.json", environment(cfg.seed), indent=2)
        if distributed.is_distributed():
            box = [str(path) if path else None]
            torch.distributed.broadcast_object_list(box, src=0)
            path = Path(box[0])
        return cls(path)

    @classmethod
    def open(cls, path: str | Path, *, lock: bool = False) -> RunDir:
        """An existing run directory: ``lock=True`` to write into it (``--resume``; see :meth:`lock`),
        ``False`` to inspect it, also while it trains."""
        run = cls(Path(path))
        if not run.config_path.is_file():
            raise FileNotFoundError(f"not a run directory (no config.yaml): {run.path}")
        return run.lock() if lock else run

    def lock(self) -> RunDir:
        """Hold an exclusive ``flock`` on ``.lock`` until this process exits or calls :meth:`unlock`,
        so that a second process creating, resuming or training into this folder meanwhile gets a
        FileExistsError instead of interleaving its writes. The kernel drops the lock when its
        process dies, so a crash or a SIGKILL leaves no stale lock. Main rank only (the others
        never write); a no-op when this process holds the lock already."""
        if distributed.is_main():
            _lock(self.path)
        return self

    def unlock(self) -> None:
        """Let other processes write into the run (a long-lived process done with it)."""
        fd = _LOCKS.pop(self.path.resolve(), None)
        if fd is not None:
            os.close(fd)

    def load_config(self) -> ExperimentConfig:
        data = yaml.safe_load(self.config_path.read_text(encoding="utf-8"))
        return validate(ExperimentConfig, data, str(self.config_path))

    def log(self, record: dict[str, Any]) -> None:
        """Append one event to metrics.jsonl (main rank only)."""
        if not distributed.is_main():
            return
        with open(self.metrics_path, "a", encoding="utf-8") as f:
            f.write(dump_json(record) + "\n")

    def read_metrics(self) -> list[dict[str, Any]]:
        """All complete events; a line cut short by a crash is skipped."""
        if not self.metrics_path.is_file():
            return []
        records = []
        for line in self.metrics_path.read_text(encoding="utf-8").splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return records

    def discard_metrics(self) -> Path | None:
        """Move metrics.jsonl aside to metrics.jsonl.bak (replacing an older backup) for a run that
        restarts from scratch, whose new curve must not continue the stale one; returns the
        backup, or None when there was nothing to move (and on the other ranks)."""
        if not distributed.is_main() or not self.metrics_path.is_file():
            return None
        backup = self.metrics_path.with_name(self.metrics_path.name + ".bak")
        os.replace(self.metrics_path, backup)
        return backup

    def update_env(self, **fields: Any) -> dict[str, Any]:
        """Add ``fields`` to env.json and return what it held before (main rank only; {} elsewhere)."""
        if not distributed.is_main():
            return {}
        old = read_json(self.env_path, "run environment") if self.env_path.is_file() else {}
        atomic_write_json(self.env_path, {**old, **fields}, indent=2)
        return old

    def truncate_metrics(self, step: int) -> None:
        """Forget events logged after ``step``: on resume they are logged again."""
        if not distributed.is_main() or not self.metrics_path.is_file():
            return
        kept = [r for r in self.read_metrics() if r.get("step", 0) <= step]
        atomic_write_text(self.metrics_path, "".join(dump_json(r) + "\n" for r in kept))


def _make_dir(cfg: ExperimentConfig, out: str | Path | None) -> Path:
    """The new run folder, locked by this process."""
    if out is not None:
        path = Path(out)
        path.mkdir(parents=True, exist_ok=True)
        new = _lock(path)  # before the check: of two processes starting together, one sees the other's run
        if (path / "config.yaml").exists():
            if new:
                RunDir(path).unlock()
            raise FileExistsError(f"run directory already holds a run: {path} (resume it, or pick another)")
        return path
    base = Path(cfg.trainer.output_dir) / f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    base.parent.mkdir(parents=True, exist_ok=True)
    for i in range(1000):
        path = base if i == 0 else base.with_name(f"{base.name}-{i}")
        try:
            path.mkdir()
        except FileExistsError:
            continue
        _lock(path)
        return path
    raise FileExistsError(f"could not find a free run directory name next to {base}")


def _lock(path: Path) -> bool:
    """``flock`` ``path/.lock`` for this process; False if it held the lock already."""
    key = path.resolve()
    if key in _LOCKS:
        try:
            if os.path.samestat(os.fstat(_LOCKS[key]), os.stat(path / ".lock")):
                return False
        except FileNotFoundError:
            pass
        os.close(_LOCKS.pop(key))  # the folder was deleted and made anew: lock the new one
    fd = os.open(path / ".lock", os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise FileExistsError(
            f"run directory {path} is in use by another process (pid {holder}, which holds {path / '.lock'}); "
            "wait for it to end, or pick another --run-dir"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    _LOCKS[key] = fd
    return True


def environment(seed: int) -> dict[str, Any]:
    """What is needed to reproduce a run besides its config."""

    def version(pkg: str) -> str | None:
        try:
            return metadata.version(pkg)
        except metadata.PackageNotFoundError:
            return None

    cuda = distributed.use_cuda()
    return {
        "seed": seed,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": {p: version(p) for p in ("cirlab", "torch", "transformers", "numpy")},
        "git_commit": _git_commit(),
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "cuda": torch.version.cuda if cuda else None,
        "world_size": distributed.world_size(),
        "argv": sys.argv,
    }


def _git_commit() -> str | None:
    """The commit of the source tree cirlab runs from, with ``+dirty`` for local changes."""
    src = Path(__file__).resolve().parent

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "--no-optional-locks", *args], cwd=src, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        return commit + ("+dirty" if git("status", "--porcelain", "--untracked-files=no") else "")
    except (OSError, subprocess.SubprocessError):
        return None
