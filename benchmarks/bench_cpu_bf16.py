"""Pretraining step of the small backbones in fp32 against bf16 autocast, on the CPU.

One optimiser step (ITC, + ITM on the configured fraction of the batch for BLIP) on a real shapes batch of
128 images and scene captions, as ``cirlab pretrain`` runs it; median of --repeats after one
warm-up. bf16 pays only where the CPU has native bf16 (AVX512-BF16 or AMX): the script says
whether this one has it.

    python benchmarks/bench_cpu_bf16.py --root data/shapes [--repeats 3] [--threads 2] [--fp32-only]

``--fp32-only`` skips bf16, which without native bf16 is emulated at 20 to 40 times the fp32 cost.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from cirlab.methods import build_stage
from cirlab.config import CONFIG_ROOT, load_config
from cirlab.data.torch_data import make_loader
from cirlab.training.engine import cpu_has_native_bf16

CONFIGS = {"small BLIP": CONFIG_ROOT / "pretrain" / "shapes_blip.yaml",
           "small CLIP": CONFIG_ROOT / "pretrain" / "shapes_clip.yaml"}


def step_seconds(path, root: str, bf16: bool, repeats: int, batch_size: int) -> float:
    torch.manual_seed(0)
    cfg = load_config(path, [f"data.root={root}"])
    stage = build_stage(cfg)
    model, data = stage.model.train(), stage.train_data
    batch = next(iter(make_loader(data, batch_size, shuffle=True)))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = model.training_step(batch)
        out["loss"].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default="data/shapes")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--fp32-only", action="store_true", help="skip the (emulated, slow) bf16 column")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"threads {torch.get_num_threads()}, native bf16: {cpu_has_native_bf16()}, batch {args.batch_size}\n")
    print("| backbone | fp32 s / step | bf16 s / step | speed-up |")
    print("|---|---|---|---|")
    for name, path in CONFIGS.items():
        fp32 = step_seconds(path, args.root, False, args.repeats, args.batch_size)
        if args.fp32_only:
            print(f"| {name} | {fp32:.2f} | - | - |")
            continue
        bf16 = step_seconds(path, args.root, True, args.repeats, args.batch_size)
        print(f"| {name} | {fp32:.2f} | {bf16:.2f} | {fp32 / bf16:.1f}x |")


if __name__ == "__main__":
    main()
