"""Batch-contrastive losses that stay exact under data parallelism.

On one process they are the usual in-batch InfoNCE. Under DDP each rank scores its *local*
queries against the keys of *all* ranks (gathered with gradients) and labels are offset by
the number of rows on the ranks before it; with equal batch sizes the mean over ranks of
these local losses is the single-process loss on the concatenated batch, and DDP's gradient
average gives its exact gradient (see :func:`~cirlab.training.distributed.all_gather_with_grad`).
Unequal batch sizes (missing images dropped by the collate) work too; each rank's loss is
then the mean over its own queries.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cirlab.training.distributed import all_gather_with_grad, gathered_sizes, rank


def _labels(n: int, device: torch.device) -> torch.Tensor:
    """Positions of this rank's rows in the gathered batch."""
    offset = sum(gathered_sizes(n, device)[: rank()])
    return torch.arange(n, device=device) + offset


def info_nce(query: torch.Tensor, target: torch.Tensor, scale: float | torch.Tensor = 100.0) -> torch.Tensor:
    """CLIP4Cir's loss: cross-entropy query -> target over the batch, labels ``arange(B)``,
    logits ``scale * <q, t>`` on L2-normalised features (fixed scale 100, i.e. temperature 0.01).
    Not symmetric."""
    q = F.normalize(query, dim=-1)
    t = all_gather_with_grad(F.normalize(target, dim=-1))
    return F.cross_entropy(scale * q @ t.T, _labels(q.shape[0], q.device))


def clip_loss(a: torch.Tensor, b: torch.Tensor, logit_scale: float | torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE (CLIP): the mean of a -> b and b -> a cross-entropies.

    ``logit_scale`` multiplies the cosine similarities as is (pass ``exp`` of a learnable
    log-scale, or ``1 / temperature``)."""
    a, b = F.normalize(a, dim=-1), F.normalize(b, dim=-1)
    all_a, all_b = all_gather_with_grad(a), all_gather_with_grad(b)
    labels = _labels(a.shape[0], a.device)
    a_to_b = F.cross_entropy(logit_scale * a @ all_b.T, labels)
    b_to_a = F.cross_entropy(logit_scale * b @ all_a.T, labels)
    return 0.5 * (a_to_b + b_to_a)


def reversed_sum_logits(
    targets: torch.Tensor, back_text: torch.Tensor, refs: torch.Tensor, scale: float = 100.0, eps: float = 1e-12
) -> torch.Tensor:
    """Bi-BLIP4CIR stage I reversed logits ``[i, j] = scale * cos(T_j + t_i, R_i)`` (B, B).

    Row i scores the composed queries "target j + backward text i" against reference i, so the
    negatives vary the image, not the text; use with ``F.cross_entropy(logits, arange(B))``.
    ``targets`` enter the sum as given: the official stage I passes them L2-normalised and the text
    feature raw, then normalises the sum (Bi-Blip4CIR ``clip_fine_tune.py``). Instead of its B x B x d tensor this expands the norm and the dot product:
    ``|T_j + t_i|^2 = |T_j|^2 + 2 t_i.T_j + |t_i|^2`` and ``(T_j + t_i).R_i = R_i.T_j + t_i.R_i``,
    so memory is O(B^2). Norms are clamped at ``eps`` like ``F.normalize``. The expansion loses
    relative precision only when ``|T_j + t_i|`` is tiny against ``|T_j|`` (near-cancelling pairs).

    In-batch only: the negatives are this rank's own targets, so under DDP the loss is local
    (no gather), exactly as in the single-GPU official code.
    """
    sq_norm = targets.pow(2).sum(-1) + 2 * back_text @ targets.T + back_text.pow(2).sum(-1, keepdim=True)
    dot = refs @ targets.T + (back_text * refs).sum(-1, keepdim=True)
    # sqrt(max(x, eps^2)) == max(sqrt(x), eps), and its gradient stays finite where clamped.
    norm = sq_norm.clamp_min(eps**2).sqrt() * refs.norm(dim=-1, keepdim=True).clamp_min(eps)
    return scale * dot / norm


def nt_xent(a: torch.Tensor, b: torch.Tensor, tau: float = 0.07) -> torch.Tensor:
    """SimCLR's NT-Xent over the joint set of 2N vectors ``cat(a, b)``, the positive of ``a[k]``
    being ``b[k]`` and back; every other vector of the set is a negative (a-a and b-b pairs too).
    RTD's ``contrastive_loss`` (jaeseokbyun/RTD ``utils.py``), written with logsumexp:
    ``mean_i -log(exp(s_i,pos / tau) / sum_{j != i} exp(s_ij / tau))``, cosine s, no learnable scale.
    In-batch and per process, as the official code (no gather)."""
    z = F.normalize(torch.cat([a, b]), dim=-1)
    n = a.shape[0]
    logits = (z @ z.T / tau).masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), float("-inf"))
    positives = torch.cat([torch.arange(n, 2 * n), torch.arange(n)]).to(z.device)
    return F.cross_entropy(logits, positives)


def diagonal_ce(logits: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy of a (B, B) in-batch score matrix whose positives lie on the diagonal.

    ``rows`` (B,): the image row of each column's positive; a column showing the same image as
    the diagonal one is left out of that row's softmax (it is not a negative: the paired sampler
    puts two queries with the same reference in a batch)."""
    labels = torch.arange(logits.shape[0], device=logits.device)
    if rows is not None:
        same = (rows[:, None] == rows[None, :]) & (labels[:, None] != labels[None, :])
        logits = logits.masked_fill(same.to(logits.device), float("-inf"))
    return F.cross_entropy(logits, labels)
