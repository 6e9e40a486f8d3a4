"""Data parallelism: 2 CPU processes (gloo) must reproduce one process on the concatenated batch."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from cirlab.config import ExperimentConfig
from cirlab.training import RunDir, Trainer, load_checkpoint, load_model_state
from cirlab.training.distributed import EpochBatchSampler, init_distributed
from cirlab.training.losses import clip_loss, info_nce

WORLD = 2


@pytest.fixture(autouse=True)
def cpu_only(monkeypatch):
    """gloo on the CPU, also on a machine with one GPU (spawned workers inherit this)."""
    monkeypatch.setenv("CIRLAB_DEVICE", "cpu")
    monkeypatch.setenv("CIRLAB_PRECISION", "fp32")  # the 1e-6 comparisons need fp32 on bf16 CPUs too


class PairEncoder(nn.Module):
    """Two linear towers; ``forward`` is the contrastive loss (so that DDP wraps it)."""

    def __init__(self, loss: str = "clip") -> None:
        super().__init__()
        self.q = nn.Linear(6, 4)
        self.t = nn.Linear(6, 4)
        self.loss = loss

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if self.loss == "clip":
            return clip_loss(self.q(a), self.t(b), 10.0)
        return info_nce(self.q(a), self.t(b))

    def training_step(self, batch):
        return self(*batch)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _join(rank: int, port: int) -> None:
    torch.set_num_threads(1)
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD)
    )
    init_distributed()


def _pair_data(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return torch.randn(n, 6, generator=g), torch.randn(n, 6, generator=g)


# ------------------------------------------------------------------------ losses and gradients


def _loss_worker(rank: int, port: int, out_dir: str, batch: int) -> None:
    _join(rank, port)
    a, b = _pair_data(WORLD * batch)
    local = slice(rank * batch, (rank + 1) * batch)
    results = {}
    for kind in ("clip", "info_nce"):
        torch.manual_seed(0)
        model = nn.parallel.DistributedDataParallel(PairEncoder(kind))
        loss = model(a[local], b[local])
        loss.backward()  # DDP averages the gradients over ranks
        results[kind] = {"loss": loss.detach(), "grads": {n: p.grad for n, p in model.module.named_parameters()}}
    # unequal batches (the collate dropped missing images): rank 0 holds 3 rows, rank 1 the rest
    torch.manual_seed(0)
    model = nn.parallel.DistributedDataParallel(PairEncoder("clip"))
    uneven = slice(0, 3) if rank == 0 else slice(3, None)
    local_loss = model(a[uneven], b[uneven])
    n_local = a[uneven].shape[0]
    # weight each rank by its share so that DDP's average is the mean over all rows
    (local_loss * n_local * WORLD / a.shape[0]).backward()
    results["uneven"] = {
        "loss": local_loss.detach() * n_local / a.shape[0],
        "grads": {n: p.grad for n, p in model.module.named_parameters()},
    }
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.mark.parametrize("kind", ["clip", "info_nce"])
def test_single_process_losses_match_direct_formulas(kind):
    a, b = _pair_data(5)
    model = PairEncoder(kind)
    qa, tb = F.normalize(model.q(a), dim=-1), F.normalize(model.t(b), dim=-1)
    logits = qa @ tb.T
    # cross-entropy with labels arange(B), written out: -log softmax of the diagonal
    ce_rows = -(logits * 100.0).log_softmax(dim=1).diagonal().mean()
    if kind == "clip":
        ce_rows = -(logits * 10.0).log_softmax(dim=1).diagonal().mean()
        ce_cols = -(logits * 10.0).log_softmax(dim=0).diagonal().mean()
        expected = (ce_rows + ce_cols) / 2
    else:
        expected = ce_rows
    torch.testing.assert_close(model(a, b), expected)


def test_two_processes_give_the_single_process_loss_and_gradients(tmp_path):
    batch = 4
    mp.spawn(_loss_worker, args=(_free_port(), str(tmp_path), batch), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    a, b = _pair_data(WORLD * batch)
    for kind in ("clip", "info_nce", "uneven"):
        torch.manual_seed(0)
        model = PairEncoder("info_nce" if kind == "info_nce" else "clip")
        loss = model(a, b)
        loss.backward()
        # the mean over ranks of the local losses is the loss on the concatenated batch
        # ("uneven" already weighted each rank's loss by its share of the rows)
        mean_loss = sum(r[kind]["loss"] for r in ranks) / (1 if kind == "uneven" else WORLD)
        torch.testing.assert_close(mean_loss, loss.detach(), rtol=1e-6, atol=0)
        for n, p in model.named_parameters():
            for r in ranks:  # after DDP's all-reduce every rank holds the full-batch gradient
                err = (r[kind]["grads"][n] - p.grad).norm() / p.grad.norm()  # float32 round-off is ~1e-7
                assert err < 1e-6, (kind, n, err.item())


# ------------------------------------------------------------------------ sampler


def test_sampler_shards_a_global_batch_and_is_a_function_of_seed_and_epoch():
    n, b = 50, 4
    single = EpochBatchSampler(n, b * WORLD, seed=3)
    shards = [EpochBatchSampler(n, b, seed=3, rank=r, world_size=WORLD) for r in range(WORLD)]
    for s in [single, *shards]:
        s.set_epoch(2)
    # the union over ranks of batch i is batch i of one process with batch B*W
    for i, (x, y, z) in enumerate(zip(single, *shards)):
        assert x == y + z, i
    assert len(single) == len(shards[0]) == n // (b * WORLD)
    # same (seed, epoch): same order; another epoch: another order
    again = EpochBatchSampler(n, b * WORLD, seed=3)
    again.set_epoch(2)
    assert list(again) == list(single)
    again.set_epoch(3)
    assert list(again) != list(single)
    # every index at most once per epoch
    flat = [i for batch in single for i in batch]
    assert len(flat) == len(set(flat)) == 48


def test_sampler_skips_consumed_batches_and_rounds_to_whole_steps():
    s = EpochBatchSampler(40, 3, seed=0, multiple_of=4)  # 13 batches -> 12 (3 steps of 4)
    s.set_epoch(1)
    full = list(s)
    assert len(full) == 12
    s.set_epoch(1, start=5)
    assert len(s) == 7 and list(s) == full[5:]


# ------------------------------------------------------------------------ the Trainer under DDP


def _trainer_cfg(out: str, batch_size: int) -> ExperimentConfig:
    return ExperimentConfig.model_validate(
        {
            "name": "ddp",
            "seed": 1,
            "trainer": {
                "epochs": 2,
                "batch_size": batch_size,
                "optimizer": {"name": "adam", "lr": 1e-2, "weight_decay": 0.0},
                "log_every_steps": 1,
                "output_dir": out,
            },
        }
    )


def _trainer_data() -> TensorDataset:
    return TensorDataset(*_pair_data(36))  # 4 global batches of 8 per epoch, 4 samples dropped


def _trainer_worker(rank: int, port: int, out_dir: str) -> None:
    _join(rank, port)
    cfg = _trainer_cfg(out_dir, batch_size=4)
    run = RunDir.create(cfg)  # rank 0 names the directory, the others receive it
    torch.manual_seed(rank)  # different initialisations: DDP must broadcast rank 0's
    Trainer(PairEncoder(), _trainer_data(), cfg, run).fit()
    dist.destroy_process_group()


def test_trainer_on_two_processes_matches_one_process_with_the_global_batch(tmp_path):
    mp.spawn(_trainer_worker, args=(_free_port(), str(tmp_path / "ddp")), nprocs=WORLD, join=True)
    (ddp_dir,) = (tmp_path / "ddp").iterdir()  # one run directory, written by rank 0 only
    ddp_run = RunDir.open(ddp_dir)

    cfg = _trainer_cfg(str(tmp_path / "single"), batch_size=4 * WORLD)
    single_run = RunDir.create(cfg)
    torch.manual_seed(0)
    model = PairEncoder()
    Trainer(model, _trainer_data(), cfg, single_run).fit()

    ddp_state = load_model_state(ddp_run.latest)
    for n, p in model.state_dict().items():
        torch.testing.assert_close(ddp_state[n], p, atol=1e-6, rtol=0, msg=n)
    assert load_checkpoint(ddp_run.latest)["world_size"] == WORLD
    ddp_losses = [r["loss"] for r in ddp_run.read_metrics() if r["event"] == "train"]
    single_losses = [r["loss"] for r in single_run.read_metrics() if r["event"] == "train"]
    assert len(ddp_losses) == len(single_losses) == 8
    assert ddp_losses == pytest.approx(single_losses, rel=1e-5)
