"""Does a Bi-BLIP4CIR stage-I model tell [FORWARD] from [BACKWARD]?

For a stage-I model folder it prints: how far the two direction-token embeddings moved from their
shared initialisation (the mean row of the vocabulary) and from each other, relative to a typical
row; on test queries, the cosine between the forward and the backward text feature of the same
text, and their norms (the sum query is dominated by the text when it is much longer than the image's);
and backward R@1 on test with the text scaled by alpha, normalize(normalize(T) + alpha t_backward):
alpha = 0 is the target image alone, alpha = 1 the query stage I trained on. Where R@1 falls as
soon as alpha > 0, the backward text moves the query away from the reference at any weight.

    python experiments/diagnose_direction.py --model runs/demo/bi-text/model --data runs/demo/shapes
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F

import cirlab
from cirlab.composers import BACKWARD, FORWARD, SumComposer, with_direction
from cirlab.data.registry import load_split
from cirlab.data.torch_data import default_text
from cirlab.composers.vectors import gallery_vectors, query_vectors, split_features
from cirlab.evaluation.evaluate import reversed_split
from cirlab.evaluation.protocols import evaluate_similarity
from cirlab.models.tokenizer import token_id
from cirlab.features.similarity import dot_similarity

ALPHAS = (0.0, 0.05, 0.1, 0.2, 0.5, 1.0)


class BackwardParts(SumComposer):
    """Stage I's sum composer whose backward "query" is its two parts side by side,
    [normalize(T), t_backward], so that a sweep encodes every text once."""

    def __init__(self, composer: SumComposer):
        super().__init__(composer.backbone, composer.recipe)

    def compose(self, references: torch.Tensor, texts: list[str], *, forward: bool = True) -> torch.Tensor:
        return torch.cat([F.normalize(references, dim=-1), self.encode_text(texts, forward)], dim=-1)


@torch.no_grad()
def backward_sweep(composer: SumComposer, split, alphas=ALPHAS) -> dict[float, float]:
    """Backward R@1 on ``split`` at each text weight alpha: normalize(normalize(T) + alpha t_backward)."""
    back = reversed_split(split)
    feats = split_features(composer, back)
    parts = query_vectors(BackwardParts(composer), back, feats, forward=False)
    image, text = parts.chunk(2, dim=-1)
    gallery = gallery_vectors(composer, back, feats)
    return {alpha: evaluate_similarity(back, dot_similarity(F.normalize(image + alpha * text, dim=-1), gallery).cpu())["R@1"]
            for alpha in alphas}


@torch.no_grad()
def diagnose(composer, split, n: int) -> dict[str, float]:
    bb = composer.backbone
    emb = bb.input_embeddings.weight.float()
    f, b = (emb[token_id(bb.tokenizer, t)] for t in (FORWARD, BACKWARD))
    special = {token_id(bb.tokenizer, t) for t in (FORWARD, BACKWARD)}
    rest = emb[[i for i in range(emb.shape[0]) if i not in special]]
    init, row = rest.mean(0), rest.norm(dim=1).mean()
    texts = [default_text(q, False) for q in split.queries[:n]]
    mode = composer.recipe.direction

    def encode(forward: bool) -> torch.Tensor:
        enc = bb.tokenize([with_direction(t, forward, mode) for t in texts], max_length=composer.recipe.max_text_length)
        return bb.encode_text(enc.input_ids.to(composer.device), enc.attention_mask.to(composer.device)).float()

    tf, tb = encode(True), encode(False)
    return {"|e_fwd - e_bwd| / row": float((f - b).norm() / row), "|e_bwd - init| / row": float((b - init).norm() / row),
            "|e_fwd - init| / row": float((f - init).norm() / row),
            "cos(text fwd, text bwd)": float(F.cosine_similarity(tf, tb).mean()),
            "|text fwd|": float(tf.norm(dim=1).mean()), "|text bwd|": float(tb.norm(dim=1).mean())}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, required=True, help="a Bi-BLIP4CIR stage-I model folder")
    p.add_argument("--data", type=Path, required=True, help="shapes root")
    p.add_argument("--queries", type=int, default=500)
    args = p.parse_args()
    composer = cirlab.load(args.model)
    split = load_split("shapes", args.data, "test")
    print("  ".join(f"{k} {v:.3f}" for k, v in diagnose(composer, split, args.queries).items()))
    if isinstance(composer, SumComposer) and composer.recipe.backward_target == "normalized":
        sweep = backward_sweep(composer, split)
        print("backward R@1 by text weight alpha: " + "  ".join(f"{a:g}: {r:.2f}" for a, r in sweep.items()))


if __name__ == "__main__":
    main()
