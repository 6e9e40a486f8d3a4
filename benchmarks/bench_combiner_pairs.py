"""Bi-BLIP4CIR stage II reversed logits: naive B*B Combiner rows against the split-weight pair evaluation.

Times forward + backward (cross-entropy with labels arange(B), gradients of the Combiner's
parameters; the BLIP features are frozen inputs) at the real sizes (d 256, P 2560, H 5120),
in eval mode so both paths compute the same numbers. "naive" is the official construction:
the Combiner on B*B repeated rows. "fast" is ``Combiner.pair_logits`` in chunks of rows;
"fast, checkpointed" also recomputes each chunk in backward (memory bounded by one chunk).
"saved MiB" is what the forward keeps for backward (unique storages, parameters excluded), the
activation memory of a training step; training mode adds the dropout masks.
Naive sizes predicted (B^2 scaling) to exceed --naive-limit seconds per call are skipped, as are
un-checkpointed fast sizes whose saved B x B x H activations would exceed --max-gb.
Wherever the naive path ran, the fast paths must give the same logits and Combiner gradients
within float32 tolerance (relative to the largest entry), or the script stops with an error. The
gradient tolerance is loose because the gradients of the two layers before a ReLU are
ill-conditioned in float32: in B 64 draws both paths differed from a float64 computation by 1e-3
to 1e-2 on ``combiner_layer`` or ``dynamic_scalar.0``, the fast one no further than the naive one,
while the logits agree to 3e-7. The exact check, in float64, is tests/test_bidirectional_core.py.

    python benchmarks/bench_combiner_pairs.py [--sizes 64 128 256 512] [--repeats 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from cirlab.models.combiner import Combiner


def naive_pair_logits(combiner: Combiner, targets: torch.Tensor, back_text: torch.Tensor, refs: torch.Tensor):
    n = len(targets)
    images = targets[None].expand(n, n, -1).reshape(n * n, -1)
    texts = back_text[:, None].expand(n, n, -1).reshape(n * n, -1)
    out = combiner(images, texts).view(n, n, -1)
    return combiner.logit_scale * (out * F.normalize(refs, dim=-1)[:, None]).sum(-1)


Result = tuple[torch.Tensor, list[torch.Tensor]]  # logits, Combiner parameter gradients


def timed(step: Callable[[], torch.Tensor], combiner: Combiner, repeats: int) -> tuple[float, Result, float]:
    """Median seconds of forward + backward, the logits and gradients of the last call, and the
    MiB its forward saved for backward."""
    params = {p.untyped_storage().data_ptr() for p in combiner.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    times = []
    for _ in range(repeats):
        combiner.zero_grad(set_to_none=True)
        saved.clear()
        t0 = time.perf_counter()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            logits = step()
        F.cross_entropy(logits, torch.arange(len(logits))).backward()
        times.append(time.perf_counter() - t0)
    result = (logits.detach(), [p.grad.clone() for p in combiner.parameters()])
    return statistics.median(times), result, sum(saved.values()) / 2**20


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|: float32 rounding over sums of thousands of terms, whatever the scale."""
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def check(naive: Result, fast: Result, tol_logits: float, tol_grads: float) -> tuple[float, float]:
    """Worst relative difference of the logits and of any parameter's gradient; raises past the tolerances."""
    logits = rel_diff(fast[0], naive[0])
    grads = max(rel_diff(g, n) for g, n in zip(fast[1], naive[1]))
    if logits > tol_logits or grads > tol_grads:
        raise AssertionError(f"fast and naive pair logits disagree: logits {logits:.1e}, gradients {grads:.1e}")
    return logits, grads


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128, 256, 512])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--feature-dim", type=int, default=256)
    parser.add_argument("--projection-dim", type=int, default=2560)
    parser.add_argument("--hidden-dim", type=int, default=5120)
    parser.add_argument("--chunk-size", type=int, default=32)
    parser.add_argument("--naive-limit", type=float, default=60.0, help="seconds per naive call")
    parser.add_argument("--max-gb", type=float, default=8.0, help="activations of the un-checkpointed fast path")
    parser.add_argument("--tol-logits", type=float, default=1e-5, help="max relative difference of the logits")
    parser.add_argument("--tol-grads", type=float, default=5e-2, help="max relative difference of any gradient")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    combiner = Combiner(args.feature_dim, args.projection_dim, args.hidden_dim).eval()
    print(f"d {args.feature_dim}, P {args.projection_dim}, H {args.hidden_dim}, chunk {args.chunk_size}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, median of {args.repeats}")
    print("| B | naive s | fast s | fast, checkpointed s | speed-up | saved MiB naive / fast / ckpt "
          "| max rel diff logits / grads |")
    print("|---|---|---|---|---|---|---|")
    naive_rate = None  # seconds per pair, from the last naive size measured
    for b in args.sizes:
        targets, back_text, refs = torch.randn(3, b, args.feature_dim).unbind()
        cells = []
        predicted = naive_rate * b * b if naive_rate else 0.0
        if predicted <= args.naive_limit:
            naive_s, naive, naive_mib = timed(lambda: naive_pair_logits(combiner, targets, back_text, refs),
                                              combiner, args.repeats)
            naive_rate = naive_s / (b * b)
            cells.append(f"{naive_s:.2f}")
        else:
            naive = None
            cells.append(f"skipped (predicted {predicted:.0f})")
        saved_gb = 3 * b * b * args.hidden_dim * 4 / 2**30  # about 3 B x B x H float32 tensors saved for backward
        fast_s = None
        if saved_gb <= args.max_gb:
            fast_s, fast, fast_mib = timed(lambda: combiner.pair_logits(targets, back_text, refs, args.chunk_size),
                                           combiner, args.repeats)
            cells.append(f"{fast_s:.2f}")
        else:
            cells.append(f"skipped (~{saved_gb:.0f} GB)")
        ckpt_s, ckpt, ckpt_mib = timed(lambda: combiner.pair_logits(targets, back_text, refs, args.chunk_size, True),
                                       combiner, args.repeats)
        cells.append(f"{ckpt_s:.2f}")
        cells.append(f"{naive_s / fast_s:.1f}x" if naive is not None and fast_s else "—")
        mibs = (naive_mib if naive is not None else None, fast_mib if fast_s else None, ckpt_mib)
        cells.append(" / ".join("—" if m is None else f"{m:.0f}" for m in mibs))
        if naive is not None:
            compared = ((fast,) if fast_s else ()) + (ckpt,)
            diffs = [check(naive, result, args.tol_logits, args.tol_grads) for result in compared]
            cells.append(f"{max(d[0] for d in diffs):.1e} / {max(d[1] for d in diffs):.1e}")
        else:
            cells.append("—")
        print(f"| {b} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
