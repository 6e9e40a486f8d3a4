"""Which inputs let a re-ranker pick the target among a filter's top K?  A probe on cached tokens.

A re-ranker sees the query (z_t: the filter's grounded text states, which carry the reference
only as the filter read it) and one candidate. This script trains a small scorer from scratch,
listwise over each training query's top ``--train-k`` filter candidates (queries whose target is
among them), on one of three inputs, and reports how often it puts a positive first among the
test queries' top ``--test-k`` (again over queries whose list holds a positive), beside the
filter and a random order on the same lists:

* ``cand``: z_t + the candidate's tokens (what the paper's re-ranker cross-attends to);
* ``both``: z_t + the reference's and the candidate's tokens (shared position embeddings);
* ``diff``: z_t + the candidate's tokens minus the reference's, position by position.

The scorer is one pre-LayerNorm transformer layer (width 128) over the concatenated sequence,
score = a linear head on position 0; AdamW lr 5e-4, 16 lists per step. It needs no BLIP forward
per step, so a mode costs about 3 minutes on 2 cores.

    python experiments/probe_rerank_inputs.py --model <filter run>/model --data runs/demo/shapes
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import cirlab
from cirlab.data.registry import load_split
from cirlab.composers.vectors import query_texts, similarity, split_features
from cirlab.evaluation.evaluate import candidates_of

MODES = ("cand", "both", "diff")


@torch.no_grad()
def candidate_lists(composer, root: Path, split_name: str, k: int, max_text: int = 32) -> dict:
    """The split's queries whose filter top ``k`` holds their target: z_t, reference tokens,
    candidate rows, the target's position, which candidates are positives, stage-I cosines."""
    split = load_split("shapes", root, split_name)
    feats = split_features(composer, split)
    top = candidates_of(split, similarity(composer, split, feats), k)
    tokens = feats["tokens"]
    gallery_rows = torch.tensor([feats.index_of(i) for i in split.gallery])
    where = {g: j for j, g in enumerate(split.gallery)}
    keep, labels, positives = [], [], []
    for i, q in enumerate(split.queries):
        order = top.indices[i].tolist()
        if where[q.target] in order:
            good = {where[p] for p in (q.positives or (q.target,))}
            keep.append(i)
            labels.append(order.index(where[q.target]))
            positives.append([j in good for j in order])
    texts, _ = query_texts(composer, split.queries, True)
    ref_rows = torch.tensor([feats.index_of(split.queries[i].reference) for i in keep])
    z = torch.zeros(len(keep), max_text, composer.backbone.text_encoder.config.hidden_size)
    mask = torch.zeros(len(keep), max_text, dtype=torch.bool)
    for s in range(0, len(keep), 256):
        refs = tokens.index_select(0, ref_rows[s:s + 256]).float()
        states, _, m = composer.grounded_states(refs, [texts[i] for i in keep[s:s + 256]])
        z[s:s + len(refs), :states.shape[1]] = states.float()
        mask[s:s + len(refs), :states.shape[1]] = m.bool()
    data = {"z": z, "mask": mask, "ref": tokens.index_select(0, ref_rows).float(), "tokens": tokens,
            "cand": gallery_rows[top.indices[keep].long()], "label": torch.tensor(labels),
            "positive": torch.tensor(positives), "stage1": top.scores[keep].float()}
    print(f"{split_name}: {len(keep)} of {len(split.queries)} queries have their target in the filter's top {k}; "
          f"on them the filter's R@1 is {100 * data['positive'][:, 0].float().mean():.2f}, "
          f"a random order's {100 * data['positive'].float().mean():.2f}", flush=True)
    return data


class Probe(nn.Module):
    def __init__(self, text_dim: int, image_dim: int, image_len: int, mode: str, width: int = 128):
        super().__init__()
        self.mode = mode
        self.text, self.image = nn.Linear(text_dim, width), nn.Linear(image_dim, width)
        self.segment = nn.Embedding(3, width)
        self.position = nn.Parameter(torch.randn(image_len, width) * 0.02)
        self.encoder = nn.TransformerEncoderLayer(width, 4, 4 * width, 0.1, batch_first=True, norm_first=True)
        self.head = nn.Linear(width, 1)

    def forward(self, z, mask, ref, cand):
        b, k, n = cand.shape[:3]
        image = cand - ref[:, None] if self.mode == "diff" else cand
        parts = [(self.text(z) + self.segment.weight[0])[:, None].expand(b, k, -1, -1),
                 self.image(image) + self.position + self.segment.weight[1]]
        valid = [mask[:, None].expand(b, k, -1), torch.ones(b, k, n, dtype=torch.bool)]
        if self.mode == "both":
            parts.append((self.image(ref) + self.position + self.segment.weight[2])[:, None].expand(b, k, -1, -1))
            valid.append(torch.ones(b, k, n, dtype=torch.bool))
        out = self.encoder(torch.cat(parts, 2).flatten(0, 1), src_key_padding_mask=~torch.cat(valid, 2).flatten(0, 1))
        return self.head(out[:, 0]).view(b, k)


def inputs(data: dict, idx: torch.Tensor) -> tuple[torch.Tensor, ...]:
    t = data["tokens"]
    cand = t.index_select(0, data["cand"][idx].flatten()).float().view(len(idx), -1, *t.shape[1:])
    return data["z"][idx], data["mask"][idx], data["ref"][idx], cand


@torch.no_grad()
def list_r1(net: Probe, data: dict, n: int | None = None, residual_scale: float = 1 / 0.07) -> tuple[float, float]:
    """(R@1 of the probe's order, R@1 of stage-I cosine x residual_scale + the probe's score)."""
    net.eval()
    n = n or len(data["label"])
    hits = torch.zeros(2)
    for s in range(0, n, 128):
        idx = torch.arange(s, min(s + 128, n))
        score = net(*inputs(data, idx))
        for j, sc in enumerate((score, score + residual_scale * data["stage1"][idx])):
            hits[j] += data["positive"][idx, sc.argmax(1)].float().sum()
    net.train()
    return tuple((100 * hits / n).tolist())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, required=True, help="a filter model folder (<filter run>/model)")
    p.add_argument("--data", type=Path, required=True, help="shapes root")
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--train-k", type=int, default=8)
    p.add_argument("--test-k", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    composer = cirlab.load(args.model)
    train = candidate_lists(composer, args.data, "train", args.train_k)
    test = candidate_lists(composer, args.data, "test", args.test_k)
    for mode in args.modes:
        torch.manual_seed(args.seed)
        net = Probe(train["z"].shape[-1], train["ref"].shape[-1], train["ref"].shape[1], mode)
        opt = torch.optim.AdamW(net.parameters(), lr=5e-4, weight_decay=0.01)
        start, smooth = time.time(), None
        for step in range(1, args.steps + 1):
            idx = torch.randint(0, len(train["label"]), (16,))
            loss = F.cross_entropy(net(*inputs(train, idx)), train["label"][idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            smooth = loss.item() if smooth is None else 0.98 * smooth + 0.02 * loss.item()
            if step % 250 == 0 or step == args.steps:
                seen, _ = list_r1(net, train, 1000)
                r1, fused = list_r1(net, test)
                print(f"{mode} step {step}: loss {smooth:.3f}  train lists R@1 {seen:.1f}  test lists R@1 {r1:.2f} "
                      f"(+ stage I {fused:.2f})  {time.time() - start:.0f} s", flush=True)


if __name__ == "__main__":
    main()
