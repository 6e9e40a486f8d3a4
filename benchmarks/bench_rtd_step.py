"""RTD's training step at CLIP ViT-L/14 text-encoder size, on the CPU: seconds per step and peak memory.

The step is the one ``cirlab train`` runs for ``method.name: rtd``: the frozen anchor encodes the
target and reference captions, Phi (frozen) maps the reference caption embedding plus noise to the
pseudo-word, the trainable copy encodes "a photo of $ that {c}" and "a photo of $", then NT-Xent
over the 4B vectors, backward, and AdamW (lr 1e-5, wd 0.01) on the text encoder and its
projection, in fp32. Sizes: ViT-L/14's text transformer (width 768, 12 layers, 12 heads, MLP 3072,
77 positions, projection 768) over the MiniLM WordPiece vocabulary (30,522 rows against CLIP's
49,408: about 14.5M fewer embedding parameters), random weights; Phi has SEARLE/LinCIR's layers at
768. The image tower is not used by the step. Median of --repeats after one warm-up step.

    python benchmarks/bench_rtd_step.py [--batch-sizes 8 16 32] [--repeats 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time

import torch

from cirlab.composers import ProjectionComposer, QueryRecipe
from cirlab.methods.projection import RtdConfig, RtdStage
from cirlab.models import build_small_clip
from cirlab.models.phi import Phi

L14_TEXT = dict(embed_dim=768, text_hidden=768, text_layers=12, text_heads=12, vision_hidden=32,
                stage_channels=(8, 8, 8, 8))
CAPTIONS = ["a dog sitting on a wooden bench in a park", "two red apples on a white plate next to a knife",
            "a man riding a bicycle down a city street at night", "a small boat on a calm lake under a cloudy sky"]
CHANGES = ["make it a cat", "replace the apples with oranges", "show it during the day", "add a second boat"]


def batch(n: int) -> dict[str, list[str]]:
    pick = [i % len(CAPTIONS) for i in range(n)]
    return {"reference_caption": [CAPTIONS[i] for i in pick], "conditioning_caption": [CHANGES[i] for i in pick],
            "target_caption": [CAPTIONS[(i + 1) % len(CAPTIONS)] for i in pick]}


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 16, 32])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    clip = build_small_clip(**L14_TEXT)
    composer = ProjectionComposer(clip, QueryRecipe(prompt="a photo of $ that {text}"),
                                  Phi("searle", clip.embed_dim, clip.token_dim))
    stage = RtdStage(composer, RtdConfig(name="projection", stage="rtd")).train()
    trainable = [p for p in composer.backbone.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-5, weight_decay=0.01)
    print(f"trainable: {sum(p.numel() for p in trainable) / 1e6:.1f}M parameters (text encoder + projection), "
          f"threads {torch.get_num_threads()}, fp32\n")
    print("| batch | s / step | steps / min | peak RSS GiB |\n|---:|---:|---:|---:|")
    for bs in args.batch_sizes:
        data, times = batch(bs), []
        for _ in range(args.repeats + 1):
            start = time.perf_counter()
            loss = stage.training_step(data)["loss"]
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - start)
        t = statistics.median(times[1:])
        print(f"| {bs} | {t:.2f} | {60 / t:.1f} | {peak_rss_gib():.2f} |", flush=True)


if __name__ == "__main__":
    main()
