"""Bi-BLIP4CIR numerical core: reversed logits (stage I sum, stage II Combiner) against naive B x B x d forms."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cirlab.models.combiner import Combiner
from cirlab.training.losses import reversed_sum_logits

B, D, P, H = 6, 8, 12, 10


def features(seed: int, n: int = B, d: int = D) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [(2 * torch.randn(n, d, generator=g, dtype=torch.float64)).requires_grad_() for _ in range(3)]


def naive_sum_logits(targets: torch.Tensor, back_text: torch.Tensor, refs: torch.Tensor) -> torch.Tensor:
    """The official construction: every (T_j + t_i) materialised, normalised, dotted with R_i."""
    queries = F.normalize(targets[None, :, :] + back_text[:, None, :], dim=-1)  # [i, j, d]
    return 100 * (queries * F.normalize(refs, dim=-1)[:, None, :]).sum(-1)


def naive_pair_logits(combiner: Combiner, targets: torch.Tensor, back_text: torch.Tensor, refs: torch.Tensor):
    """The official construction: the Combiner on B*B repeated rows (row i*B + j = (T_j, t_i))."""
    n = len(targets)
    images = targets[None].expand(n, n, -1).reshape(n * n, -1)
    texts = back_text[:, None].expand(n, n, -1).reshape(n * n, -1)
    out = combiner(images, texts).view(n, n, -1)
    return combiner.logit_scale * (out * F.normalize(refs, dim=-1)[:, None]).sum(-1)


def make_combiner(dropout: float = 0.5, seed: int = 0) -> Combiner:
    torch.manual_seed(seed)
    return Combiner(D, P, H, dropout=dropout).double()


def test_reversed_sum_logits_values_and_gradients():
    inputs = features(0)
    fast, naive = reversed_sum_logits(*inputs), naive_sum_logits(*inputs)
    assert fast.shape == (B, B)
    torch.testing.assert_close(fast, naive, rtol=1e-10, atol=1e-10)
    weights = torch.randn(B, B, dtype=torch.float64)  # a generic upstream gradient
    for g_fast, g_naive in zip(torch.autograd.grad((fast * weights).sum(), inputs),
                               torch.autograd.grad((naive * weights).sum(), inputs)):
        torch.testing.assert_close(g_fast, g_naive, rtol=1e-9, atol=1e-10)
    # Row i, column i is the positive: the loss is CE over j with label i.
    loss = F.cross_entropy(fast, torch.arange(B))
    torch.testing.assert_close(loss, -torch.log_softmax(naive, 1).diagonal().mean())


def test_reversed_sum_logits_is_finite_for_cancelling_pair():
    targets, back_text, refs = (x.detach() for x in features(1))
    back_text[0] = -targets[2]  # T_2 + t_0 = 0: the norm is clamped, values and gradients stay finite
    inputs = [x.requires_grad_() for x in (targets, back_text, refs)]
    logits = reversed_sum_logits(*inputs)
    assert torch.isfinite(logits).all()
    assert all(torch.isfinite(g).all() for g in torch.autograd.grad(logits.sum(), inputs))


def test_combiner_forward_matches_formula():
    combiner = make_combiner().eval()
    image, text, _ = features(2)
    out = combiner(image, text)
    assert out.shape == (B, D)
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(B, dtype=torch.float64))
    # Hand-written from its own layers (eval: dropout is the identity), text projection first.
    x = torch.cat((F.relu(combiner.text_proj(text)), F.relu(combiner.image_proj(image))), -1)
    w1, w2 = combiner.dynamic_scalar[0], combiner.dynamic_scalar[3]
    lam = torch.sigmoid(w2(F.relu(w1(x))))
    expected = combiner.output_layer(F.relu(combiner.combiner_layer(x))) + lam * text + (1 - lam) * image
    torch.testing.assert_close(out, F.normalize(expected, dim=-1))
    assert combiner.logit_scale == 100


@pytest.mark.parametrize(("dropout", "train"), [(0.5, False), (0.0, True)])
def test_pair_logits_match_naive(dropout: float, train: bool):
    combiner = make_combiner(dropout).train(train)
    inputs = features(3)
    fast, naive = combiner.pair_logits(*inputs), naive_pair_logits(combiner, *inputs)
    assert fast.shape == (B, B)
    torch.testing.assert_close(fast, naive, rtol=1e-10, atol=1e-10)
    wrt = [*inputs, *combiner.parameters()]
    loss_fast = F.cross_entropy(fast, torch.arange(B))
    loss_naive = F.cross_entropy(naive, torch.arange(B))
    for g_fast, g_naive in zip(torch.autograd.grad(loss_fast, wrt), torch.autograd.grad(loss_naive, wrt)):
        torch.testing.assert_close(g_fast, g_naive, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("checkpoint_chunks", [False, True])
def test_pair_logits_chunking(checkpoint_chunks: bool):
    combiner = make_combiner().eval()
    inputs = features(4, n=7)
    whole = combiner.pair_logits(*inputs)
    chunked = combiner.pair_logits(*inputs, chunk_size=3, checkpoint_chunks=checkpoint_chunks)  # 3 + 3 + 1 rows
    torch.testing.assert_close(chunked, whole, rtol=0, atol=1e-12)
    wrt = [*inputs, *combiner.parameters()]
    for a, b in zip(torch.autograd.grad(chunked.sum(), wrt), torch.autograd.grad(whole.sum(), wrt)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_pair_logits_train_dropout_is_reproducible_under_checkpoint():
    """With dropout on, recomputing a chunk in backward must reuse the forward's masks."""
    combiner = make_combiner(0.5).train()
    inputs = features(5)
    torch.manual_seed(0)
    plain = combiner.pair_logits(*inputs, chunk_size=2)
    g_plain = torch.autograd.grad(plain.sum(), inputs)
    torch.manual_seed(0)
    ckpt = combiner.pair_logits(*inputs, chunk_size=2, checkpoint_chunks=True)
    g_ckpt = torch.autograd.grad(ckpt.sum(), inputs)
    torch.testing.assert_close(ckpt, plain, rtol=0, atol=1e-12)
    for a, b in zip(g_ckpt, g_plain):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
