"""The training engine: one small loop that every method (a module with ``training_step``) runs on.

A method is an ``nn.Module`` with

* ``training_step(batch) -> Tensor | dict[str, Tensor]``: the loss, or a dict holding
  ``"loss"`` and other scalars to log. The engine always reaches it through a thin module
  whose ``forward`` is ``training_step``; under DDP that module is what gets wrapped, so
  DDP's forward (which prepares the gradient all-reduce) runs around every call and the
  method keeps its own ``forward`` for inference.
* optionally ``on_epoch_start(epoch)``: must depend on the epoch only, since it is called
  again when a run resumes in the middle of that epoch.

Exact resumption: the data order is a function of (seed, epoch) (:class:`EpochBatchSampler`),
the learning rate a function of (epoch, step) (:mod:`cirlab.training.schedule`), and the
checkpoint holds the model, the optimiser, the position (epoch, step, step in epoch) and
every RNG state of every rank. On resume the batches already consumed in the interrupted
epoch are skipped without being loaded. Evaluation runs with the RNG state saved and
restored, so evaluating (or not) never changes the training trajectory.

Environment variables: ``CIRLAB_PRECISION`` (fp32|bf16|auto) overrides ``trainer.precision``
(:func:`select_precision`); ``CIRLAB_TENSORBOARD=1`` also writes TensorBoard event files into
``<run>/tb``.
"""

from __future__ import annotations

import os
import time
import warnings
from contextlib import nullcontext
from typing import Any, Callable, Mapping

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, get_worker_info
from tqdm import tqdm

from cirlab.config import ExperimentConfig, OptimConfig
from cirlab.data.images import MissingImages
from cirlab.data.torch_data import sample_groups
from cirlab.training import distributed
from cirlab.training.checkpoint import load_checkpoint, save_checkpoint
from cirlab.training.distributed import EpochBatchSampler
from cirlab.training.run import RunDir
from cirlab.training.schedule import apply_schedule
from cirlab.utils.progress import progress
from cirlab.utils.report import format_metrics, main_metric_names
from cirlab.utils.seed import preserve_rng, rng_state, seed_everything, set_rng_state

Evaluate = Callable[[nn.Module], Mapping[str, float]]


