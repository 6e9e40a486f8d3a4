"""Real-size profile: every method's training step and the gallery encoders at the official sizes.

Builds each model at its real size with random weights (nothing is downloaded) and measures, per
row, the median step time over a few steps after a warm-up, the peak memory (CUDA:
``max_memory_allocated``; CPU: the process's peak RSS so far, which only grows) and samples per
second. Prints one markdown table and writes the JSON. Each row is time-boxed; when the total
budget is spent the remaining rows are skipped with a note, and a row that runs out of memory is
recorded as OOM with the batch that failed, so one run always gives the whole table.

    python benchmarks/real_size.py --out real_size.json            # on a GPU: under 8 minutes
    python benchmarks/real_size.py --tiny                          # the same code, shrunken, on CPU

``--tiny`` runs in well under a minute on 2 CPU cores; the test suite runs it so the script
cannot rot. Rows:

* Bi-BLIP4CIR stage I: BLIP text encoder + text_proj at batch 128 over cached image embeddings,
  forward + reversed loss (the official README: about 36 GB on one A100 at batch 128);
* Bi-BLIP4CIR stage II: the Combiner (2560/5120) at batch 512 with the fast pair logits, with and
  without checkpointed chunks;
* re-ranking stage I (grounded filter) at batch 128 over cached 577 x 768 tokens, and the
  dual-encoder re-ranker at batch 16 with gradient checkpointing and bf16 tokens (the official
  stage II peaks near 70 GB on an A100 for CIRR; the goal is well under half);
* RTD: the CLIP ViT-L/14 text encoder, a trainable copy against a frozen anchor, at batch 128;
* SPN stage 2: the BLIP query side at batch 128 against a static bank of 16,939 x 256 (CIRR
  train's unique images);
* gallery encoding (images/s, bf16, batch 256) through BLIP ViT-B/16 at 384 px and CLIP ViT-L/14
  at 224 px, and one composed query's latency at batch 1.
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import statistics
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from cirlab.composers import GroundedComposer, QueryRecipe, RerankComposer, SumComposer
from cirlab.methods import bidirectional as bi
from cirlab.methods import rerank
from cirlab.methods.common import RowTable
from cirlab.models import blip_base_config, build_backbone, clip_config
from cirlab.models.combiner import Combiner
from cirlab.models.dual_encoder import DualEncoderReranker
from cirlab.training.losses import clip_loss, diagonal_ce, info_nce
from transformers import BlipConfig, CLIPConfig

TEXT = "is red with long sleeves and a bow"


@dataclass
class Row:
    name: str
    batch: int
    status: str = "ok"
    median_s: float | None = None
    per_second: float | None = None
    peak_gb: float | None = None
    official: str = ""


@dataclass(frozen=True)
class Sizes:
    """Batch sizes and model configs: the official ones, or shrunken for ``--tiny``."""

    blip: Callable[[], BlipConfig]
    clip: Callable[[], CLIPConfig]
    bi_batch: int = 128
    combiner_batch: int = 512
    combiner_dims: tuple[int, int] = (2560, 5120)
    filter_batch: int = 128
    reranker_batch: int = 16
    rtd_batch: int = 128
    spn_batch: int = 128
    bank: int = 16939
    gallery_batch: int = 256
    steps: int = 5
    warmup: int = 2


REAL = Sizes(blip=blip_base_config, clip=lambda: clip_config("ViT-L/14"))


def _tiny_blip() -> BlipConfig:
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32,
                  patch_size=16)
    text = dict(vocab_size=30524, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                max_position_embeddings=512)
    return BlipConfig(vision_config=vision, text_config=text, image_text_hidden_size=16)


def _tiny_clip() -> CLIPConfig:
    config = clip_config("ViT-B/32")
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, patch_size=16,
                  image_size=32, projection_dim=16)
    text = {**config.text_config.to_dict(), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
            "num_attention_heads": 2, "projection_dim": 16}
    return CLIPConfig(vision_config=vision, text_config=text, projection_dim=16)


TINY = Sizes(blip=_tiny_blip, clip=_tiny_clip, bi_batch=8, combiner_batch=16, combiner_dims=(32, 64), filter_batch=8,
             reranker_batch=4, rtd_batch=8, spn_batch=8, bank=200, gallery_batch=4, steps=2, warmup=1)


class Profiler:
    def __init__(self, device: torch.device, budget_s: float, row_budget_s: float):
        self.device, self.deadline, self.row_budget_s = device, time.perf_counter() + budget_s, row_budget_s
        self.rows: list[Row] = []
        self.bf16 = device.type == "cuda"

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16) if self.bf16 else nullcontext()

    def run(self, name: str, batch: int, build: Callable[[], Callable[[], None]], sizes: Sizes,
            official: str = "", per_step: int | None = None) -> None:
        """Build the row's step function, warm up, then time ``sizes.steps`` steps (time-boxed)."""
        row = Row(name, batch, official=official)
        self.rows.append(row)
        if time.perf_counter() > self.deadline:
            row.status = "skipped: the total time budget was spent"
            return
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        try:
            step = build()
            times: list[float] = []
            start = time.perf_counter()
            for i in range(sizes.warmup + sizes.steps):
                t0 = time.perf_counter()
                step()
                if self.device.type == "cuda":
                    torch.cuda.synchronize()
                if i >= sizes.warmup:
                    times.append(time.perf_counter() - t0)
                if time.perf_counter() - start > self.row_budget_s and times:
                    row.status = f"ok ({len(times)} timed steps: row time-boxed)"
                    break
            row.median_s = statistics.median(times)
            row.per_second = (per_step or batch) / row.median_s
        except torch.cuda.OutOfMemoryError:
            row.status = f"OOM at batch {batch}"
        except RuntimeError as e:
            if "out of memory" not in str(e):
                raise
            row.status = f"OOM at batch {batch}"
        finally:
            if self.device.type == "cuda":
                row.peak_gb = torch.cuda.max_memory_allocated() / 2**30
                torch.cuda.empty_cache()
            else:
                row.peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20

    def table(self) -> str:
        memory = "peak GB (CUDA)" if self.device.type == "cuda" else "peak RSS GB (process)"
        lines = [f"| row | batch | median s / step | samples / s | {memory} | status | official |",
                 "|---|---|---|---|---|---|---|"]
        fmt = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
        for r in self.rows:
            lines.append(f"| {r.name} | {r.batch} | {fmt(r.median_s, '.3f')} | {fmt(r.per_second, '.1f')} | "
                         f"{fmt(r.peak_gb, '.2f')} | {r.status} | {r.official} |")
        return "\n".join(lines)


