"""Data-parallel training under ``torchrun``: process group, rank helpers, a gradient-carrying
all-gather for contrastive losses, and a deterministic sharded batch sampler.

Without ``torchrun`` (no ``WORLD_SIZE`` in the environment) everything degrades to a single
process: ``world_size() == 1``, ``is_main()`` is true and ``all_gather_with_grad`` is the
identity, so the same code runs on a laptop and on a node. CUDA is used when present;
``CIRLAB_DEVICE=cpu`` in the environment forces the CPU (and gloo) on a GPU machine.
"""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Hashable, Iterator, Sequence

import torch
import torch.distributed as dist
from torch.utils.data import Sampler


def init_distributed(timeout_minutes: int = 60) -> None:
    """Join the process group that ``torchrun`` describes (RANK, WORLD_SIZE, LOCAL_RANK,
    MASTER_ADDR/PORT); a no-op when not launched by it or when already initialised.

    NCCL on CUDA, gloo on CPU. The timeout is generous because rank 0 evaluates alone
    between epochs while the other ranks wait at a barrier.
    """
    if dist.is_initialized() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return
    if use_cuda():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        backend = "nccl"
    else:
        backend = "gloo"
    dist.init_process_group(backend, timeout=timedelta(minutes=timeout_minutes))


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def broadcast_flag(flag: bool) -> bool:
    """The main rank's ``flag`` on every rank: a decision only it can take (it alone validates)."""
    if not is_distributed():
        return flag
    box = [flag]
    torch.distributed.broadcast_object_list(box, src=0)
    return bool(box[0])


def use_cuda() -> bool:
    return torch.cuda.is_available() and os.environ.get("CIRLAB_DEVICE", "").lower() != "cpu"


def default_device() -> torch.device:
    """This process's accelerator: ``cuda:LOCAL_RANK`` when CUDA is present, else the CPU."""
    if use_cuda():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def gathered_sizes(n: int, device: torch.device | None = None) -> list[int]:
    """Every rank's ``n`` (e.g. its batch size), in rank order."""
    if not is_distributed():
        return [n]
    parts = [torch.zeros((), dtype=torch.long, device=device) for _ in range(world_size())]
    dist.all_gather(parts, torch.tensor(n, dtype=torch.long, device=device))
    return [int(p) for p in parts]


class _AllGatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        sizes = gathered_sizes(x.shape[0], x.device)
        padded = x.new_zeros((max(sizes), *x.shape[1:]))  # all_gather needs equal shapes
        padded[: x.shape[0]] = x
        parts = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(parts, padded)
        ctx.sizes = sizes
        return torch.cat([p[:n] for p, n in zip(parts, sizes)])

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()  # all_reduce works in place; never touch autograd's buffer
        dist.all_reduce(grad)  # sum of every rank's loss gradient w.r.t. the gathered rows
        start = sum(ctx.sizes[: rank()])
        return grad[start : start + ctx.sizes[rank()]]


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` across ranks along dim 0, in rank order, keeping gradients.

    Ranks may hold different numbers of rows (a collate that drops missing images).

    Why this scheme and not open_clip's default (gather without gradient, then put the local
    tensor back in its slice): each rank computes the loss of its *local* queries against
    *all* keys, and DDP averages parameter gradients over ranks. Rank s's features then
    influence the loss of every rank r, and the exact gradient of the global loss needs all
    those terms. The backward here sums the incoming gradient over ranks (all-reduce) and
    returns this rank's slice, i.e. ``sum_r dL_r/dx_s``; after DDP's average this is exactly
    the gradient of ``mean_r L_r``, which equals the single-process loss on the concatenated
    batch when every rank has the same batch size. The slice-replacement scheme drops the
    cross-rank terms, which is only right when every rank computes the full global loss (and
    then DDP's average scales it by 1/world).
    """
    if not is_distributed() or world_size() == 1:
        return x
    return _AllGatherWithGrad.apply(x)


class EpochBatchSampler(Sampler[list[int]]):
    """Batches of indices whose order is a pure function of (seed, epoch): a
    ``DistributedSampler`` that also yields batches, can start mid-epoch and drops tails.

    Per epoch, one permutation of the whole dataset is drawn from a generator seeded with
    ``seed + epoch``. Global batch ``i`` is ``perm[i*B*W : (i+1)*B*W]`` and rank ``r`` takes the
    ``r``-th block of ``B`` of it, so the union over ranks of batch ``i`` is what one process
    with batch ``B*W`` would see. The number of batches is the same on every rank, rounded down
    to a multiple of ``multiple_of`` (gradient accumulation never sees a partial step).
    ``set_epoch(epoch, start=k)`` skips the first ``k`` batches without loading them (resume).

    With ``groups`` (one key per sample, e.g. its reference image) the permutation is one of
    pairs: each group is shuffled and cut into pairs, the pairs are shuffled and laid end to end,
    so that most samples share a batch with another one of their group (TIRG's CSS sampling,
    which puts hard negatives in every batch).
    """

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        *,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        multiple_of: int = 1,
        groups: Sequence[Hashable] | None = None,
    ) -> None:
        if groups is not None and len(groups) != num_samples:
            raise ValueError(f"EpochBatchSampler: {len(groups)} group keys for {num_samples} samples")
        members: dict[Hashable, list[int]] = {}
        for i, key in enumerate(groups or ()):
            members.setdefault(key, []).append(i)
        self.groups = list(members.values()) if groups is not None else None
        self.num_samples, self.batch_size = num_samples, batch_size
        self.seed, self.rank, self.world_size = seed, rank, world_size
        per_step = batch_size * world_size * multiple_of
        self.num_batches = (num_samples // per_step) * multiple_of
        self.epoch, self.start = 0, 0

    def _pairs(self, g: torch.Generator) -> list[int]:
        pairs = []
        for members in self.groups or ():
            shuffled = [members[j] for j in torch.randperm(len(members), generator=g).tolist()]
            pairs += [shuffled[j:j + 2] for j in range(0, len(shuffled), 2)]
        return [i for j in torch.randperm(len(pairs), generator=g).tolist() for i in pairs[j]]

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def __len__(self) -> int:
        return max(0, self.num_batches - self.start)

    def __iter__(self) -> Iterator[list[int]]:
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        perm = self._pairs(g) if self.groups is not None else torch.randperm(self.num_samples, generator=g).tolist()
        b, w = self.batch_size, self.world_size
        for i in range(self.start, self.num_batches):
            first = (i * w + self.rank) * b
            yield perm[first : first + b]
