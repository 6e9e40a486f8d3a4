"""The training engine: exact resumption, accumulation, schedules, run directory, checkpoints."""

from __future__ import annotations

import json
import math
import os
import random
import re
import signal
import subprocess
import sys
import types
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from cirlab.config import ExperimentConfig
from cirlab.training import RunDir, Trainer, engine, load_checkpoint, load_model_state, save_checkpoint
from cirlab.training.engine import cpu_has_native_bf16
from cirlab.training.schedule import cosine_epoch_lr, cosine_step_lr, lr_at
from cirlab.utils.seed import preserve_rng, rng_state, set_rng_state

D_IN, N_CLASSES = 8, 3


@pytest.fixture(autouse=True)
def cpu_only(monkeypatch):
    """Exactness is checked in fp32 on the CPU; the CUDA test below opts back in."""
    monkeypatch.setenv("CIRLAB_DEVICE", "cpu")
    monkeypatch.delenv("CIRLAB_PRECISION", raising=False)
    monkeypatch.delenv("CIRLAB_TENSORBOARD", raising=False)


class TinyClassifier(nn.Module):
    """An MLP with dropout; ``kill_after`` SIGKILLs the process at that training_step call."""

    def __init__(self, dropout: float = 0.3, hidden: int = 16) -> None:
        super().__init__()
        if hidden:
            layers = [nn.Linear(D_IN, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, N_CLASSES)]
            self.net = nn.Sequential(*layers)
        else:
            self.net = nn.Linear(D_IN, N_CLASSES)
        self.calls, self.kill_after, self.started = 0, None, []

    def on_epoch_start(self, epoch: int) -> None:
        self.started.append(epoch)
        torch.rand(1)  # a hook may draw random numbers; resumption must replay them in order

    def training_step(self, batch):
        self.calls += 1
        if self.kill_after is not None and self.calls > self.kill_after:
            os.kill(os.getpid(), signal.SIGKILL)
        x, y = batch
        logits = self.net(x)
        return {"loss": F.cross_entropy(logits, y), "acc": (logits.argmax(-1) == y).float().mean()}