def _train_step(module: torch.nn.Module, loss_of: Callable[[], torch.Tensor], profiler: Profiler):
    params = [p for p in module.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)

    def step() -> None:
        with profiler.autocast():
            loss = loss_of()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def _encode_images(backbone, batch: int, profiler: Profiler) -> Callable[[], None]:
    """A gallery-encoding step: one batch of random images through the image tower, no gradient."""
    pixels = torch.randn(batch, 3, backbone.image_size, backbone.image_size, device=profiler.device)

    @torch.no_grad()
    def step() -> None:
        with profiler.autocast():
            backbone.encode_image(pixels)
    return step


def profile(sizes: Sizes, device: torch.device, budget_s: float, row_budget_s: float) -> Profiler:
    p = Profiler(device, budget_s, row_budget_s)
    blip = build_backbone(sizes.blip()).to(device)
    d = blip.embed_dim
    tokens_shape = (blip.config.vision_config.image_size // blip.config.vision_config.patch_size) ** 2 + 1

    def bi_text():
        backbone = bi.prepare_backbone(copy.deepcopy(blip), bi.BiTextConfig())
        embeds = torch.randn(2 * sizes.bi_batch, d, device=device)
        stage = bi.TextStage(backbone, embeds, bi.BiTextConfig(reverse_weight=0.1)).train()
        b = sizes.bi_batch
        batch = {"reference": torch.arange(b, device=device), "target": torch.arange(b, 2 * b, device=device),
                 "text": [f"[FORWARD] {TEXT}"] * b, "back_text": [f"[BACKWARD] {TEXT}"] * b}
        return _train_step(stage, lambda: stage.training_step(batch)["loss"], p)

    p.run("Bi-BLIP4CIR stage I (text encoder, forward + reversed)", sizes.bi_batch, bi_text, sizes,
          "official README: about 36 GB on one A100 80GB")

    for checkpointed in (False, True):
        def combiner(checkpointed=checkpointed):
            b, (proj, hidden) = sizes.combiner_batch, sizes.combiner_dims
            comb = Combiner(d, proj, hidden).to(device).train()
            ref, tgt, txt, back = (torch.randn(b, d, device=device) for _ in range(4))
            return _train_step(comb, lambda: info_nce(comb(ref, txt), tgt) + 0.1 * diagonal_ce(
                comb.pair_logits(tgt, back, ref, chunk_size=max(1, b // 4), checkpoint_chunks=checkpointed)), p)
        p.run(f"Bi-BLIP4CIR stage II (Combiner, pair logits{', checkpointed' if checkpointed else ''})",
              sizes.combiner_batch, combiner, sizes, "official batch 512")

    def token_table(n: int) -> RowTable:
        dtype = torch.bfloat16 if p.bf16 else torch.float16
        return RowTable([torch.randn(n, tokens_shape, blip.vision_hidden).to(dtype)], device)

    def filt():
        backbone = copy.deepcopy(blip)
        b = sizes.filter_batch
        stage = rerank.FilterStage(backbone, token_table(2 * b), rerank.FilterConfig()).train()
        batch = {"reference": torch.arange(b, device=device), "target": torch.arange(b, 2 * b, device=device),
                 "text": [TEXT] * b}
        return _train_step(stage, lambda: stage.training_step(batch)["loss"], p)

    p.run("re-ranking stage I (grounded filter, cached tokens)", sizes.filter_batch, filt, sizes)

    def reranker():
        b = sizes.reranker_batch
        model = DualEncoderReranker.from_text_encoder(blip.text_encoder, enc_token_id=blip.enc_token_id)
        first = GroundedComposer(copy.deepcopy(blip), QueryRecipe())
        stage = rerank.RerankerStage(RerankComposer(first, model), token_table(2 * b),
                                     rerank.RerankerConfig(gradient_checkpointing=True)).train()
        batch = {"reference": torch.arange(b, device=device), "target": torch.arange(b, 2 * b, device=device),
                 "text": [TEXT] * b}
        return _train_step(stage, lambda: stage.training_step(batch)["loss"], p)

    p.run("re-ranking stage II (dual encoder, B x B pairs, checkpointed)", sizes.reranker_batch, reranker, sizes,
          "official: near 70 GB on an A100 (CIRR); goal: well under half", per_step=sizes.reranker_batch ** 2)

    def spn():
        backbone = copy.deepcopy(blip)
        backbone.requires_grad_(False)
        backbone.text_encoder.requires_grad_(True)
        backbone.text_proj.requires_grad_(True)
        composer = SumComposer(backbone, QueryRecipe())
        b = sizes.spn_batch
        bank = F.normalize(torch.randn(sizes.bank, d, device=device), dim=-1)
        refs, labels = torch.randn(b, d, device=device), torch.randint(0, sizes.bank, (b,), device=device)
        tau = torch.nn.Parameter(torch.tensor(0.01, device=device))
        module = torch.nn.ModuleDict({"backbone": backbone})
        module.tau = tau
        return _train_step(module, lambda: F.cross_entropy(
            composer.compose(refs, [TEXT] * b) @ bank.T / tau, labels), p)

    p.run(f"SPN stage 2 (BLIP query side vs a bank of {sizes.bank})", sizes.spn_batch, spn, sizes)

    p.run(f"gallery encoding, BLIP image tower at {blip.image_size} px", sizes.gallery_batch,
          lambda: _encode_images(blip, sizes.gallery_batch, p), sizes)

    def query_latency():
        composer = SumComposer(blip, QueryRecipe()).eval()
        ref = torch.randn(1, d, device=device)

        def step() -> None:
            with p.autocast():
                composer.encode_queries(ref, [TEXT])
        return step

    p.run("one composed query (BLIP stage I, cached reference), latency", 1, query_latency, sizes)
    del blip

    clip = build_backbone(sizes.clip()).to(device)

    def rtd():
        trainable = copy.deepcopy(clip)
        trainable.requires_grad_(False)
        trainable.text_encoder.requires_grad_(True)
        trainable.text_proj.requires_grad_(True)
        anchor = clip.eval().requires_grad_(False)
        b = sizes.rtd_batch
        enc = clip.tokenize([f"a photo of $ that {TEXT}"] * b)
        target = clip.tokenize([f"a photo of a dress that {TEXT}"] * b)

        def loss() -> torch.Tensor:
            with torch.no_grad():
                fixed = anchor.encode_text(target.input_ids, target.attention_mask)
            return clip_loss(trainable.encode_text(enc.input_ids, enc.attention_mask), fixed, 100.0)
        return _train_step(trainable, loss, p)

    p.run("RTD (CLIP text encoder: trainable copy + frozen anchor)", sizes.rtd_batch, rtd, sizes)

    p.run(f"gallery encoding, CLIP image tower at {clip.image_size} px", sizes.gallery_batch,
          lambda: _encode_images(clip, sizes.gallery_batch, p), sizes)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="shrunken sizes on the CPU (under a minute)")
    parser.add_argument("--out", type=Path, help="write the rows as JSON here")
    parser.add_argument("--budget", type=float, help="total seconds (default: 450 real, 60 tiny)")
    parser.add_argument("--row-budget", type=float, help="seconds per row (default: 60 real, 15 tiny)")
    args = parser.parse_args(argv)
    sizes = TINY if args.tiny else REAL
    device = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    torch.manual_seed(0)
    start = time.perf_counter()
    budget = args.budget if args.budget is not None else (60 if args.tiny else 450)
    row_budget = args.row_budget if args.row_budget is not None else (15 if args.tiny else 60)
    p = profile(sizes, device, budget, row_budget)
    device_name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"real-size profile ({'tiny' if args.tiny else 'real'} sizes) on {device_name}, "
          f"{'bf16 autocast' if p.bf16 else 'fp32'}, {time.perf_counter() - start:.0f} s")
    print(p.table())
    if args.out:
        args.out.write_text(json.dumps({"device": device_name, "tiny": args.tiny, "bf16": p.bf16,
                                        "rows": [asdict(r) for r in p.rows]}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
