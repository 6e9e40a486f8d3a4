"""fp32 pretraining step of the small BLIP at several ``model.small`` sizes (how the shipped size was chosen).

One optimiser step (ITC + ITM on the configured fraction) on a real shapes batch, median of 3 after
a warm-up, 2 threads:

    python benchmarks/bench_blip_sizes.py --root runs/demo/shapes [--only "text 1" random ...]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from cirlab.methods import build_stage
from cirlab.config import CONFIG_ROOT, load_config
from cirlab.data.torch_data import make_loader

CONV = "vision_hidden: 256, stage_channels: [16, 32, 64, 128]"
# name -> the ``--set`` overrides of configs/pretrain/shapes_blip.yaml (text layers from MiniLM unless "random")
SIZES = {
    "text 4, conv [32, 64, 128, 128] (before session 5)":
        ["model.small={embed_dim: 256, text_layers: 4, vision_hidden: 256, stage_channels: [32, 64, 128, 128]}"],
    "text 4, conv [16, 32, 64, 128]": [f"model.small={{embed_dim: 256, text_layers: 4, {CONV}}}"],
    "text 4, conv [16, 32, 64, 128], embed / vision 128":
        ["model.small={embed_dim: 128, text_layers: 4, vision_hidden: 128, stage_channels: [16, 32, 64, 128]}"],
    "text 2, conv [16, 32, 64, 128] (configs/pretrain/shapes_blip.yaml)": [f"model.small={{embed_dim: 256, text_layers: 2, {CONV}}}"],
    "text 1, conv [16, 32, 64, 128]": [f"model.small={{embed_dim: 256, text_layers: 1, {CONV}}}"],
    "text 2 random, 256 wide": ["model.init_text=random",
                                f"model.small={{embed_dim: 256, text_hidden: 256, text_heads: 4, text_layers: 2, {CONV}}}"],
    "text 2 random, 128 wide (make demo)": ["model.init_text=random",
                                            f"model.small={{embed_dim: 256, text_hidden: 128, text_heads: 4, text_layers: 2, {CONV}}}"],
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", default="runs/demo/shapes")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--only", nargs="*", help="measure just the sizes whose name contains one of these")
    args = p.parse_args()
    torch.set_num_threads(2)
    print("| small BLIP | parameters | fp32 s / step |\n|---|---|---|")
    for name, sets in SIZES.items():
        if args.only and not any(o in name for o in args.only):
            continue
        torch.manual_seed(0)
        stage = build_stage(load_config(CONFIG_ROOT / "pretrain" / "shapes_blip.yaml",
                                           [f"data.root={args.root}", *sets]))
        model = stage.model.train()
        batch = next(iter(make_loader(stage.train_data, 128, shuffle=True)))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        times = []
        for _ in range(args.repeats + 1):
            start = time.perf_counter()
            model.training_step(batch)["loss"].backward()
            opt.step()
            opt.zero_grad()
            times.append(time.perf_counter() - start)
        params = sum(q.numel() for q in model.parameters()) / 1e6
        print(f"| {name} | {params:.1f} M | {statistics.median(times[1:]):.2f} |", flush=True)


if __name__ == "__main__":
    main()
