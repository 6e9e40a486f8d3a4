"""Why does a projection model (Pic2Word / LinCIR style, or RTD on top) rank as it does on shapes?

Evaluates the model's Phi and text encoder under several prompts on shapes test (all queries):
the pseudo-word alone ("a photo of $": how much of the reference Phi carries), the official
prompt, and the text without the "a photo of ... that" frame; plus how well Phi inverts the
image: its pseudo-word in "a photo of $" retrieving the reference image itself.

``--oti STEPS`` separates the pseudo-word's capacity from Phi: a free pseudo-word per reference
is optimised (SEARLE's optimisation-based textual inversion, without its GPT regulariser) so that
"a photo of $" retrieves that reference among the whole gallery; then those words stand in for
Phi in the same prompts. If they invert far better than Phi, one token is not the limit; if
they compose worse than the pseudo-word alone, the text encoder does not compose a pseudo-word
with a modification text. The caption oracles put the scene's true reference caption where the
pseudo-word would go: the best any pseudo-word could carry, so a ceiling for the prompt itself.

    python experiments/diagnose_projection.py --model <run>/model --root runs/demo/shapes [--oti 300]
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import torch
import torch.nn.functional as F

import cirlab
from cirlab.composers import ProjectionComposer, ZeroShotComposer
from cirlab.data.base import Query
from cirlab.data.registry import load_split
from cirlab.composers.vectors import split_features
from cirlab.evaluation.evaluate import evaluate_composer
from cirlab.models.phi import Phi

PROMPTS = {"official: a photo of $ that {text}": "a photo of $ that {text}",
           "pseudo-word alone: a photo of $": "a photo of $",
           "no frame: $ {text}": "$ {text}"}


class WordTable(Phi):
    """A "Phi" that looks up a fixed pseudo-word per known image embedding (exact match)."""

    def __init__(self, embeds: torch.Tensor, words: torch.Tensor):
        super().__init__("pic2word", embeds.shape[1], words.shape[1])
        self.embeds, self.words = embeds, words

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.words[torch.cdist(x.float(), self.embeds).argmin(dim=1)]


def invert(model: ProjectionComposer, gallery: torch.Tensor, rows: torch.Tensor, steps: int,
           batch: int = 512, lr: float = 2e-2) -> torch.Tensor:
    """One free pseudo-word per row of ``rows``: "a photo of $" must retrieve gallery[row] among the
    whole (normalised) gallery, cross-entropy at the backbone's logit scale. Starts at the mean word."""
    backbone = model.backbone
    enc = backbone.tokenize(["a photo of $"], max_length=model.recipe.max_text_length)  # not the recipe's prompt
    scale = float(backbone.model.logit_scale.exp().clamp(max=100))
    start = backbone.text_encoder.embeddings.token_embedding.weight.mean(0)
    words = (start + 0.02 * torch.randn(len(rows), len(start))).requires_grad_(True)
    opt = torch.optim.Adam([words], lr=lr)
    for _ in range(steps):
        b = torch.randperm(len(rows))[:batch]
        out = backbone.encode_text_with_pseudo(enc.input_ids.expand(len(b), -1), enc.attention_mask.expand(len(b), -1),
                                               words[b], model.marker_id)
        loss = F.cross_entropy(scale * F.normalize(out.float(), dim=-1) @ gallery.T, rows[b])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return words.detach()


ORACLES = {"caption oracle: a photo of {reference caption} that {text}": "a photo of {reference} that {text}",
           "caption oracle: {reference caption} {text}": "{reference} {text}",
           "caption oracle: {reference caption} alone": "{reference}",
           "caption oracle: {target caption}": "{target}"}


