"""Training-set options: the paired-reference sampler and data-limited training."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from cirlab.config import load_config, CONFIG_ROOT
from cirlab.methods.common import training_splits
from cirlab.training.distributed import EpochBatchSampler
from cirlab.training.losses import diagonal_ce


def test_paired_sampler_puts_samples_with_one_reference_side_by_side():
    groups = [i // 4 for i in range(40)] + [100, 101]  # ten references with 4 samples, two singletons
    sampler = EpochBatchSampler(len(groups), 6, seed=3, groups=groups)
    batches = list(sampler)
    perm = [i for b in batches for i in b]
    assert sorted(perm) == list(range(42))  # a permutation: 7 whole batches of 6
    full = perm
    # read in pairs from the start, every pair of two shares its group
    starts, pos = [], 0
    while pos < len(full):
        size = 2 if pos + 1 < len(full) and groups[full[pos]] == groups[full[pos + 1]] else 1
        starts.append(size)
        pos += size
    assert Counter(starts) == Counter({2: 20, 1: 2})
    # a function of (seed, epoch), and another order in the next epoch
    assert list(EpochBatchSampler(len(groups), 6, seed=3, groups=groups)) == batches
    sampler.set_epoch(1)
    assert list(sampler) != batches


def test_paired_sampler_needs_one_key_per_sample():
    with pytest.raises(ValueError, match="3 group keys for 4 samples"):
        EpochBatchSampler(4, 2, seed=0, groups=[0, 0, 1])


def test_train_fraction_keeps_a_fixed_share_of_the_triplets(tiny_shapes):
    def splits(*sets):
        return training_splits(load_config(CONFIG_ROOT / "bidirectional" / "shapes_text.yaml",
                                           [f"data.root={tiny_shapes}", *sets]))
    full, = splits()
    part, = splits("data.train_fraction=0.25")
    again, = splits("data.train_fraction=0.25", "seed=5")
    assert len(part.queries) == round(0.25 * len(full.queries))
    assert part.queries == again.queries  # the same draw for every seed
    assert all(q in full.queries for q in part.queries)
    assert part.gallery == full.gallery


def test_a_column_showing_the_positive_image_again_is_not_a_negative():
    logits = torch.tensor([[2.0, 5.0, 0.0], [1.0, 3.0, 0.5], [0.0, 1.0, 4.0]])
    rows = torch.tensor([7, 7, 9])  # queries 0 and 1 share their positive image
    expected = torch.stack([
        -torch.log_softmax(torch.tensor([2.0, 0.0]), 0)[0],
        -torch.log_softmax(torch.tensor([3.0, 0.5]), 0)[0],
        -torch.log_softmax(torch.tensor([0.0, 1.0, 4.0]), 0)[2],
    ]).mean()
    assert torch.allclose(diagonal_ce(logits, rows), expected)
    assert not torch.allclose(diagonal_ce(logits), expected)
