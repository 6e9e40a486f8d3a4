"""Why does a projection model (Pic2Word / LinCIR style, or RTD on top) rank as it does on shapes?

Evaluates the model's Phi and text encoder under several prompts on shapes test (all queries):
the pseudo-word alone ("a photo of $": how much of the reference Phi carries), the official
prompt, and the text without the "a photo of ... that" frame; plus how well Phi inverts the
image: its pseudo-word in "a photo of $" retrieving the reference image itself.

    python experiments/diagnose_projection.py --model <run>/model --root runs/demo/shapes
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import torch

import cirlab
from cirlab.composers import ProjectionComposer
from cirlab.data.base import Query
from cirlab.data.registry import load_split
from cirlab.evaluation.evaluate import evaluate_composer

PROMPTS = {"official: a photo of $ that {text}": "a photo of $ that {text}",
           "pseudo-word alone: a photo of $": "a photo of $",
           "no frame: $ {text}": "$ {text}"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, type=Path)
    p.add_argument("--root", required=True, type=Path)
    p.add_argument("--split", default="test")
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


if __name__ == "__main__":
    with torch.no_grad():
        main()