def caption_oracles(model: ProjectionComposer, split) -> dict[str, dict[str, float]]:
    """The plain text encoder (no pseudo-word, no prompt) on the ORACLES texts, through the one
    evaluation path: a text-only zero-shot composer over queries whose text is the oracle's."""
    text_only = ZeroShotComposer(model.backbone, dataclasses.replace(model.recipe, prompt="{text}"), mode="text").eval()
    out = {}
    for name, form in ORACLES.items():
        queries = [dataclasses.replace(q, captions=(form.format(reference=q.extra["reference_caption"],
                                                                target=q.extra["target_caption"], text=q.captions[0]),))
                   for q in split.queries]
        out[name] = evaluate_composer(text_only, [dataclasses.replace(split, queries=queries)]).metrics[text_only.name]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, type=Path)
    p.add_argument("--root", required=True, type=Path)
    p.add_argument("--split", default="test")
    p.add_argument("--oti", type=int, default=0, metavar="STEPS", help="also optimise a free pseudo-word per "
                   "reference for STEPS steps and evaluate the prompts with them")
    args = p.parse_args()
    model = cirlab.load(args.model)
    if not isinstance(model, ProjectionComposer):
        raise SystemExit(f"{args.model} is a {model.kind} model, not a projection one")
    split = load_split("shapes", args.root, args.split)
    print(f"{args.model} on {split.name} ({len(split.queries)} queries)\n")
    print("| query | R@1 | R@5 | R@10 | R@50 |\n|---|---:|---:|---:|---:|")
    for name, prompt in PROMPTS.items():
        variant = ProjectionComposer(model.backbone, dataclasses.replace(model.recipe, prompt=prompt), model.phi).eval()
        m = evaluate_composer(variant, [split]).metrics[variant.name]
        print(f"| {name} | {m['R@1']:.2f} | {m['R@5']:.2f} | {m['R@10']:.2f} | {m['R@50']:.2f} |")
    if all("reference_caption" in q.extra for q in split.queries):  # the shapes generator's scene captions
        for name, m in caption_oracles(model, split).items():
            print(f"| {name} | {m['R@1']:.2f} | {m['R@5']:.2f} | {m['R@10']:.2f} | {m['R@50']:.2f} |")
    # inversion: "a photo of $" with $ = Phi(image) should retrieve that very image
    refs = list(dict.fromkeys(q.reference for q in split.queries))
    inversion = dataclasses.replace(split, queries=[Query(qid=str(n), reference=r, captions=("",), target=r,
                                                          positives=(r,)) for n, r in enumerate(refs)],
                                    exclude_reference=False, name=f"{split.name}/inversion")
    variant = ProjectionComposer(model.backbone, dataclasses.replace(model.recipe, prompt="a photo of $"),
                                 model.phi).eval()
    m = evaluate_composer(variant, [inversion]).metrics[variant.name]
    print(f"| inversion: a photo of $ -> the reference itself ({len(refs)} images) | {m['R@1']:.2f} | {m['R@5']:.2f} "
          f"| {m['R@10']:.2f} | {m['R@50']:.2f} |")
    if args.oti:
        feats = split_features(model, split)
        gallery = F.normalize(feats["embeds"].float(), dim=-1)
        rows = torch.tensor([feats.index_of(r) for r in refs])
        torch.manual_seed(0)
        with torch.enable_grad():
            words = invert(model.eval().requires_grad_(False), gallery, rows, args.oti)
        table = WordTable(feats["embeds"].float()[rows], words)
        for name, (prompt, queries) in {"OTI inversion: a photo of $ -> the reference itself": ("a photo of $", inversion),
                                        "OTI words: a photo of $ that {text}": (PROMPTS[next(iter(PROMPTS))], split),
                                        "OTI words alone: a photo of $": ("a photo of $", split)}.items():
            variant = ProjectionComposer(model.backbone, dataclasses.replace(model.recipe, prompt=prompt), table).eval()
            m = evaluate_composer(variant, [queries]).metrics[variant.name]
            print(f"| {name} ({args.oti} steps) | {m['R@1']:.2f} | {m['R@5']:.2f} | {m['R@10']:.2f} | {m['R@50']:.2f} |")


if __name__ == "__main__":
    with torch.no_grad():
        main()
