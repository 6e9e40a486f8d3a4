"""Feature cache: time of the first call (encode + store) against the second (validate + map).

Stand-in backbone for now: a small random conv net on random 64px images, returning a global
embedding [256] and an 8x8 token map [64, 128] per image (tokens stored as float16).
"load s" includes the checksum of every file; "load+read s" also touches every stored value,
since the memory map itself reads nothing until used.

    python benchmarks/bench_feature_cache.py [--n 2000] [--batch-size 64] [--image-size 64]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from cirlab.features.cache import cached_features


class TinyEncoder(nn.Module):
    def __init__(self, width: int = 128, dim: int = 256):
        super().__init__()
        self.convs = nn.Sequential(
            nn.Conv2d(3, 32, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(64, width, 3, stride=2, padding=1), nn.ReLU(),
        )
        self.proj = nn.Linear(width, dim)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        tokens = self.convs(images).flatten(2).transpose(1, 2)  # [b, (s/8)^2, width]
        return {"embeds": self.proj(tokens.mean(1)), "tokens": tokens}


def make_encode(image_size: int):
    model = TinyEncoder().eval()

    def encode(batch: list[str]) -> dict[str, torch.Tensor]:
        # A stand-in for "load and preprocess the image": a random image seeded by the id.
        images = torch.stack([torch.rand(3, image_size, image_size,
                                         generator=torch.Generator().manual_seed(int(i.removeprefix("img"))))
                              for i in batch])
        return model(images)

    return encode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--cache-dir", type=Path, help="default: a fresh temporary directory")
    args = parser.parse_args()

    torch.manual_seed(0)
    ids = [f"img{i}" for i in range(args.n)]
    key = {"backbone": "tiny-random-conv", "transform": f"random-{args.image_size}", "dataset": "bench"}
    encode = make_encode(args.image_size)

    with tempfile.TemporaryDirectory() as tmp:
        cache_dir = args.cache_dir or Path(tmp)
        call = dict(key=key, ids=ids, encode=encode, batch_size=args.batch_size, progress=False)

        t0 = time.perf_counter()
        built = cached_features(cache_dir, **call)
        build_s = time.perf_counter() - t0

        t0 = time.perf_counter()
        loaded = cached_features(cache_dir, **call)
        load_s = time.perf_counter() - t0
        total = sum(float(loaded[name].float().sum()) for name in loaded.fields)
        read_s = time.perf_counter() - t0
        assert total == sum(float(built[name].float().sum()) for name in built.fields)

        mb = sum(f.stat().st_size for f in loaded.path.iterdir()) / 2**20
        shapes = ", ".join(f"{k} {list(v.shape[1:])} {str(v.dtype).removeprefix('torch.')}"
                           for k, v in loaded.fields.items())

    print(f"fields: {shapes}; torch threads: {torch.get_num_threads()}")
    print(f"| {'N':>6} | {'batch':>5} | {'build s':>8} | {'load s':>7} | {'load+read s':>11} | "
          f"{'speed-up':>8} | {'MB on disk':>10} |")
    print(f"|{'-' * 8}|{'-' * 7}|{'-' * 10}|{'-' * 9}|{'-' * 13}|{'-' * 10}|{'-' * 12}|")
    print(f"| {args.n:>6} | {args.batch_size:>5} | {build_s:>8.3f} | {load_s:>7.3f} | {read_s:>11.3f} | "
          f"{build_s / load_s:>7.0f}x | {mb:>10.1f} |")


if __name__ == "__main__":
    main()
