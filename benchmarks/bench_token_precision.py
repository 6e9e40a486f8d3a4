"""What storing cached image tokens in float16 changes, against float32 (the official code's).

The feature cache stores token sequences (BLIP ViT: 577 x 768 per image) in float16 by default
(``data.token_dtype``); the grounded filter, the re-ranker and SPN over them read those tokens.
Two measurements:

* ``--model DIR --root ROOT``: a trained model on a benchmark split, evaluated twice, with the
  token cache in float16 and in float32: every metric of every row, and how many queries change
  their top 1 / top 10;
* ``--real-size N``: BLIP ViT-B/16 at 384 px with BERT-base (random weights, LayerNorms
  perturbed), N generated images of real size, N x 2 grounded queries and the re-ranker over the
  top 10: max |difference| of the unit query and gallery vectors and of the re-ranker's scores,
  and top-1 / top-10 changes.

    python benchmarks/bench_token_precision.py --model runs/demo/rerank-reranker/model \\
        --root runs/demo/shapes --split test
    python benchmarks/bench_token_precision.py --real-size 48
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

import cirlab
from cirlab.composers import GroundedComposer, QueryRecipe
from cirlab.data.registry import load_splits
from cirlab.evaluation.evaluate import evaluate_composer
from cirlab.models import blip_base_config, build_backbone
from cirlab.models.dual_encoder import DualEncoderReranker

CAPTIONS = ["show three bottles of soft drink", "Fewer paper towels per pack", "same breed dog, focus on its head",
            "two dogs of the same breed on the floor", "is shiny and silver with shorter sleeves and fit and flare",
            "is grey with black design and is a light printed short dress"]


def changed(a: list[list[str]], b: list[list[str]], k: int) -> int:
    return sum(x[:k] != y[:k] for x, y in zip(a, b))


def on_model(args: argparse.Namespace) -> dict:
    composer = cirlab.load(args.model)
    splits = load_splits(args.dataset, args.root, args.split)
    runs = {dtype: evaluate_composer(composer, splits, token_dtype=dtype, max_queries=args.max_queries)
            for dtype in ("float32", "float16")}
    out = {"model": str(args.model), "split": args.split, "rows": {}}
    for row, metrics in runs["float32"].metrics.items():
        half = runs["float16"].metrics[row]
        ranked32 = [ids for r, _ in runs["float32"].rankings.get(row, []) for ids in r.values()]
        ranked16 = [ids for r, _ in runs["float16"].rankings.get(row, []) for ids in r.values()]
        out["rows"][row] = {"queries": len(ranked32), "top1_changed": changed(ranked32, ranked16, 1),
                            "top10_changed": changed(ranked32, ranked16, 10),
                            "delta": {k: round(half[k] - v, 4) for k, v in metrics.items()},
                            "float32": metrics}
    return out


def images(n: int, seed: int = 0) -> list[Image.Image]:
    """Photos-like test images of varied sizes: smooth colour fields with a few shapes."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        w, h = int(rng.integers(300, 1000)), int(rng.integers(300, 1000))
        base = Image.fromarray(rng.integers(0, 255, (h // 32 + 2, w // 32 + 2, 3), dtype=np.uint8)).resize((w, h))
        draw = ImageDraw.Draw(base)
        for _ in range(5):
            x, y = int(rng.integers(0, w - 40)), int(rng.integers(0, h - 40))
            draw.ellipse([x, y, x + int(rng.integers(20, w // 2)), y + int(rng.integers(20, h // 2))],
                         fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
        out.append(base)
    return out


def perturbed_blip(seed: int = 0):
    torch.manual_seed(seed)
    backbone = build_backbone(blip_base_config())
    with torch.no_grad():
        for m in backbone.modules():
            if isinstance(m, torch.nn.LayerNorm):
                m.weight.add_(0.1 * torch.randn_like(m.weight))
                m.bias.add_(0.1 * torch.randn_like(m.bias))
    return backbone.eval()


@torch.no_grad()
def real_size(n: int) -> dict:
    backbone = perturbed_blip()
    composer = GroundedComposer(backbone, QueryRecipe())
    t0 = time.perf_counter()
    photos = images(n)
    tokens = torch.cat([composer.image_features(photos[s:s + 8], ["tokens"])["tokens"] for s in range(0, n, 8)])
    encode_s = time.perf_counter() - t0
    half = tokens.half().float()
    texts = [CAPTIONS[i % len(CAPTIONS)] for i in range(2 * n)]
    refs = torch.arange(2 * n) % n
    out: dict = {"images": n, "queries": 2 * n, "encode_s_per_image": round(encode_s / n, 2),
                 "token_abs_max": float(tokens.abs().max()), "token_round_max": float((tokens - half).abs().max())}
    q32, q16 = (composer.encode_queries(t[refs], texts) for t in (tokens, half))
    g32, g16 = (composer.encode_gallery(t[:, :1]) for t in (tokens, half))
    s32, s16 = q32 @ g32.T, q16 @ g16.T
    top32, top16 = s32.topk(10).indices, s16.topk(10).indices
    out.update(query_max_diff=float((q32 - q16).abs().max()), gallery_max_diff=float((g32 - g16).abs().max()),
               score_max_diff=float((s32 - s16).abs().max()),
               top1_changed=int((top32[:, 0] != top16[:, 0]).sum()),
               top10_changed=int((top32 != top16).any(1).sum()))
    reranker = DualEncoderReranker.from_text_encoder(backbone.text_encoder, enc_token_id=backbone.enc_token_id).eval()
    enc = backbone.tokenize(texts[:n])
    scores = []
    for t in (tokens, half):
        z_t = backbone.encode_grounded(enc.input_ids, enc.attention_mask, t[refs[:n]])
        scores.append(reranker.topk_scores(z_t, enc.input_ids, enc.attention_mask, t[top32[:n]], chunk_size=40))
    out.update(rerank_score_max_diff=float((scores[0] - scores[1]).abs().max()),
               rerank_score_scale=float(scores[0].std()),
               rerank_top1_changed=int((scores[0].argmax(1) != scores[1].argmax(1)).sum()),
               rerank_order_changed=int((scores[0].argsort(1) != scores[1].argsort(1)).any(1).sum()))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path)
    parser.add_argument("--dataset", default="shapes")
    parser.add_argument("--root", type=Path, default=Path("runs/demo/shapes"))
    parser.add_argument("--split", default="test")
    parser.add_argument("--max-queries", type=int)
    parser.add_argument("--real-size", type=int, metavar="N", help="N real-size images instead of a model")
    args = parser.parse_args()
    result = real_size(args.real_size) if args.real_size else on_model(args)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