class Trainer:
    """Runs ``model.training_step`` over ``train_data`` as ``cfg.trainer`` says, writing to ``run``.

    ``param_groups``: optimiser groups (dicts with ``params`` and optionally ``lr``,
    ``weight_decay`` and ``scheduled=False`` to keep a group out of the schedule); by default
    one group with every parameter that requires grad. ``evaluate`` is called on the main rank
    with the unwrapped model every ``eval_every_epochs`` epochs (or, if set, every
    ``eval_every_steps`` steps, inside epochs too) and at the end; its metrics are
    logged, printed (the headline ones) and ``trainer.select_metric`` (higher is better) picks
    ``best.pt``. The run directory is locked for this process (:meth:`RunDir.lock`).
    """

    def __init__(
        self,
        model: nn.Module,
        train_data: Dataset,
        cfg: ExperimentConfig,
        run: RunDir,
        *,
        collate_fn: Callable | None = None,
        param_groups: list[dict] | None = None,
        evaluate: Evaluate | None = None,
        resume: bool = False,
    ) -> None:
        distributed.init_distributed()
        run.lock()
        t = cfg.trainer
        self.cfg, self.run, self.evaluate_fn, self.collate_fn = cfg, run, evaluate, collate_fn
        self.device = distributed.default_device()
        self.precision = select_precision(t.precision, self.device)
        self.bf16 = self.precision == "bf16"
        self.model = model.to(self.device)
        self.optimizer = build_optimizer(model, param_groups, t.optimizer)

        self.sampler = EpochBatchSampler(
            len(train_data),  # type: ignore[arg-type]
            t.batch_size,
            seed=cfg.seed,
            rank=distributed.rank(),
            world_size=distributed.world_size(),
            multiple_of=t.grad_accum,
            groups=sample_groups(train_data) if t.sampler == "paired_reference" else None,
        )
        if self.sampler.num_batches == 0:
            raise ValueError(
                f"trainer: {len(train_data)} training samples make no optimiser step of "  # type: ignore[arg-type]
                f"batch_size {t.batch_size} x grad_accum {t.grad_accum} x world size {distributed.world_size()}"
            )
        self.steps_per_epoch = self.sampler.num_batches // t.grad_accum
        self.data = _WorkerSeeded(train_data, cfg.seed)

        step_module: nn.Module = _TrainingStep(model)
        if distributed.world_size() > 1:
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            step_module = DistributedDataParallel(step_module, device_ids=device_ids)
        self.step_module = step_module

        self.epoch = self.step = self.step_in_epoch = 0
        self.best_metric: float | None = None
        self._target_reached = False  # trainer.stop_at, decided by the main rank's validation
        self.last_eval: dict[str, float] = {}
        self.last_train: dict[str, float] = {}
        self._eval_step: int | None = None
        self._saved_step: int | None = None
        self._new_best = False
        self._window: dict[str, float] = {}
        self._window_steps = 0
        self._resume_rng: dict | None = None
        self.skipped = MissingImages("training images")  # unreadable ones, reported once per epoch
        loaded = resume and run.latest.exists()
        if loaded:
            self._load(run.latest)
        elif resume:
            backup = run.discard_metrics()
            kept = f"; its old metrics.jsonl is now {backup}" if backup else ""
            warnings.warn(f"--resume: no checkpoint in {run.path} yet, starting from scratch{kept}", stacklevel=2)
        elif run.latest.exists():
            raise FileExistsError(f"{run.latest} exists: resume this run or use a new run directory")
        before = run.update_env(precision=self.precision).get("precision", self.precision)
        if loaded and before != self.precision:
            warnings.warn(
                f"{run.path} trained in {before} so far and resumes in {self.precision}: "
                "the trajectory will differ from an uninterrupted run",
                stacklevel=2,
            )
        # events up to the checkpoint's step stay, as in metrics.jsonl; later ones are logged again
        self.tensorboard = _tensorboard(run, purge_step=self.step + 1)

    # ---------------------------------------------------------------- training loop

    def fit(self) -> dict[str, float]:
        """Train until ``trainer.epochs`` or ``trainer.max_steps`` (or a validation reaches
        ``trainer.stop_at``); returns the final metrics."""
        t = self.cfg.trainer
        if self._resume_rng is None:
            seed_everything(self.cfg.seed + distributed.rank())
        try:
            if t.eval_at_start and self.step == 0 and self.evaluate_fn is not None:
                self._evaluate()
                self._save()
            while self.epoch < t.epochs and not self._budget_spent():
                self._train_epoch()
                if self.step_in_epoch < self.steps_per_epoch:  # stopped by max_steps mid-epoch
                    break
                self.epoch, self.step_in_epoch = self.epoch + 1, 0
                if self.evaluate_fn is not None and self._eval_due():
                    self._evaluate()
                self._save()
            if self.evaluate_fn is not None and self._eval_step != self.step:
                self._evaluate()
            if self._saved_step != self.step or self._new_best:
                self._save()
        finally:  # also when training stops on an error: the curves up to it are on disk
            if self.tensorboard is not None:
                self.tensorboard.flush()
        return {"epoch": self.epoch, "step": self.step, **self.last_train, **self.last_eval}

    def _train_epoch(self) -> None:
        t = self.cfg.trainer
        self._start_epoch()
        self.step_module.train()
        start = self.step_in_epoch * t.grad_accum
        self.sampler.set_epoch(self.epoch, start)
        self.data.epoch = self.epoch
        loader = DataLoader(
            self.data,
            batch_sampler=self.sampler,
            collate_fn=_ReportingCollate(self.collate_fn),
            num_workers=t.num_workers,
            pin_memory=self.device.type == "cuda",
            # The loader draws its workers' base seed from this generator instead of the
            # global RNG, whose stream must not depend on where an epoch was resumed.
            generator=torch.Generator().manual_seed(self.cfg.seed + self.epoch),
        )
        desc = f"epoch {self.epoch + 1}/{t.epochs}"
        bar = progress(loader, desc=desc, total=self.sampler.num_batches, initial=start, unit="batch")
        sums: dict[str, torch.Tensor] = {}
        since = time.perf_counter()
        for i, (batch, skipped) in enumerate(bar, start=start):
            self.skipped.update(skipped)
            boundary = (i + 1) % t.grad_accum == 0
            if batch is not None:  # None: every image of the batch was missing or unreadable
                sync = nullcontext() if boundary or distributed.world_size() == 1 else self.step_module.no_sync()
                with sync:
                    with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
                        loss, logs = _unpack(self._forward(move_to(batch, self.device)))
                    (loss / t.grad_accum).backward()
                for k, v in logs.items():
                    sums[k] = sums.get(k, 0.0) + v.detach().float() / t.grad_accum
            if boundary:
                now = time.perf_counter()  # wall time of the step, data loading included, logged as s_per_step
                sums["s_per_step"], since = torch.tensor(now - since), now
                self._optimizer_step(sums)
                sums = {}
                if self.step % t.log_every_steps == 0:
                    self._log(bar)
                if self._budget_spent():
                    bar.update()  # tqdm counts an item when the next one is asked for
                    break
                inside = self.step_in_epoch < self.steps_per_epoch  # the epoch's end evaluates and saves anyway
                evaluate = inside and t.eval_every_steps is not None and self._eval_due()
                if evaluate and self.evaluate_fn is not None:
                    self._evaluate()
                every = t.checkpoint_every_steps
                if inside and (evaluate or (every and self.step % every == 0)):
                    self._save()
        bar.close()
        tracker = getattr(self.data.data, "missing", None)  # num_workers=0: the main process's copy
        if tracker is not None:
            self.skipped.update(tracker.drain())
        self.skipped.report()

    def _start_epoch(self) -> None:
        """Call the method's epoch hook and put back the RNG state of a resumed run in the
        order the uninterrupted run had them: at an epoch boundary the hook ran after the
        checkpointed state, in the middle of an epoch before it."""
        hook = getattr(self.model, "on_epoch_start", None)
        if self._resume_rng is not None and self.step_in_epoch == 0:
            set_rng_state(self._resume_rng)
            self._resume_rng = None
        if hook is not None:
            hook(self.epoch)
        if self._resume_rng is not None:
            set_rng_state(self._resume_rng)
            self._resume_rng = None

    def _forward(self, batch: Any) -> Any:
        """The training step; a divergence a method detects inside it (FloatingPointError) is
        reported with the step and the last good checkpoint, as a non-finite loss is."""
        try:
            return self.step_module(batch)
        except FloatingPointError as e:
            raise FloatingPointError(f"{e} at step {self.step} (epoch {self.epoch}): the training diverged "
                                     f"(lower the learning rate?); {self._last_good()}") from None

    def _last_good(self) -> str:
        if self._saved_step is None:
            return f"no checkpoint was saved in {self.run.path} yet"
        return f"the last good state is {self.run.latest} (step {self._saved_step})"

    def _optimizer_step(self, sums: dict[str, torch.Tensor]) -> None:
        t = self.cfg.trainer
        apply_schedule(
            self.optimizer,
            t.schedule,
            epoch=self.epoch,
            step=self.step,
            epochs=t.epochs,
            total_steps=t.epochs * self.steps_per_epoch,
        )
        if "loss" not in sums:  # every item of the step was unreadable (reported at the epoch's end)
            self.optimizer.zero_grad(set_to_none=True)
            self.step += 1
            self.step_in_epoch += 1
            return
        if t.grad_clip is not None:
            params = [p for g in self.optimizer.param_groups for p in g["params"]]
            sums["grad_norm"] = torch.nn.utils.clip_grad_norm_(params, t.grad_clip)
        values = dict(zip(sums, torch.stack([v.float().reshape(()) for v in sums.values()]).tolist()))
        if not np.isfinite(values["loss"]):
            raise FloatingPointError(
                f"training loss is {values['loss']} at step {self.step} (epoch {self.epoch}); {self._last_good()}"
            )
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.step_in_epoch += 1
        for k, v in values.items():
            self._window[k] = self._window.get(k, 0.0) + v
        self._window_steps += 1

    def _log(self, bar: Any) -> None:
        if not self._window_steps:  # only unreadable batches since the last log
            return
        means = {k: v / self._window_steps for k, v in self._window.items()}
        if distributed.world_size() > 1:  # average over ranks: each logged its local loss
            x = torch.tensor(list(means.values()), dtype=torch.float64, device=self.device)
            torch.distributed.all_reduce(x)
            means = dict(zip(means, (x / distributed.world_size()).tolist()))
        self._window, self._window_steps = {}, 0
        lr = self.optimizer.param_groups[0]["lr"]
        self.last_train = {f"train_{k}": v for k, v in means.items()}
        self._record({"event": "train", "epoch": self._epochs_done(), "step": self.step, "lr": lr, **means})
        bar.set_postfix(loss=f"{means['loss']:.4f}", lr=f"{lr:.3g}", refresh=False)

    def _record(self, record: dict[str, Any]) -> None:
        """One event into metrics.jsonl and, with ``CIRLAB_TENSORBOARD=1``, into TensorBoard."""
        self.run.log(record)
        if self.tensorboard is not None:
            for name, value in record.items():
                if name not in ("event", "step"):
                    self.tensorboard.add_scalar(f"{record['event']}/{name}", value, record["step"])

    def _epochs_done(self) -> float:
        """Training progress in epochs (2.5 = half-way through the third), as logged."""
        return self.epoch + self.step_in_epoch / self.steps_per_epoch

    def _eval_due(self) -> bool:
        """Every ``eval_every_steps`` steps when set, else every ``eval_every_epochs`` epochs."""
        t = self.cfg.trainer
        if t.eval_every_steps is not None:
            return self.step % t.eval_every_steps == 0
        return self.epoch % t.eval_every_epochs == 0 and self.step_in_epoch == 0

    def _budget_spent(self) -> bool:
        """``max_steps`` done, or ``stop_at`` reached by a validation."""
        max_steps = self.cfg.trainer.max_steps
        return (max_steps is not None and self.step >= max_steps) or self._target_reached

    def _reached(self) -> bool:
        """Whether the best validation so far reaches ``trainer.stop_at``."""
        target = self.cfg.trainer.stop_at
        return target is not None and self.best_metric is not None and self.best_metric >= target

    # ---------------------------------------------------------------- evaluation

    def _evaluate(self) -> None:
        metrics: dict[str, float] = {}
        if distributed.is_main() and self.evaluate_fn is not None:
            self.model.eval()
            with preserve_rng(), torch.no_grad():
                with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
                    metrics = {k: float(v) for k, v in self.evaluate_fn(self.model).items()}
            self.model.train()
            self._record({"event": "eval", "epoch": self._epochs_done(), "step": self.step, **metrics})
            select = self.cfg.trainer.select_metric
            improved = False
            if select is not None:
                if select not in metrics:
                    raise ValueError(
                        f"trainer.select_metric: {select!r} is not among the evaluation metrics {sorted(metrics)}"
                    )
                improved = self.best_metric is None or metrics[select] > self.best_metric
                if improved:
                    self.best_metric, self._new_best = metrics[select], True
            headline = format_metrics({k: metrics[k] for k in main_metric_names(metrics, select)})
            line = f"eval epoch {round(self._epochs_done(), 2):g} step {self.step}: {headline}"
            tqdm.write(line + ("  (best so far)" if improved else ""))  # keeps progress bars intact
            if self._reached() and not self._target_reached:
                tqdm.write(f"{select} reached trainer.stop_at {self.cfg.trainer.stop_at:g}: training stops here")
        distributed.barrier()
        self._target_reached = distributed.broadcast_flag(self._reached())
        self.last_eval, self._eval_step = metrics, self.step

    # ---------------------------------------------------------------- checkpoints

    def _state(self, rng: list[dict]) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "epoch": self.epoch,
            "step": self.step,
            "step_in_epoch": self.step_in_epoch,
            "best_metric": self.best_metric,
            "rng": rng,  # one entry per rank
            "world_size": distributed.world_size(),
            "config": self.cfg.model_dump(mode="json"),
        }

    def _save(self) -> None:
        """``latest.pt`` (and ``best.pt`` after a new best), written by the main rank only."""
        rng = [rng_state()]
        if distributed.world_size() > 1:
            rng = [None] * distributed.world_size()
            torch.distributed.all_gather_object(rng, rng_state())
        if distributed.is_main():
            state = self._state(rng)
            if self._new_best:
                save_checkpoint(self.run.best, state)
            save_checkpoint(self.run.latest, state)
        self._new_best = False
        self._saved_step = self.step

    def _load(self, path) -> None:
        state = load_checkpoint(path)
        try:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.epoch, self.step, self.step_in_epoch = state["epoch"], state["step"], state["step_in_epoch"]
            self.best_metric = state["best_metric"]
            self._target_reached = self._reached()
            rng = state["rng"]
        except (KeyError, ValueError, RuntimeError) as e:
            raise ValueError(f"checkpoint {path} does not match this model and optimiser: {e}") from None
        if len(rng) != distributed.world_size():
            warnings.warn(
                f"{path} was written by {len(rng)} processes, resuming on {distributed.world_size()}: "
                "data order and random streams will differ from an uninterrupted run",
                stacklevel=3,
            )
        self._resume_rng = rng[distributed.rank() % len(rng)]
        self._saved_step = self._eval_step = self.step
        self.run.truncate_metrics(self.step)


