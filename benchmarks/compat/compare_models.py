"""Imported official models against the official code, at real size: the figures of docs/compat.md.

``official_blip.py`` and ``official_clip.py`` (run in the reference environment, see
``make_refenv.sh``) build each official model at its real architecture with seeded random weights,
save it in the released checkpoint's layout (``<compat>/ckpt``) and record the official outputs on
8 images and their texts (``<compat>/ref/<kind>.pt``). This script, in cirlab's own environment,
imports each checkpoint with ``cirlab import`` (the Python API of the same importers), loads the
folder with ``cirlab.load`` and computes the same outputs through the composer:

* ``pixels``: cirlab's preprocessing of the 8 images against the official transform's;
* ``image``: the unit gallery vectors, from cirlab's own pixels (``image_own_pixels``) and from the
  official pixels (``image``: the model alone);
* ``query``: the unit composed query vectors of (image i, text i), texts built by cirlab's recipe
  from the raw captions, on the official pixels; ``fiq_query`` the same for FashionIQ caption pairs;
* ``scores`` (the re-ranker: raw logits) and ``ranking_equal``: every query's ranking of the 8
  images identical (more than the top 10 the acceptance asks: the gallery has 8 images).

    python benchmarks/compat/compare_models.py --compat /work/scratch/compat --work /work/scratch/imported \\
        [--kinds blip bi-blip4cir ...] [--json docs/compat_models.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F

import cirlab
from cirlab import importers
from cirlab.composers import Composer

TOLERANCE = 1e-4


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


def unit(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x.float(), dim=-1)


def rankings_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return bool(torch.equal(a.argsort(dim=1, descending=True), b.argsort(dim=1, descending=True)))


def query_vectors(composer: Composer, references: torch.Tensor, captions: list) -> torch.Tensor:
    """Each query's text(s) by the composer's recipe (FashionIQ pairs: its caption rule, two texts
    averaged as the evaluation does)."""
    out = []
    for ref, caption in zip(references, captions):
        texts = composer.recipe.query_texts([caption] if isinstance(caption, str) else caption)
        vectors = [composer.encode_queries(ref[None], [t]) for t in texts]
        out.append(vectors[0] if len(vectors) == 1 else unit(sum(vectors)))
    return torch.cat(out)


class Case:
    def __init__(self, compat: Path, work: Path, kind: str):
        self.compat, self.work, self.kind = compat, work, kind
        inputs = json.loads((compat / "inputs" / "inputs.json").read_text())
        self.images = [compat / "inputs" / name for name in inputs["images"]]
        self.cirr, self.fiq = inputs["cirr_captions"], inputs["fiq_captions"]
        self.ref = torch.load(compat / "ref" / f"{kind}.pt", map_location="cpu", weights_only=False)

    def folder(self, name: str, make) -> Path:
        out = self.work / name
        if not out.is_dir():
            make(out)
        return out

    def common(self, composer: Composer, official_pixels: torch.Tensor, image_features: torch.Tensor,
               own_image: torch.Tensor | None = None) -> dict:
        pixels = composer.pixels(self.images)
        result = {"pixels": max_diff(pixels, official_pixels)}
        gallery = composer.encode_gallery(official_pixels)
        result["image"] = max_diff(gallery, unit(image_features))
        result["image_own_pixels"] = max_diff(composer.encode_gallery(pixels), unit(image_features))
        return result, gallery


def blip(case: Case) -> dict:
    src = case.compat / "ckpt" / "blip-base" / "model_base.pth"
    composer = cirlab.load(case.folder("blip-base", lambda out: importers.import_blip(src, out)))
    ref = case.ref
    result, gallery = case.common(composer, ref["pixels"], ref["image_features"])
    backbone = composer.backbone
    enc = backbone.tokenize(ref["texts"])
    with torch.no_grad():
        text = unit(backbone.encode_text(enc.input_ids, enc.attention_mask))
        tokens = composer.image_features(ref["pixels"], ["tokens"])["tokens"]
        grounded = unit(backbone.grounded_embeds(enc.input_ids, enc.attention_mask, tokens))
    ours = [row[m.bool()].tolist() for row, m in zip(enc.input_ids, enc.attention_mask)]
    theirs = [row[m.bool()].tolist() for row, m in zip(ref["input_ids"], ref["attention_mask"])]
    result.update(ids_equal=ours == theirs, text=max_diff(text, ref["text_features"]),
                  query=max_diff(grounded, ref["grounded_features"]),
                  ranking_equal=rankings_equal(gallery @ text.T, ref["scores"]))
    result["zero_shot_default"] = composer.kind + "/" + composer.name
    return result


def bi_blip4cir(case: Case) -> dict:
    base = case.compat / "ckpt" / "bi-blip4cir" / "saved_models"
    blip_ckpt = case.compat / "ckpt" / "blip-base" / "model_base.pth"
    ref = case.ref
    out = {}
    for stage, combiner, key in (("stage1", None, "query_features"), ("stage2", base / "combiner_mean.pt",
                                                                      "query_features_stage2")):
        folder = case.folder(f"bi-blip4cir-{stage}", lambda o: importers.import_bi_blip4cir(
            base / "tuned_blip_mean.pt", o, blip=blip_ckpt, combiner=combiner))
        composer = cirlab.load(folder)
        result, gallery = case.common(composer, ref["pixels"], ref["image_features"])
        query = query_vectors(composer, ref["pixels"], case.cirr)
        fiq = query_vectors(composer, ref["pixels"], case.fiq)
        result.update(query=max_diff(query, ref[key]), fiq_query=max_diff(fiq, ref["fiq"][key]),
                      ranking_equal=rankings_equal(query @ gallery.T, ref["scores" if stage == "stage1" else "scores_stage2"]))
        out[stage] = result
    return out


def grounded(case: Case, make) -> dict:
    composer = cirlab.load(case.folder(case.kind, make))
    ref = case.ref
    result, gallery = case.common(composer, ref["pixels"], ref["image_features"])
    query = query_vectors(composer, ref["pixels"], case.cirr)
    fiq = query_vectors(composer, ref["pixels"], case.fiq)
    result.update(query=max_diff(query, ref["query_features"]), fiq_query=max_diff(fiq, ref["fiq"]["query_features"]),
                  ranking_equal=rankings_equal(query @ gallery.T, ref["scores"]))
    return result


def rerank_stage1(case: Case) -> dict:
    src = case.compat / "ckpt" / "rerank-stage1" / "saved_models" / "blip_mean.pt"
    return grounded(case, lambda out: importers.import_rerank_stage1(src, out))


def spn_blip4cir(case: Case) -> dict:
    src = case.compat / "ckpt" / "spn-blip4cir" / "best.pt"
    return grounded(case, lambda out: importers.import_spn_blip4cir(src, out))


def rerank_stage2(case: Case) -> dict:
    stage1 = case.compat / "ckpt" / "rerank-stage1" / "saved_models" / "blip_mean.pt"
    stage2 = case.compat / "ckpt" / "rerank-stage2" / "saved_models" / "blip_mean.pt"
    composer = cirlab.load(case.folder("rerank-stage2", lambda out: importers.import_rerank_stage2(
        stage2, out, stage1=stage1, k=50)))
    ref = case.ref
    tokens = composer.image_features(ref["pixels"], ["tokens"])["tokens"]
    n = len(tokens)
    scores = composer.rerank(tokens, case.cirr, tokens[None].expand(n, *tokens.shape))
    index = {name: i for i, name in enumerate(ref["image_names"])}
    members = torch.stack([tokens[torch.tensor([index[m] for m in row])] for row in ref["group_members_noref"]])
    group = composer.rerank(tokens, case.cirr, members)
    return {"pixels": max_diff(composer.pixels(case.images), ref["pixels"]),
            "tokens": max_diff(tokens, ref["vit_last_hidden"]), "scores": max_diff(scores, ref["scores"]),
            "group_scores": max_diff(group, ref["group_scores"]), "score_scale": float(ref["scores"].abs().max()),
            "ranking_equal": rankings_equal(scores, ref["scores"]) and rankings_equal(group, ref["group_scores"])}


def projection(case: Case, method: str) -> dict:
    ckpt = case.compat / "ckpt"
    clip = ckpt / "clip-vit-large-patch14-hf"
    sources = {"lincir": dict(phi=ckpt / "lincir" / "phi_best.pt"),
               "searle": dict(phi=ckpt / "searle" / "SEARLE_ViT-L14.pt"),
               "pic2word": dict(phi=ckpt / "pic2word" / "pic2word_model.pt"),
               "rtd": dict(phi=ckpt / "lincir" / "phi_best.pt", text_encoder=ckpt / "rtd" / "text_encoder_best.pt")}[method]
    folder = case.folder(method, lambda out: importers.import_projection(
        sources["phi"], clip, out, text_encoder=sources.get("text_encoder"), method=method))
    composer = cirlab.load(folder)
    ref = case.ref
    result, gallery = case.common(composer, ref["pixels"], ref["image_features"])
    with torch.no_grad():
        embeds = composer.image_features(ref["pixels"], ["embeds"])["embeds"]
        pseudo = composer.pseudo_words(embeds)
    result["pseudo_tokens"] = max_diff(pseudo, ref["pseudo_tokens"])
    query = query_vectors(composer, ref["pixels"], case.cirr)
    fiq = query_vectors(composer, ref["pixels"], case.fiq)
    result.update(query=max_diff(query, ref["query_features"]), fiq_query=max_diff(fiq, ref["fiq_query_features"]),
                  ranking_equal=rankings_equal(query @ gallery.T, ref["scores"]["cirr"]))
    return result


KINDS = {"blip": ("blip-base", blip), "bi-blip4cir": ("bi-blip4cir", bi_blip4cir),
         "rerank-stage1": ("rerank-stage1", rerank_stage1), "rerank-stage2": ("rerank-stage2", rerank_stage2),
         "spn-blip4cir": ("spn-blip4cir", spn_blip4cir),
         **{m: (m, lambda case, m=m: projection(case, m)) for m in ("pic2word", "searle", "lincir", "rtd")}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--compat", type=Path, required=True, help="the official side's folder (ckpt/, ref/, inputs/)")
    parser.add_argument("--work", type=Path, required=True, help="where the imported folders go")
    parser.add_argument("--kinds", nargs="+", choices=list(KINDS), default=list(KINDS))
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    torch.manual_seed(0)
    results = {}
    for kind in args.kinds:
        ref_name, compare = KINDS[kind]
        with torch.no_grad():
            results[kind] = compare(Case(args.compat, args.work, ref_name))
        print(kind, json.dumps(results[kind]), flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
