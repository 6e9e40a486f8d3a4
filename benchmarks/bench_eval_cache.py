"""Evaluation with a real (small) backbone: the gallery encoded once, then read from the cache.

Times ``cirlab.features.encode.image_features`` (embeds + BLIP tokens) twice on a fresh cache,
and a whole zero-shot evaluation (one :class:`~cirlab.composers.ZeroShotComposer` per mode,
through :func:`~cirlab.evaluation.evaluate.evaluate_composer`) on a cold and on a warm cache.

    python benchmarks/bench_eval_cache.py --backbone runs/demo/pretrain-blip/backbone --root runs/demo/shapes
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch

from cirlab.composers import MODES, QueryRecipe, ZeroShotComposer
from cirlab.data.registry import load_split
from cirlab.data.transforms import build_transform
from cirlab.evaluation.evaluate import evaluate_composer
from cirlab.models import BlipBackbone, load_backbone
from cirlab.features.encode import image_features


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", required=True, type=Path)
    parser.add_argument("--root", required=True, type=Path)
    parser.add_argument("--split", default="test")
    args = parser.parse_args()

    backbone = load_backbone(args.backbone.resolve())
    split = load_split("shapes", args.root.resolve(), args.split)
    transform = build_transform("targetpad", backbone.image_size)
    tokens = isinstance(backbone, BlipBackbone)
    with tempfile.TemporaryDirectory() as cache:
        times = []
        for _ in range(2):
            t0 = time.perf_counter()
            feats = image_features(backbone, split, transform, f"targetpad-1.25-{backbone.image_size}",
                                   tokens=tokens, cache_dir=cache)
            times.append(time.perf_counter() - t0)
        mb = sum(f.stat().st_size for f in feats.path.iterdir()) / 2**20
    print(f"{split.name}: {len(feats)} images, fields {[k for k in feats.fields]}, {mb:.1f} MB; "
          f"torch threads {torch.get_num_threads()}")
    print("| step | seconds |\n|---|---|")
    print(f"| encode + store (first evaluation) | {times[0]:.2f} |")
    print(f"| validate + map (later evaluations) | {times[1]:.3f} |")
    print(f"| speed-up | {times[0] / times[1]:.0f}x |")

    # every zero-shot mode, as `cirlab eval --config configs/zeroshot/shapes_zeroshot_blip.yaml` runs them
    modes = [m for m in MODES if tokens or m != "grounded"]
    composers = [ZeroShotComposer(backbone, QueryRecipe(), mode) for mode in modes]

    def evaluate_all() -> None:
        for composer in composers:
            evaluate_composer(composer, [split])

    old_cache = os.environ.get("CIRLAB_CACHE")
    with tempfile.TemporaryDirectory() as cache:
        os.environ["CIRLAB_CACHE"] = cache  # a fresh feature cache, not the user's
        try:
            t0 = time.perf_counter()
            evaluate_all()
            cold = time.perf_counter() - t0
            t0 = time.perf_counter()
            evaluate_all()
            warm = time.perf_counter() - t0
        finally:
            if old_cache is None:
                os.environ.pop("CIRLAB_CACHE")
            else:
                os.environ["CIRLAB_CACHE"] = old_cache
    print(f"| whole zero-shot evaluation ({', '.join(modes)}), cold cache | {cold:.1f} |")
    print(f"| whole zero-shot evaluation, warm cache | {warm:.1f} |")


if __name__ == "__main__":
    main()