def separable(n: int = 96, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Labels from one fixed linear rule; ``seed`` draws the inputs (1 gives a held-out set)."""
    w = torch.randn(D_IN, N_CLASSES, generator=torch.Generator().manual_seed(0))
    x = torch.randn(n, D_IN, generator=torch.Generator().manual_seed(seed + 1))
    return x, (x @ w).argmax(-1)


class NoisyData(Dataset):
    """Per-sample randomness from python's and numpy's global RNGs (like caption sampling or
    augmentation), so resumption must restore those streams too."""

    def __init__(self) -> None:
        self.x, self.y = separable()

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        noise = torch.from_numpy(np.random.randn(D_IN).astype(np.float32)) * 0.1
        return self.x[i] * (0.9 + 0.2 * random.random()) + noise, self.y[i]


def make_cfg(tmp_path: Path, **trainer) -> ExperimentConfig:
    base = {
        "epochs": 3,
        "batch_size": 8,
        "grad_accum": 2,  # 96 samples -> 6 optimiser steps per epoch
        "optimizer": {"name": "adamw", "lr": 1e-2, "weight_decay": 0.05},
        "schedule": {"name": "cosine_epoch", "min_lr": 1e-3},
        "log_every_steps": 1,
        "output_dir": str(tmp_path),
        "precision": "fp32",  # also on a CPU with native bf16, where auto would pick bf16
    }
    return ExperimentConfig.model_validate({"name": "tiny", "seed": 5, "trainer": {**base, **trainer}})


def holdout_accuracy(model: nn.Module) -> dict[str, float]:
    torch.rand(3)  # evaluation may draw random numbers; the training stream must not notice
    x, y = separable(64, seed=1)
    pred = model.net(x.to(next(model.parameters()).device)).argmax(-1).cpu()
    return {"acc": (pred == y).float().mean().item()}


def train(cfg, run, *, data=None, resume=False, evaluate=holdout_accuracy, init_seed=123, **model_kw):
    torch.manual_seed(init_seed)
    model = TinyClassifier(**model_kw)
    Trainer(model, data if data is not None else NoisyData(), cfg, run, resume=resume, evaluate=evaluate).fit()
    return model


def assert_same_weights(a: dict, b: dict, atol: float = 1e-6) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=0, msg=k)


def train_steps(run: RunDir) -> list[int]:
    return [r["step"] for r in run.read_metrics() if r["event"] == "train"]


# ------------------------------------------------------------------------ resumption


@pytest.mark.parametrize(
    "num_workers, stop, position",
    [(0, 9, (1, 3)), (2, 9, (1, 3)), (0, 12, (2, 0))],  # (epoch, step in epoch) at the stop
    ids=["mid-epoch", "mid-epoch-workers", "epoch-boundary"],
)
def test_resume_ends_with_the_weights_of_an_uninterrupted_run(tmp_path, num_workers, stop, position):
    check_resume(tmp_path, make_cfg(tmp_path, num_workers=num_workers), stop, position)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_resume_is_exact_on_cuda_with_bf16_autocast(tmp_path, monkeypatch):
    monkeypatch.delenv("CIRLAB_DEVICE")
    cfg = make_cfg(tmp_path, precision="auto")  # bf16 autocast on CUDA
    resumed = check_resume(tmp_path, cfg, 9, (1, 3))
    assert next(resumed.parameters()).is_cuda


@pytest.mark.skipif(not cpu_has_native_bf16(), reason="needs a CPU with native bf16")
def test_resume_is_exact_on_cpu_with_bf16_autocast(tmp_path):
    check_resume(tmp_path, make_cfg(tmp_path, precision="bf16"), 9, (1, 3))


def test_precision_auto_is_bf16_where_native_and_silent_explicit_bf16_warns_and_the_env_overrides(monkeypatch):
    cpu, cuda, select = torch.device("cpu"), torch.device("cuda"), engine.select_precision
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    for native, auto_cpu in ((False, "fp32"), (True, "bf16")):
        monkeypatch.setattr(engine, "cpu_has_native_bf16", lambda native=native: native)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # auto and fp32 never warn
            assert (select("auto", cpu), select("auto", cuda)) == (auto_cpu, "bf16")
            assert (select("fp32", cpu), select("fp32", cuda), select("bf16", cuda)) == ("fp32", "fp32", "bf16")
    assert select("bf16", cpu) == "bf16"
    monkeypatch.setattr(engine, "cpu_has_native_bf16", lambda: False)
    with pytest.warns(UserWarning, match="trainer.precision bf16: this CPU has no native bf16"):
        assert select("bf16", cpu) == "fp32"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert select("auto", cuda) == "fp32"

    monkeypatch.setenv("CIRLAB_PRECISION", "fp32")  # overrides the config
    assert select("bf16", cuda) == select("auto", cuda) == "fp32"
    monkeypatch.setenv("CIRLAB_PRECISION", "bf16")
    with pytest.warns(UserWarning, match="CIRLAB_PRECISION bf16: this CPU has no native bf16"):
        assert select("fp32", cpu) == "fp32"
    assert select("fp32", cuda) == "bf16"
    monkeypatch.setenv("CIRLAB_PRECISION", "fp16")
    with pytest.raises(ValueError, match="CIRLAB_PRECISION must be one of auto, fp32, bf16, got 'fp16'"):
        select("auto", cpu)


def test_the_precision_used_is_recorded_and_a_resume_in_another_one_warns(tmp_path, monkeypatch):
    cfg = make_cfg(tmp_path, epochs=1, precision="auto", max_steps=2)
    monkeypatch.setattr(engine, "cpu_has_native_bf16", lambda: True)  # auto picks bf16 on this "CPU"
    run = RunDir.create(cfg, tmp_path / "r")
    trainer = Trainer(TinyClassifier(), NoisyData(), cfg, run)
    assert (trainer.precision, trainer.bf16) == ("bf16", True)
    assert json.loads(run.env_path.read_text())["precision"] == "bf16"

    monkeypatch.setenv("CIRLAB_PRECISION", "fp32")  # measure the fp32 path on a bf16 machine
    run = RunDir.create(cfg, tmp_path / "fp32")
    Trainer(TinyClassifier(), NoisyData(), cfg, run).fit()
    assert json.loads(run.env_path.read_text())["precision"] == "fp32"
    monkeypatch.setenv("CIRLAB_PRECISION", "bf16")
    with pytest.warns(UserWarning, match="trained in fp32 so far and resumes in bf16"):
        Trainer(TinyClassifier(), NoisyData(), cfg, RunDir.open(run.path), resume=True)
    assert json.loads(run.env_path.read_text())["precision"] == "bf16"


def check_resume(tmp_path: Path, cfg: ExperimentConfig, stop: int, position: tuple[int, int]) -> nn.Module:
    """Train straight; train to ``stop`` and resume in a new Trainer; compare."""
    straight_run = RunDir.create(cfg, tmp_path / "straight")
    straight = train(cfg, straight_run)

    half = cfg.model_copy(update={"trainer": cfg.trainer.model_copy(update={"max_steps": stop})})
    split_run = RunDir.create(half, tmp_path / "split")
    stopped = train(half, split_run)
    ckpt = load_checkpoint(split_run.latest)
    assert (ckpt["step"], (ckpt["epoch"], ckpt["step_in_epoch"])) == (stop, position)
    with pytest.raises(AssertionError):  # the stop really happened before the end
        assert_same_weights(stopped.state_dict(), straight.state_dict())

    resumed = train(cfg, RunDir.open(split_run.path), resume=True, init_seed=999)
    assert_same_weights(resumed.state_dict(), straight.state_dict())
    assert resumed.started == list(range(position[0], 3))  # the interrupted epoch's hook runs again
    # the logged training curve is the uninterrupted one, step for step
    assert train_steps(split_run) == train_steps(straight_run) == list(range(1, 19))
    losses = [r["loss"] for r in split_run.read_metrics() if r["event"] == "train"]
    assert losses == pytest.approx([r["loss"] for r in straight_run.read_metrics() if r["event"] == "train"], abs=1e-6)
    return resumed


def _subprocess_train(run_path: str, resume: bool, kill_after: int | None) -> None:
    """Entry point of the real-kill test's child processes."""
    cfg = make_cfg(Path(run_path).parent, checkpoint_every_steps=4)
    run = RunDir.open(run_path) if resume else RunDir.create(cfg, run_path)
    torch.manual_seed(123)
    model = TinyClassifier()
    model.kill_after = kill_after
    Trainer(model, NoisyData(), cfg, run, resume=resume, evaluate=holdout_accuracy).fit()


def _run_child(run_path: Path, resume: bool, kill_after: int | None) -> subprocess.CompletedProcess:
    code = (
        f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import test_engine; "
        f"test_engine._subprocess_train({str(run_path)!r}, {resume}, {kill_after})"
    )
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_resume_after_sigkill_matches_an_uninterrupted_run(tmp_path):
    run_path = tmp_path / "killed"
    # checkpoints every 4 steps: the last one before the kill is step 8 (epoch 2, 2 steps in);
    # the kill comes at the 20th micro-batch, i.e. in the middle of step 10
    killed = _run_child(run_path, resume=False, kill_after=19)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    ckpt = load_checkpoint(run_path / "latest.pt")
    assert (ckpt["step"], ckpt["step_in_epoch"]) == (8, 2)
    assert train_steps(RunDir.open(run_path))[-1] == 9  # logged past the checkpoint

    resumed = _run_child(run_path, resume=True, kill_after=None)
    assert resumed.returncode == 0, resumed.stderr

    cfg = make_cfg(tmp_path, checkpoint_every_steps=4)
    straight = train(cfg, RunDir.create(cfg, tmp_path / "straight"))
    assert_same_weights(load_model_state(run_path / "latest.pt"), straight.state_dict())
    assert train_steps(RunDir.open(run_path)) == list(range(1, 19))  # no step logged twice
    assert not list(run_path.glob("*.tmp"))


def test_resume_without_a_checkpoint_starts_afresh_and_reuse_without_resume_is_refused(tmp_path):
    cfg = make_cfg(tmp_path, epochs=1)
    run = RunDir.create(cfg, tmp_path / "r")
    stale = "".join(json.dumps({"event": "train", "step": s, "loss": 9.0}) + "\n" for s in range(1, 30))
    run.metrics_path.write_text(stale)  # a first attempt that died before its first checkpoint
    with pytest.warns(UserWarning, match=r"no checkpoint.*old metrics\.jsonl is now .*metrics\.jsonl\.bak"):
        train(cfg, run, resume=True)
    assert train_steps(run) == list(range(1, 7))  # the new curve only, from step 1
    assert (run.path / "metrics.jsonl.bak").read_text() == stale
    with pytest.raises(FileExistsError, match="latest.pt"):
        train(cfg, RunDir.open(run.path))
    with pytest.raises(FileExistsError, match="already holds a run"):
        RunDir.create(cfg, run.path)


def test_rng_states_round_trip_through_a_checkpoint_file(tmp_path):
    def draw():
        return random.random(), float(np.random.rand()), torch.rand(2).tolist()

    state = rng_state()
    expected = draw()
    save_checkpoint(tmp_path / "rng.pt", {"model": {}, "rng": state})
    draw()
    set_rng_state(load_checkpoint(tmp_path / "rng.pt")["rng"])  # weights_only load
    assert draw() == expected
    set_rng_state(state)
    with preserve_rng():
        draw()
    assert draw() == expected  # evaluation-style draws inside preserve_rng leave no trace


# ------------------------------------------------------------------------ optimisation


def test_loss_goes_down_on_a_separable_problem(tmp_path):
    cfg = make_cfg(tmp_path, epochs=8, grad_accum=1, schedule={"name": "constant"})
    run = RunDir.create(cfg)
    out = Trainer(TinyClassifier(dropout=0.0), TensorDataset(*separable()), cfg, run, evaluate=holdout_accuracy).fit()
    losses = [r["loss"] for r in run.read_metrics() if r["event"] == "train"]
    assert np.mean(losses[-12:]) < 0.3 * np.mean(losses[:12])
    assert out["acc"] > 0.8 and out["step"] == 8 * 12


def test_grad_accumulation_equals_the_bigger_batch(tmp_path):
    weights = []
    for batch_size, accum in [(8, 2), (16, 1)]:
        cfg = make_cfg(tmp_path, batch_size=batch_size, grad_accum=accum, max_steps=3, schedule={"name": "constant"})
        model = train(cfg, RunDir.create(cfg), data=TensorDataset(*separable()), hidden=0)  # no batch-dependent layer
        weights.append(model.state_dict())
    assert_same_weights(*weights)


def test_unscheduled_group_keeps_its_lr_under_cosine_epoch(tmp_path):
    cfg = make_cfg(tmp_path, schedule={"name": "cosine_epoch", "max_epoch": 2, "min_lr": 1e-4})
    torch.manual_seed(0)
    model = TinyClassifier()
    first, last = model.net[0], model.net[3]
    groups = [{"params": first.parameters()}, {"params": last.parameters(), "lr": 0.5, "scheduled": False}]
    trainer = Trainer(model, NoisyData(), cfg, RunDir.create(cfg), param_groups=groups)
    seen: list[tuple[float, ...]] = []
    step = trainer.optimizer.step

    def recording_step(*args, **kwargs):
        seen.append(tuple(g["lr"] for g in trainer.optimizer.param_groups))
        return step(*args, **kwargs)

    trainer.optimizer.step = recording_step
    trainer.fit()
    expected = [cosine_epoch_lr(1e-2, e, 2, 1e-4) for e in range(3) for _ in range(6)]
    assert [s[0] for s in seen] == pytest.approx(expected)
    assert expected[6:12] != pytest.approx(expected[:6])  # the schedule did move group 0
    assert all(s[1] == 0.5 for s in seen)


def test_trainable_parameters_outside_every_group_are_an_error(tmp_path):
    cfg = make_cfg(tmp_path)
    model = TinyClassifier()
    with pytest.raises(ValueError, match=r"net\.3\.weight"):
        Trainer(model, NoisyData(), cfg, RunDir.create(cfg), param_groups=[{"params": model.net[0].parameters()}])


# ------------------------------------------------------------------------ schedules


def test_cosine_epoch_matches_blip_formula_including_the_restart_quirk():
    for epoch in range(20):
        direct = (5e-5 - 1e-6) * 0.5 * (1 + math.cos(math.pi * epoch / 10)) + 1e-6
        assert cosine_epoch_lr(5e-5, epoch, 10, 1e-6) == pytest.approx(direct, rel=1e-12)
    assert cosine_epoch_lr(5e-5, 0, 10) == 5e-5
    assert cosine_epoch_lr(5e-5, 10, 10) == pytest.approx(0.0, abs=1e-20)
    assert cosine_epoch_lr(5e-5, 15, 10) == pytest.approx(2.5e-5)  # climbing back up after max_epoch
    sched = make_cfg(Path("."), schedule={"name": "cosine_epoch"}).trainer.schedule
    # max_epoch defaults to the number of epochs
    assert lr_at(sched, 1.0, epoch=5, step=0, epochs=10, total_steps=100) == pytest.approx(0.5)


def test_cosine_step_and_warmup_match_direct_formulas():
    base, total, warm, low = 1e-3, 110, 10, 1e-5
    sched = make_cfg(Path("."), schedule={"name": "cosine_step", "warmup_steps": warm, "min_lr": low}).trainer.schedule
    for step in range(total):
        if step < warm:
            direct = base * (step + 1) / warm
        else:
            direct = low + (base - low) * 0.5 * (1 + math.cos(math.pi * (step - warm) / (total - warm)))
        assert lr_at(sched, base, epoch=0, step=step, epochs=1, total_steps=total) == pytest.approx(direct, rel=1e-12)
    assert cosine_step_lr(base, total, total, warm, low) == pytest.approx(low)
    constant = make_cfg(Path("."), schedule={"name": "constant", "warmup_steps": 4}).trainer.schedule
    lrs = [lr_at(constant, 1.0, epoch=0, step=s, epochs=1, total_steps=10) for s in range(6)]
    assert lrs == [0.25, 0.5, 0.75, 1, 1, 1]


# ------------------------------------------------------------------------ run directory and checkpoints


def test_stop_at_ends_training_at_the_first_validation_that_reaches_it(tmp_path):
    evals = {}
    for target in (0.0, 2.0):  # reached by the first validation; never reached (accuracy <= 1)
        run = RunDir.create(make_cfg(tmp_path, select_metric="acc", stop_at=target))
        train(make_cfg(tmp_path, select_metric="acc", stop_at=target), run)
        evals[target] = [r["epoch"] for r in run.read_metrics() if r["event"] == "eval"]
    assert evals == {0.0: [1], 2.0: [1, 2, 3]}  # epochs: a budget
    with pytest.raises(ValueError, match="stop_at"):
        make_cfg(tmp_path, stop_at=0.5)  # compares select_metric, which is unset


def test_run_directory_records_config_environment_metrics_and_best(tmp_path):
    cfg = make_cfg(tmp_path, select_metric="acc")
    run = RunDir.create(cfg)
    assert run.path.parent == tmp_path and run.path.name.startswith("tiny-")
    model = train(cfg, run)

    assert run.load_config() == cfg
    assert yaml.safe_load(run.config_path.read_text())["trainer"]["grad_accum"] == 2
    env = json.loads(run.env_path.read_text())
    assert env["seed"] == 5 and env["python"].count(".") == 2 and env["device"] == "cpu"
    assert env["precision"] == "fp32"
    assert env["packages"]["torch"].split("+")[0] == torch.__version__.split("+")[0]
    assert all(env["packages"][p] for p in ("cirlab", "numpy", "transformers"))

    lines = run.metrics_path.read_text().splitlines()
    records = [json.loads(line) for line in lines]
    train_rec = [r for r in records if r["event"] == "train"]
    evals = [r for r in records if r["event"] == "eval"]
    assert all({"step", "epoch", "lr", "loss", "acc"} <= r.keys() for r in train_rec)
    assert [r["epoch"] for r in evals] == [1, 2, 3] and [r["step"] for r in evals] == [6, 12, 18]
    assert [r["epoch"] for r in train_rec[:6]] == pytest.approx([1 / 6, 2 / 6, 3 / 6, 4 / 6, 5 / 6, 1])

    best = load_checkpoint(run.best)
    best_value = max(r["acc"] for r in evals)
    assert best["best_metric"] == best_value
    assert best["step"] == next(r["step"] for r in evals if r["acc"] == best_value)
    assert_same_weights(load_model_state(run.latest), model.state_dict(), atol=0)
    fresh = TinyClassifier()
    fresh.load_state_dict(load_model_state(run.best))  # weights load without any training code


def test_checkpoint_writes_are_atomic_and_bad_files_are_named(tmp_path, monkeypatch):
    cfg = make_cfg(tmp_path, epochs=1)
    run = RunDir.create(cfg)
    train(cfg, run)
    assert not [p for p in run.path.iterdir() if p.name.endswith(".tmp")]
    good = run.latest.read_bytes()

    def crash(obj, f, *a, **k):  # dies half-way through writing, as torch does on a full disk
        Path(f).write_bytes(good[: len(good) // 2])
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 27951552 vs 27951440")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match=rf"could not write checkpoint {re.escape(str(run.latest))} \(\d+ MiB free.*unexpected pos"):
        save_checkpoint(run.latest, {"model": {}})
    monkeypatch.undo()
    assert run.latest.read_bytes() == good  # the previous checkpoint is intact
    assert not [p for p in run.path.iterdir() if p.name.endswith(".tmp")]

    run.latest.write_bytes(good[: len(good) // 2])  # truncated by something else
    with pytest.raises(ValueError, match=str(run.latest)):
        train(cfg, RunDir.open(run.path), resume=True)
    with pytest.raises(ValueError, match="corrupted or truncated"):
        load_model_state(run.latest)


# ------------------------------------------------------------------------ reporting


class NanAfter(TinyClassifier):
    """Its loss turns NaN after ``calls`` training_step calls."""

    def __init__(self, calls: int) -> None:
        super().__init__()
        self.nan_after = calls

    def training_step(self, batch):
        out = super().training_step(batch)
        return {**out, "loss": out["loss"] * float("nan")} if self.calls > self.nan_after else out


@pytest.mark.parametrize("every, calls, saved", [(None, 3, None), (4, 11, 4)], ids=["before-any", "after-step-4"])
def test_a_nan_loss_names_the_last_checkpoint_saved_or_says_there_is_none(tmp_path, every, calls, saved):
    cfg = make_cfg(tmp_path, checkpoint_every_steps=every)  # 2 micro-batches a step
    run = RunDir.create(cfg, tmp_path / "r")
    with pytest.raises(FloatingPointError, match=rf"training loss is nan at step {calls // 2} ") as e:
        Trainer(NanAfter(calls), NoisyData(), cfg, run).fit()
    if saved is None:
        assert f"no checkpoint was saved in {run.path} yet" in str(e.value) and not run.latest.exists()
    else:
        named = re.search(r"the last good state is (\S+) \(step (\d+)\)", str(e.value))
        assert named and Path(named[1]) == run.latest and int(named[2]) == saved
        assert load_checkpoint(run.latest)["step"] == saved


def test_every_evaluation_prints_one_line_with_the_select_metric_first(tmp_path, capsys):
    def evaluate(model):
        return {"dress/R@10": 1.0, "R@1": 15.000000596046448, **holdout_accuracy(model)}

    cfg = make_cfg(tmp_path, select_metric="acc")
    run = RunDir.create(cfg)
    train(cfg, run, evaluate=evaluate)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("eval ")]
    evals = [r for r in run.read_metrics() if r["event"] == "eval"]
    assert len(lines) == len(evals) == 3
    best = -1.0
    for epoch, (line, r) in enumerate(zip(lines, evals), start=1):
        mark = "  (best so far)" if r["acc"] > best else ""
        best = max(best, r["acc"])
        # the select metric first, then the top-level ones; dress/R@10 is a breakdown
        assert line == f"eval epoch {epoch} step {6 * epoch}: acc {r['acc']:.2f}  R@1 15.00{mark}"


def test_tensorboard_events_are_written_only_on_request(tmp_path, monkeypatch):
    cfg = make_cfg(tmp_path, epochs=1, select_metric="acc")
    run = RunDir.create(cfg, tmp_path / "off")
    train(cfg, run)
    assert not run.tensorboard_dir.exists()

    monkeypatch.setenv("CIRLAB_TENSORBOARD", "1")
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # tensorboard not installed
    with pytest.raises(ModuleNotFoundError, match="CIRLAB_TENSORBOARD=1 needs the tensorboard package"):
        train(cfg, RunDir.create(cfg, tmp_path / "missing"))

    class FakeWriter:
        made: list = []

        def __init__(self, logdir, purge_step=None):
            self.logdir, self.purge_step, self.scalars, self.flushed = logdir, purge_step, [], False
            self.made.append(self)

        def add_scalar(self, tag, value, step):
            self.scalars.append((tag, value, step))

        def flush(self):
            self.flushed = True

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=FakeWriter))
    run = RunDir.create(cfg, tmp_path / "on")
    train(cfg, run)
    (writer,) = FakeWriter.made
    assert (writer.logdir, writer.purge_step, writer.flushed) == (str(run.tensorboard_dir), 1, True)
    logged = [(f"{r['event']}/{k}", v, r["step"]) for r in run.read_metrics() for k, v in r.items()
              if k not in ("event", "step")]
    assert sorted(writer.scalars) == sorted(logged)  # metrics.jsonl sorts its keys
    assert {"train/loss", "train/lr", "eval/acc"} <= {tag for tag, _, _ in logged}


class HoledData(Dataset):
    """Items 3 and 40 stand for unreadable images: None, their ids in a ``missing`` tracker, as
    the image datasets do (in a worker, the tracker is the worker's copy)."""

    def __init__(self) -> None:
        from cirlab.data.images import MissingImages

        self.x, self.y = separable()
        self.missing = MissingImages()

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        if i in (3, 40):
            self.missing.add(f"img-{i}")
            return None
        return self.x[i], self.y[i]


@pytest.mark.parametrize("num_workers", [0, 1])
def test_training_reports_the_images_it_skipped(tmp_path, num_workers, caplog):
    from cirlab.data.images import collate_skip_none

    cfg = make_cfg(tmp_path, epochs=1, num_workers=num_workers)
    torch.manual_seed(0)
    trainer = Trainer(TinyClassifier(), HoledData(), cfg, RunDir.create(cfg, tmp_path / "run"),
                      collate_fn=collate_skip_none)
    with caplog.at_level("WARNING", logger="cirlab.data"):
        trainer.fit()
    assert trainer.skipped.ids == {"img-3", "img-40"}
    assert "2 training images missing or unreadable" in caplog.text and "img-3" in caplog.text


def test_steps_whose_images_are_all_unreadable_are_skipped_not_fatal(tmp_path):
    from cirlab.data.images import collate_skip_none

    class Unreadable(HoledData):
        def __getitem__(self, i):
            self.missing.add(f"img-{i}")
            return None

    cfg = make_cfg(tmp_path, epochs=1, grad_clip=1.0)
    trainer = Trainer(TinyClassifier(), Unreadable(), cfg, RunDir.create(cfg, tmp_path / "run"),
                      collate_fn=collate_skip_none)
    trainer.fit()
    assert trainer.step == trainer.steps_per_epoch and len(trainer.skipped) == 96


def test_eval_at_start_keeps_the_untrained_model_when_training_makes_it_worse(tmp_path):
    cfg = make_cfg(tmp_path, select_metric="acc", eval_at_start=True)
    run = RunDir.create(cfg)
    calls = []

    def worse_each_time(model):
        calls.append(1)
        return {"acc": 100.0 - len(calls)}

    train(cfg, run, evaluate=worse_each_time)
    evals = [json.loads(line) for line in run.metrics_path.read_text().splitlines()]
    evals = [r for r in evals if r["event"] == "eval"]
    assert [r["step"] for r in evals] == [0, 6, 12, 18]
    best = load_checkpoint(run.best)
    assert best["step"] == 0 and best["best_metric"] == 99.0


def test_eval_every_steps_validates_inside_epochs_and_keeps_the_best_of_those_steps(tmp_path):
    cfg = make_cfg(tmp_path, select_metric="acc", eval_every_steps=4)  # 6 steps an epoch, 3 epochs
    run = RunDir.create(cfg)
    scores = iter([1.0, 5.0, 4.0, 3.0, 2.5])  # peaks at the second evaluation (step 8, mid-epoch)
    model = train(cfg, run, evaluate=lambda model: {"acc": next(scores)})
    evals = [r for r in run.read_metrics() if r["event"] == "eval"]
    assert [r["step"] for r in evals] == [4, 8, 12, 16, 18]  # and at the end of training
    assert [r["epoch"] for r in evals] == pytest.approx([4 / 6, 1 + 2 / 6, 2, 2 + 4 / 6, 3])
    best = load_checkpoint(run.best)
    assert best["step"] == 8 and best["best_metric"] == 5.0
    assert_same_weights(load_model_state(run.latest), model.state_dict(), atol=0)
