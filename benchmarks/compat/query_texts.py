"""The query-text audit: the exact text and token ids cirlab feeds each model, query by query.

For every query of FashionIQ val (6,016) and CIRR val (4,181) and every recipe cirlab ships or
imports, this runs cirlab's own evaluation path (:func:`cirlab.evaluation.evaluate.query_vectors`,
and the re-ranker's :func:`~cirlab.evaluation.evaluate.rerank_scores`) on a tiny model that carries
the real tokenizer, and records what reaches the model: the text handed to the tokenizer and the
ids that enter the word-embedding layer (after any ``[ENC]`` edit; padding removed). The recipe of
each row comes from the shipped config (or importer) that makes such a model, so the audit sees
what a user runs.

``write`` writes ``<out>/<recipe>.<dataset>.jsonl`` (``{"qid", "texts", "ids"}`` per query, the
format of ``official_texts.py``, which records the official repositories' side); ``compare``
counts, per recipe and dataset, the queries whose texts and ids equal the official ones, and prints
the audit table of docs/compat.md::

    python benchmarks/compat/query_texts.py write --data ../shared/data --out runs/audit/cirlab \\
        [--clip-tokenizer DIR]
    python benchmarks/compat/query_texts.py compare --cirlab runs/audit/cirlab --official runs/audit/official

BLIP recipes use BLIP's tokenizer (bert-base-uncased + [DEC] + [ENC], as ``cirlab import blip``
writes it). CLIP recipes need a CLIP tokenizer folder (``--clip-tokenizer``: the tokenizer files
of an HF CLIP checkpoint, e.g. openai/clip-vit-large-patch14); without one they are skipped.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
from unittest.mock import patch
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from cirlab.composers import (BACKWARD, FORWARD, GroundedComposer, ProjectionComposer, QueryRecipe, RerankComposer, SumComposer,
                              ZeroShotComposer)
from cirlab.importers.projection import PROMPT as IMPORTED_PROMPT
from cirlab.config import CONFIG_ROOT, load_config
from cirlab.data.base import CIRSplit
from cirlab.data.registry import load_splits
from cirlab.composers.vectors import query_vectors
from cirlab.evaluation.evaluate import rerank_scores
from cirlab.methods.common import recipe_of
from cirlab.methods.projection import projection_recipe
from cirlab.models import add_tokens, build_backbone, ensure_blip_tokens, load_tokenizer, minilm_tokenizer, small_blip_config
from cirlab.models.dual_encoder import DualEncoderReranker
from cirlab.models.loading import small_clip_config
from cirlab.models.phi import Phi
from cirlab.features.cache import FeatureSet

DATASETS = ("fashioniq", "cirr")
BATCH = 64  # queries per call
TINY = dict(embed_dim=16, text_hidden=32, text_layers=1, text_heads=2, vision_hidden=32, stage_channels=(8, 8, 8, 8))


@dataclass(frozen=True)
class Recipe:
    """One audited recipe: the official recipe it is compared with, the backbone kind, where its
    query recipe comes from (a shipped config, per dataset, or a fixed one) and the composer."""

    official: str
    backbone: str  # "blip" | "clip"
    recipe: Callable[[str], QueryRecipe]  # dataset -> the recipe a model of this kind carries
    composer: str  # "sum" | "grounded" | "rerank" | "projection" | "zeroshot-sum"
    note: str = ""
    marker: tuple[str, int, str, int] | None = None  # official (char, id) that cirlab writes as (char, id)


def _config_recipe(path: str, *overrides: str, projection: bool = False) -> Callable[[str], QueryRecipe]:
    def recipe(dataset: str) -> QueryRecipe:
        cfg = load_config(CONFIG_ROOT / path.format(dataset=dataset), list(overrides))
        return projection_recipe(cfg) if projection else recipe_of(cfg, cfg.method)
    return recipe


def _spn_zeroshot(dataset: str) -> QueryRecipe:
    cfg = load_config(CONFIG_ROOT / f"spn/{dataset}_bank_zeroshot.yaml")
    return QueryRecipe(caption_orders=cfg.method.caption_orders)  # over a zero-shot sum model's default recipe


RECIPES: dict[str, Recipe] = {
    "bi-compat": Recipe("bi-compat", "blip", _config_recipe("bidirectional/{dataset}_text.yaml", "method.direction=compat"),
                        "sum", "Bi-BLIP4CIR stage I/II with the official text prefix"),
    "bi-none": Recipe("bi-none", "blip", _config_recipe("bidirectional/{dataset}_text.yaml", "method.direction=none"),
                      "sum", "no direction marker"),
    "bi-tokens": Recipe("bi-compat", "blip", _config_recipe("bidirectional/{dataset}_text.yaml"), "sum",
                        "cirlab's default marker: new learnable [FORWARD] token"),
    "rerank-stage1": Recipe("rerank-stage1", "blip", _config_recipe("rerank/{dataset}_filter.yaml"), "grounded"),
    "rerank-stage2": Recipe("rerank-stage2", "blip", _config_recipe("rerank/{dataset}_reranker.yaml"), "rerank",
                            "the re-ranker's text branch"),
    "spn-blip4cir": Recipe("spn-blip4cir", "blip", _config_recipe("rerank/{dataset}_filter.yaml"), "grounded",
                           "SPN over the filter keeps the filter's recipe"),
    "spn-zeroshot": Recipe("spn-clip4cir", "clip", _spn_zeroshot, "zeroshot-sum",
                           "SPN over a zero-shot CLIP sum (official: clip4cir/zscir validate.py)"),
    "zeroshot-clip": Recipe("clip4cir", "clip", _config_recipe("eval/fashioniq_zeroshot_clip.yaml"), "zeroshot-sum",
                            "image + text sum on CLIP (CLIP4Cir's starting point)"),
    "pic2word": Recipe("pic2word", "clip", _config_recipe("projection/cirr_pic2word.yaml", projection=True),
                       "projection", "Pic2Word's marker '*' (265) is cirlab's '$' (259); both are replaced by the "
                       "pseudo-word", marker=("*", 265, "$", 259)),
    "searle": Recipe("searle", "clip", lambda d: QueryRecipe(prompt=IMPORTED_PROMPT, caption_orders="both"),
                     "projection", "an imported SEARLE Phi (cirlab import searle)"),
    "lincir": Recipe("lincir", "clip", _config_recipe("projection/cirr_lincir.yaml", projection=True), "projection"),
    "rtd": Recipe("rtd", "clip", _config_recipe("projection/cirr_rtd.yaml", projection=True), "projection"),
}


def tiny_backbone(kind: str, clip_tokenizer: Path | None):
    """A one-layer backbone of ``kind`` that carries the real tokenizer (the audit needs no weights)."""
    if kind == "blip":
        tokenizer = minilm_tokenizer()  # bert-base-uncased's vocabulary
        ensure_blip_tokens(tokenizer)
        return build_backbone(small_blip_config(vocab_size=len(tokenizer), **TINY), tokenizer)
    tokenizer = load_tokenizer(clip_tokenizer)
    config = small_clip_config(vocab_size=len(tokenizer), **TINY)
    config.text_config.update({"eos_token_id": tokenizer.eos_token_id, "bos_token_id": tokenizer.bos_token_id,
                               "pad_token_id": tokenizer.pad_token_id})
    return build_backbone(config, tokenizer)


def make_composer(recipe: Recipe, query_recipe: QueryRecipe, backbone):
    if recipe.composer == "sum":
        return SumComposer(backbone, query_recipe)
    if recipe.composer == "zeroshot-sum":
        return ZeroShotComposer(backbone, query_recipe, mode="sum")
    if recipe.composer == "projection":
        return ProjectionComposer(backbone, query_recipe, Phi("searle", backbone.embed_dim, backbone.token_dim))
    grounded = GroundedComposer(backbone, query_recipe)
    if recipe.composer == "grounded":
        return grounded
    reranker = DualEncoderReranker.from_text_encoder(backbone.text_encoder, enc_token_id=backbone.enc_token_id)
    return RerankComposer(grounded, reranker, k=1)


class Recorder:
    """Records the texts the backbone tokenizes and the ids that enter a word-embedding layer."""

    def __init__(self, backbone, embedding: torch.nn.Embedding, pad_id: int, eos_id: int | None):
        self.texts: list[str] = []
        self.ids: list[list[int]] = []
        self.pad_id, self.eos_id = pad_id, eos_id
        tokenize = backbone.tokenize

        def recording_tokenize(texts, max_length=77):
            self.texts += [texts] if isinstance(texts, str) else list(texts)
            return tokenize(texts, max_length=max_length)

        backbone.tokenize = recording_tokenize
        self.hook = embedding.register_forward_pre_hook(
            lambda module, args: self.ids.extend(map(self.trim, args[0].tolist())))

    def trim(self, row: list[int]) -> list[int]:
        if self.eos_id is not None and self.eos_id in row:  # CLIP: up to and including the first end token
            return row[:row.index(self.eos_id) + 1]
        while row and row[-1] == self.pad_id:
            row = row[:-1]
        return row


def audit_split(recipe: Recipe, dataset: str, splits: list[CIRSplit], clip_tokenizer: Path | None) -> list[dict]:
    """One record per query of ``splits``: the texts and ids cirlab feeds the model."""
    backbone = tiny_backbone(recipe.backbone, clip_tokenizer)
    query_recipe = recipe.recipe(dataset)
    if query_recipe.direction == "tokens":  # as Bi-BLIP4CIR's stage I adds them (methods/bidirectional.py)
        add_tokens(backbone, [FORWARD, BACKWARD])
    composer = make_composer(recipe, query_recipe, backbone).eval()
    clip = recipe.backbone == "clip"
    embedding = (composer.reranker.embeddings if recipe.composer == "rerank" else backbone.text_encoder.embeddings)
    embedding = embedding.token_embedding if clip else embedding.word_embeddings
    records = []
    for split in splits:
        rec = Recorder(backbone, embedding, backbone.tokenizer.pad_token_id, backbone.eos_token_id if clip else None)
        ids = sorted({q.reference for q in split.queries})
        feats = FeatureSet(Path("."), {}, ids, {"embeds": torch.zeros(len(ids), backbone.embed_dim),
                                               "tokens": torch.zeros(len(ids), 2, backbone.vision_hidden)})
        if recipe.composer == "rerank":
            candidates = torch.zeros(len(split.queries), 1, dtype=torch.long)
            split = dataclasses.replace(split, gallery=ids)
            with patch.object(composer, "chunk_size", BATCH):  # BATCH queries of one candidate per call
                rerank_scores(composer, split, feats, candidates, torch.zeros(len(split.queries), len(ids)))
        else:
            query_vectors(composer, split, feats, batch_size=BATCH)
        rec.hook.remove()
        n = len(split.queries)
        per_query = len(rec.ids) // n
        if per_query * n != len(rec.ids) or len(rec.texts) != len(rec.ids):
            raise RuntimeError(f"{recipe}: recorded {len(rec.texts)} texts / {len(rec.ids)} id rows for {n} queries")
        # query_vectors composes BATCH queries at a time, each of its texts (caption orders) in turn
        for s in range(0, n, BATCH):
            b = min(BATCH, n - s)
            for i, q in enumerate(split.queries[s:s + b]):
                rows = [per_query * s + j * b + i for j in range(per_query)]
                records.append({"qid": q.qid, "texts": [rec.texts[r] for r in rows],
                                "ids": [rec.ids[r] for r in rows]})
    return records


def val_splits(data: Path, dataset: str, scratch: Path) -> list[CIRSplit]:
    """The val splits from ``data/<dataset>`` (the annotation folders as ../shared/data has them:
    FashionIQ's layout; CIRR's annotations without the ``cirr/`` level, linked into ``scratch``)."""
    root = data / dataset
    if dataset == "cirr" and not (root / "cirr").is_dir():
        (scratch / "cirr").symlink_to(root.resolve(), target_is_directory=True)
        root = scratch
    return load_splits(dataset, root, "val")


def write(args: argparse.Namespace) -> int:
    args.out.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="cirlab-audit-"))
    for dataset in DATASETS:
        splits = val_splits(args.data, dataset, scratch)
        for name in args.recipes or RECIPES:
            recipe = RECIPES[name]
            if recipe.backbone == "clip" and args.clip_tokenizer is None:
                print(f"{name}: skipped (CLIP recipe; pass --clip-tokenizer)")
                continue
            records = audit_split(recipe, dataset, splits, args.clip_tokenizer)
            path = args.out / f"{name}.{dataset}.jsonl"
            path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
            print(f"{path}: {len(records)} queries")
    return 0


def read_jsonl(path: Path) -> dict[str, dict]:
    return {r["qid"]: r for r in map(json.loads, path.read_text(encoding="utf-8").splitlines())}


def with_marker(record: dict, marker: tuple[str, int, str, int] | None) -> dict:
    """An official record with its pseudo-word marker written as cirlab's (the prompt's first one)."""
    if marker is None:
        return record
    char, official_id, ours, our_id = marker
    return {**record, "texts": [t.replace(f" {char} ", f" {ours} ", 1) for t in record["texts"]],
            "ids": [[our_id if i == official_id else i for i in ids] for ids in record["ids"]]}


def compare_one(ours: dict[str, dict], theirs: dict[str, dict], marker=None) -> dict:
    """Counts and up to three examples of each kind of difference (``marker``: see :class:`Recipe`)."""
    out = {"queries": len(ours), "missing": sorted(set(theirs) ^ set(ours))[:3], "equal": 0, "text_differs": 0,
           "ids_differ": 0, "examples": []}
    for qid, r in ours.items():
        o = theirs.get(qid)
        if o is None:
            continue
        o = with_marker(o, marker)
        same_text, same_ids = r["texts"] == o["texts"], r["ids"] == o["ids"]
        out["equal"] += same_text and same_ids
        out["text_differs"] += not same_text
        out["ids_differ"] += not same_ids
        if not (same_text and same_ids) and len(out["examples"]) < 3:
            out["examples"].append({"qid": qid, "cirlab": r, "official": o})
    return out


def compare(args: argparse.Namespace) -> int:
    rows = []
    for name, recipe in RECIPES.items():
        for dataset in DATASETS:
            mine, official = args.cirlab / f"{name}.{dataset}.jsonl", args.official / f"{recipe.official}.{dataset}.jsonl"
            if not (mine.is_file() and official.is_file()):
                continue
            result = compare_one(read_jsonl(mine), read_jsonl(official), recipe.marker)
            rows.append({"recipe": name, "official": recipe.official, "dataset": dataset, **result})
    print("| recipe | official | dataset | queries | equal | text differs | ids differ | note |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['recipe']} | {r['official']} | {r['dataset']} | {r['queries']} | {r['equal']} | "
              f"{r['text_differs']} | {r['ids_differ']} | {RECIPES[r['recipe']].note} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    w = sub.add_parser("write", help="write cirlab's texts and ids per recipe and dataset")
    w.add_argument("--data", type=Path, required=True, help="a folder with fashioniq/ and cirr/ (the val annotations)")
    w.add_argument("--out", type=Path, required=True, help="output folder")
    w.add_argument("--clip-tokenizer", type=Path, help="an HF CLIP tokenizer folder (CLIP recipes)")
    w.add_argument("--recipes", nargs="+", choices=list(RECIPES), help="default: all")
    w.set_defaults(func=write)
    c = sub.add_parser("compare", help="compare with the official texts and ids")
    c.add_argument("--cirlab", type=Path, required=True)
    c.add_argument("--official", type=Path, required=True)
    c.add_argument("--json", type=Path, help="also write the rows, with examples, as JSON")
    c.set_defaults(func=compare)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
