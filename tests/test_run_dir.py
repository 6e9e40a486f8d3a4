"""The run directory's lock: one process at a time writes a run; a dead one's lock never blocks."""

from __future__ import annotations

import os
import select
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from cirlab.config import ExperimentConfig
from cirlab.training import RunDir, Trainer

TIMEOUT = 120  # seconds; a child imports torch on a busy machine


@pytest.fixture(autouse=True)
def cpu_only(monkeypatch):
    monkeypatch.setenv("CIRLAB_DEVICE", "cpu")  # children inherit it


class Slow(nn.Module):
    """A linear classifier whose steps take a while, so that two trainings overlap."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Linear(4, 2)

    def training_step(self, batch):
        time.sleep(0.05)
        x, y = batch
        return F.cross_entropy(self.net(x), y)


def make_cfg(out: Path) -> ExperimentConfig:
    trainer = {"epochs": 2, "batch_size": 4, "log_every_steps": 1, "output_dir": str(out), "precision": "fp32"}
    return ExperimentConfig.model_validate({"name": "lock", "seed": 0, "trainer": trainer})


def data() -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(40, 4, generator=g), torch.randint(0, 2, (40,), generator=g))


def _child(run_path: str, action: str) -> None:
    """Entry point of the child processes: ``hold`` creates the run and keeps it until its stdin
    closes; ``train`` waits for a ``go`` file next to the run, then creates and trains it;
    ``resume`` opens it for writing."""
    run_path = Path(run_path)
    cfg = make_cfg(run_path.parent)
    if action == "hold":
        RunDir.create(cfg, run_path)
        print("locked", flush=True)
        sys.stdin.read()
    elif action == "train":
        print("ready", flush=True)
        while not (run_path.parent / "go").exists():
            time.sleep(0.01)
        Trainer(Slow(), data(), cfg, RunDir.create(cfg, run_path)).fit()
    else:
        RunDir.open(run_path, lock=True)


def _start(run_path: Path, action: str) -> subprocess.Popen:
    code = (
        f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import test_run_dir; "
        f"test_run_dir._child({str(run_path)!r}, {action!r})"
    )
    return subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _wait_for_line(child: subprocess.Popen, expected: str) -> None:
    ready, _, _ = select.select([child.stdout], [], [], TIMEOUT)
    line = child.stdout.readline().strip() if ready else "(timed out)"
    if line != expected:
        child.kill()
        pytest.fail(f"child said {line!r} instead of {expected!r}: {child.communicate(timeout=TIMEOUT)[1]}")


def test_a_run_held_by_a_live_process_is_refused_and_a_dead_ones_lock_does_not_block(tmp_path):
    path = tmp_path / "run"
    holder = _start(path, "hold")
    try:
        _wait_for_line(holder, "locked")
        in_use = rf"run directory {path} is in use by another process \(pid {holder.pid},"
        cfg = make_cfg(tmp_path)
        with pytest.raises(FileExistsError, match=in_use):
            RunDir.create(cfg, path)
        with pytest.raises(FileExistsError, match=in_use):
            RunDir.open(path, lock=True)
        with pytest.raises(FileExistsError, match=in_use):  # a Trainer locks the run it writes, however opened
            Trainer(Slow(), data(), cfg, RunDir.open(path), resume=True)
        assert RunDir.open(path).load_config() == cfg  # inspecting a running run is fine
    finally:
        holder.kill()
        holder.communicate(timeout=TIMEOUT)
    assert holder.returncode == -signal.SIGKILL
    assert (path / ".lock").read_text().strip() == str(holder.pid)  # stale: its process is dead
    start = time.monotonic()
    run = RunDir.open(path, lock=True)
    assert time.monotonic() - start < 1
    assert (path / ".lock").read_text().strip() == str(os.getpid())
    run.unlock()


def test_a_process_may_reopen_its_own_run_and_unlock_hands_it_over(tmp_path):
    cfg = make_cfg(tmp_path)
    run = RunDir.create(cfg, tmp_path / "run")
    assert RunDir.open(run.path, lock=True) == run  # this process holds it already
    refused = _start(run.path, "resume")
    _, err = refused.communicate(timeout=TIMEOUT)
    assert refused.returncode == 1 and f"FileExistsError: run directory {run.path} is in use" in err
    run.unlock()
    allowed = _start(run.path, "resume")
    _, err = allowed.communicate(timeout=TIMEOUT)
    assert allowed.returncode == 0, err


def test_two_trainings_started_together_into_one_run_dir_one_runs_the_other_is_refused(tmp_path):
    path = tmp_path / "run"
    children = [_start(path, "train") for _ in range(2)]
    try:
        for child in children:
            _wait_for_line(child, "ready")
        (tmp_path / "go").touch()
        results = [child.communicate(timeout=TIMEOUT) for child in children]
    finally:
        for child in children:
            child.kill()
    codes = sorted(child.returncode for child in children)
    errors = [err for child, (_, err) in zip(children, results) if child.returncode != 0]
    assert codes == [0, 1], errors
    # refused while the other trains (in use), or after it finished (already holds a run)
    assert f"FileExistsError: run directory {path} is in use" in errors[0] or \
        f"FileExistsError: run directory already holds a run: {path}" in errors[0], errors[0]
    steps = [r["step"] for r in RunDir.open(path).read_metrics() if r["event"] == "train"]
    assert steps == list(range(1, 21))  # one training's events, not two interleaved


def test_a_run_folder_deleted_and_made_anew_in_the_same_process_is_locked_again(tmp_path):
    cfg = make_cfg(tmp_path)
    run = RunDir.create(cfg, tmp_path / "run")
    shutil.rmtree(run.path)  # e.g. the demo starting a half-done stage again
    assert RunDir.create(cfg, run.path) == run
    refused = _start(run.path, "resume")
    _, err = refused.communicate(timeout=TIMEOUT)
    assert refused.returncode == 1 and f"FileExistsError: run directory {run.path} is in use" in err
    run.unlock()
