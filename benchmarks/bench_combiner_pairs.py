"""Bi-BLIP4CIR stage II reversed logits: naive B*B Combiner rows against the split-weight pair evaluation.

Times forward + backward (cross-entropy with labels arange(B), gradients of the Combiner's
parameters; the BLIP features are frozen inputs) at the real sizes (d 256, P 2560, H 5120),
in eval mode so both paths compute the same numbers. "naive" is the official construction:
the Combiner on B*B repeated rows. "fast" is ``Combiner.pair_logits`` in chunks of rows;
"fast, checkpointed" also recomputes each chunk in backward (memory bounded by one chunk).
Naive sizes predicted (B^2 scaling) to exceed --naive-limit seconds per call are skipped, as are
un-checkpointed fast sizes whose saved B x B x H activations would exceed --max-gb.

    python benchmarks/bench_combiner_pairs.py [--sizes 64 128 256 512] [--repeats 3]
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


def timed(step: Callable[[], torch.Tensor], combiner: Combiner, repeats: int) -> tuple[float, torch.Tensor]:
    """Median seconds of forward + backward, and the logits of the last call."""
    times = []
    for _ in range(repeats):
        combiner.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        logits = step()
        F.cross_entropy(logits, torch.arange(len(logits))).backward()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), logits.detach()


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
    args = parser.parse_args()

    torch.manual_seed(0)
    combiner = Combiner(args.feature_dim, args.projection_dim, args.hidden_dim).eval()
    print(f"d {args.feature_dim}, P {args.projection_dim}, H {args.hidden_dim}, chunk {args.chunk_size}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, median of {args.repeats}")
    print("| B | naive s | fast s | fast, checkpointed s | speed-up | max abs diff (logits) |")
    print("|---|---|---|---|---|---|")
    naive_rate = None  # seconds per pair, from the last naive size measured
    for b in args.sizes:
        targets, back_text, refs = torch.randn(3, b, args.feature_dim).unbind()
        cells = []
        predicted = naive_rate * b * b if naive_rate else 0.0
        if predicted <= args.naive_limit:
            naive_s, naive = timed(lambda: naive_pair_logits(combiner, targets, back_text, refs),
                                   combiner, args.repeats)
            naive_rate = naive_s / (b * b)
            cells.append(f"{naive_s:.2f}")
        else:
            naive = None
            cells.append(f"skipped (predicted {predicted:.0f})")
        saved_gb = 3 * b * b * args.hidden_dim * 4 / 2**30  # about 3 B x B x H float32 tensors saved for backward
        fast_s = None
        if saved_gb <= args.max_gb:
            fast_s, fast = timed(lambda: combiner.pair_logits(targets, back_text, refs, args.chunk_size),
                                 combiner, args.repeats)
            cells.append(f"{fast_s:.2f}")
        else:
            cells.append(f"skipped (~{saved_gb:.0f} GB)")
        ckpt_s, ckpt = timed(lambda: combiner.pair_logits(targets, back_text, refs, args.chunk_size, True),
                             combiner, args.repeats)
        cells.append(f"{ckpt_s:.2f}")
        cells.append(f"{naive_s / fast_s:.1f}x" if naive is not None and fast_s else "—")
        cells.append(f"{(naive - ckpt).abs().max().item():.1e}" if naive is not None else "—")
        print(f"| {b} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
