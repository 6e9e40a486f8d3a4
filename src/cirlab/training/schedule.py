"""Learning-rate schedules as pure functions of (epoch, step).

Because the learning rate is recomputed from the position in training before every
optimiser step, a schedule has no state of its own: resuming restores (epoch, step) and the
learning rate follows. Each param group remembers its base rate as ``initial_lr``; groups
with ``scheduled=False`` are never touched (BLIP4CIR's ``text_proj`` at 100x the rate).
"""

from __future__ import annotations

import math

import torch

from cirlab.config import ScheduleConfig


def cosine_epoch_lr(base_lr: float, epoch: int, max_epoch: int, min_lr: float = 0.0) -> float:
    """BLIP's per-epoch cosine: ``(base-min)*0.5*(1+cos(pi*epoch/max_epoch)) + min``.

    Past ``max_epoch`` the cosine is not clamped and climbs back towards ``base_lr``; the
    official Bi-BLIP4CIR and Re-ranking commands run with ``max_epoch < epochs`` and depend on it.
    """
    return (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * epoch / max_epoch)) + min_lr


def cosine_step_lr(base_lr: float, step: int, total_steps: int, warmup_steps: int = 0, min_lr: float = 0.0) -> float:
    """Per-step cosine from ``base_lr`` down to ``min_lr`` over the steps after warm-up."""
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    progress = min(max(progress, 0.0), 1.0)
    return (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress)) + min_lr


def warmup_factor(step: int, warmup_steps: int) -> float:
    """Linear warm-up: optimiser step ``s`` (0-based) runs at ``(s+1)/warmup_steps`` of the rate."""
    return min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0


def lr_at(cfg: ScheduleConfig, base_lr: float, *, epoch: int, step: int, epochs: int, total_steps: int) -> float:
    """The rate for optimiser step ``step`` (0-based) taken during ``epoch`` (0-based).

    ``total_steps`` (the cosine_step horizon) is ``epochs * steps_per_epoch``; a
    ``max_steps`` budget stops training early but does not reshape the schedule.
    Warm-up applies to every schedule (``constant`` with warm-up is RTD's
    ``constant_with_warmup``).
    """
    if cfg.name == "constant":
        lr = base_lr
    elif cfg.name == "cosine_epoch":
        lr = cosine_epoch_lr(base_lr, epoch, cfg.max_epoch or epochs, cfg.min_lr)
    elif cfg.name == "cosine_step":
        lr = cosine_step_lr(base_lr, step, total_steps, cfg.warmup_steps, cfg.min_lr)
    else:
        raise ValueError(f"trainer.schedule.name: unknown schedule {cfg.name!r}")
    return lr * warmup_factor(step, cfg.warmup_steps)


def apply_schedule(
    optimizer: torch.optim.Optimizer, cfg: ScheduleConfig, *, epoch: int, step: int, epochs: int, total_steps: int
) -> None:
    for group in optimizer.param_groups:
        if group.get("scheduled", True):
            base = group["initial_lr"]
            group["lr"] = lr_at(cfg, base, epoch=epoch, step=step, epochs=epochs, total_steps=total_steps)