class _TrainingStep(nn.Module):
    """``forward`` = ``model.training_step``, so that DDP's forward wraps the training step."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: Any) -> Any:
        return self.model.training_step(batch)


class _ReportingCollate:
    """The collate function, plus the ids of the images its items could not read: a DataLoader
    worker hands over what its copy of the dataset's ``missing`` tracker found (as
    :class:`cirlab.data.torch_data.SkipMissingLoader` does), so the main process can report them."""

    def __init__(self, collate_fn: Callable | None) -> None:
        self.collate_fn = collate_fn or torch.utils.data.default_collate

    def __call__(self, items: list[Any]) -> tuple[Any, list[str]]:
        info = get_worker_info()
        dataset = info.dataset if info is not None else None
        tracker = getattr(getattr(dataset, "data", None), "missing", None)
        return self.collate_fn(items), (tracker.drain() if tracker is not None else [])


class _WorkerSeeded(Dataset):
    """Makes per-sample randomness (augmentations, caption choice) a function of
    (seed, epoch, index) inside DataLoader workers, so that skipping batches on resume
    does not shift the workers' random streams. In the main process (``num_workers=0``)
    the dataset draws from the global RNG, whose state the checkpoint restores."""

    def __init__(self, data: Dataset, seed: int) -> None:
        self.data, self.seed, self.epoch = data, seed, 0

    def __len__(self) -> int:
        return len(self.data)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> Any:
        if get_worker_info() is not None:
            seed_everything(int(np.random.SeedSequence([self.seed, self.epoch, index]).generate_state(1)[0]))
        return self.data[index]


def build_optimizer(model: nn.Module, param_groups: list[dict] | None, cfg: OptimConfig) -> torch.optim.Optimizer:
    """AdamW or Adam over ``param_groups``; every group records its base rate as ``initial_lr``."""
    if param_groups is None:
        param_groups = [{"params": [p for p in model.parameters() if p.requires_grad]}]
    groups = []
    for g in param_groups:
        g = {**g, "params": list(g["params"])}
        g.setdefault("lr", cfg.lr)
        g.setdefault("scheduled", True)
        g["initial_lr"] = g["lr"]
        groups.append(g)
    in_groups = {id(p) for g in groups for p in g["params"]}
    orphans = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in in_groups]
    if orphans:
        raise ValueError(
            f"parameters require grad but are in no optimiser group: {orphans[:5]}"
            f"{' ...' if len(orphans) > 5 else ''}; freeze them with requires_grad_(False) or add them to a group"
        )
    cls = torch.optim.AdamW if cfg.name == "adamw" else torch.optim.Adam
    return cls(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=cfg.betas, eps=cfg.eps)


PRECISIONS = ("auto", "fp32", "bf16")


def select_precision(requested: str, device: torch.device) -> str:
    """``"bf16"`` or ``"fp32"``: the autocast precision for ``trainer.precision`` on ``device``.
    ``CIRLAB_PRECISION``, when set, overrides the config (to measure the fp32 path on a bf16
    machine without editing configs).

    ``auto``: bf16 where the hardware runs it natively (CUDA with bf16 support, a CPU with
    AVX512-BF16 or AMX), fp32 elsewhere, silently. ``bf16`` is an explicit request: on a CPU
    without native bf16 it would be emulated and several times slower than fp32, so it falls
    back to fp32 with a warning. ``fp32`` is fp32."""
    source, env = "trainer.precision", os.environ.get("CIRLAB_PRECISION")
    if env:
        if env not in PRECISIONS:
            raise ValueError(f"CIRLAB_PRECISION must be one of {', '.join(PRECISIONS)}, got {env!r}")
        source, requested = "CIRLAB_PRECISION", env
    if requested == "auto":
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
        return "bf16" if device.type == "cpu" and cpu_has_native_bf16() else "fp32"
    if requested == "bf16" and device.type == "cpu" and not cpu_has_native_bf16():
        warnings.warn(f"{source} bf16: this CPU has no native bf16 (AVX512-BF16/AMX); training in fp32")
        return "fp32"
    return requested


def cpu_has_native_bf16() -> bool:
    """Whether oneDNN runs bf16 matmuls and convolutions natively on this CPU."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def _tensorboard(run: RunDir, purge_step: int) -> Any:
    """A ``SummaryWriter`` on ``<run>/tb`` with ``CIRLAB_TENSORBOARD=1`` (main rank), else None.
    TensorBoard hides the events from ``purge_step`` on that an earlier attempt wrote, so the
    curves of a resumed (or restarted) run are not doubled."""
    if os.environ.get("CIRLAB_TENSORBOARD") != "1" or not distributed.is_main():
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
        raise ModuleNotFoundError(
            f"CIRLAB_TENSORBOARD=1 needs the tensorboard package (pip install tensorboard): {e}"
        ) from None
    return SummaryWriter(str(run.tensorboard_dir), purge_step=purge_step)


def move_to(batch: Any, device: torch.device) -> Any:
    """Tensors (also inside dicts, lists, tuples and objects with ``.to``) to ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if hasattr(batch, "to") and not isinstance(batch, nn.Module):  # e.g. a tokenizer's BatchEncoding
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: move_to(v, device) for k, v in batch.items()}
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)(*(move_to(v, device) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(move_to(v, device) for v in batch)
    return batch


def _unpack(out: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    if isinstance(out, torch.Tensor):
        out = {"loss": out}
    if not isinstance(out, Mapping) or "loss" not in out:
        raise TypeError(f"training_step must return a loss tensor or a dict with 'loss', got {type(out).__name__}")
    loss = out["loss"]
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise TypeError(f"training_step's loss must be a scalar tensor, got {loss!r:.80}")
    logs = {
        k: torch.as_tensor(v, device=loss.device)
        for k, v in out.items()
        if isinstance(v, (int, float)) or (isinstance(v, torch.Tensor) and v.numel() == 1)
    }
    return loss.reshape(()), logs
