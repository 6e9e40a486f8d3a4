"""SPN: more positives (generated triplets) and more negatives (a static bank), on any composer.

Feng et al., "Improving Composed Image Retrieval via Contrastive Learning with Scaling Positives
and Negatives" (ACM MM 2024; code BUAADreamer/SPN4CIR). Both halves stand on the composer
interface, so they apply to every first-stage model cirlab trains.

* stage ``generate`` (``cirlab spn generate``): caption the training images
  (:mod:`cirlab.data.captioners`), pair each reference with ``per_reference`` targets drawn from
  a window of image-image similarity ranks under the base composer's gallery encoder, write the
  modification texts from templates over the two captions, and save the triplets as an
  extension file in the dataset's own caption format. ``data.extensions`` adds it to training.
* stage ``bank`` (``cirlab train``): the second fine-tuning stage. The gallery vectors of every
  unique training image (original and generated triplets, pixel duplicates merged) form a static
  bank computed once; logits = query · bankᵀ / tau and cross-entropy against the target's bank
  row, so every training image is a negative. Only ``composer.query_parameters()`` train; the
  image side is frozen and no image is decoded (reference features come from the feature cache).
  The result is a composer of the base's kind.

Departures, documented in docs/methods/spn.md: generated records get unique ``pairid`` values
(the official files use 0 for all, which a loader keyed on query ids cannot tell apart), and the
composer stays in eval mode in stage 2 for every base (the official BLIP variant calls
``blip.eval()``; this also keeps dropout out of the other bases).
"""

from __future__ import annotations

import dataclasses

import random
from dataclasses import replace
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from cirlab.composers import Composer, load
from cirlab.composers.base import evaluating
from cirlab.config import ExperimentConfig, Strict
from cirlab.data.base import CIRSplit
from cirlab.data.captioners import CaptionCache, CaptionerConfig, build_captioner, caption_images
from cirlab.data.dedup import duplicate_map
from cirlab.data.registry import benchmark
from cirlab.data.torch_data import FeatureTriplets, default_text
from cirlab.methods.common import (RowTable, Stage, composer_stage, image_table, method_splits,
                                   training_splits, triplet_ids)
from cirlab.methods.stages import register_stage
from cirlab.utils.io import atomic_write_json

# SPN's p_list: 0, 1, 2 (get_cir_data.py)
TEMPLATES = ("{tgt} instead of {ref}", "Unlike {ref}, I want {tgt}", "{tgt}")


class GenerateConfig(Strict):
    name: Literal["spn"] = "spn"
    stage: Literal["generate"] = "generate"
    out: str = Field(description="the extension file to write (FashionIQ: with {category} in the name)")
    cache: str | None = Field(None, description="the caption cache (default: <out>.captions.jsonl)")
    captioner: CaptionerConfig = Field(default_factory=CaptionerConfig)
    per_reference: int = Field(1, ge=1, description="k: generated targets per reference")
    window: tuple[int, int] | None = Field(None, description="[lo, hi): draw targets among the references' "
                                           "lo-th to (hi-1)-th most similar images (0 = the most similar "
                                           "other image); null: uniformly from every other image")
    references_only: bool = Field(True, description="SPN's --refer: only images that are references in "
                                  "the original triplets get generated targets")
    max_triplets: int | None = Field(None, ge=1, description="SPN's --K: keep this many, drawn at random")
    templates: list[int] = Field([0, 1, 2], min_length=1, description="SPN's p_list: " + "; ".join(
        f"{i} = {t!r}" for i, t in enumerate(TEMPLATES)))
    batch_size: int = 256


class BankConfig(Strict):
    name: Literal["spn"] = "spn"
    stage: Literal["bank"] = "bank"
    tau: float = Field(0.02, gt=0)
    learn_tau: bool = Field(False, description="train tau from its initial value (SPN's BLIP4CIR variant)")
    neg_num: int | None = Field(None, ge=1, description="score each query against this many random bank "
                                "images instead of the whole bank (SPN's part_infonce_loss)")
    negatives: Literal["bank", "in_batch"] = Field("bank", description="in_batch: the same second stage "
                                                   "with only the batch's targets as negatives (a control)")
    caption_orders: Literal["one", "one-uncapitalized", "both", "pic2word"] | None = Field(
        None, description="FashionIQ's validation text rule (cirlab.data.fashioniq.VAL_RULES); default: the "
        "first stage's; SPN4CIR's CLIP-based models (clip4cir, zscir) use one-uncapitalized")



def base_composer(cfg: ExperimentConfig) -> Composer:
    """The first-stage model SPN works on: ``model.backbone`` is a model folder, or a plain BLIP /
    CLIP folder (its zero-shot model, as ``cirlab.load`` gives it)."""
    folder = Path(cfg.model.backbone) if cfg.model.backbone else None
    if folder is None or not ((folder / "composer.json").is_file() or (folder / "config.json").is_file()):
        raise ValueError(f"method spn: model.backbone must be a model folder (a composer.json inside) or a "
                         f"backbone folder, got {cfg.model.backbone!r}")
    composer = load(cfg.model.backbone)
    if composer.reranks:
        raise ValueError(f"method spn: {cfg.model.backbone} is a re-ranking model; SPN trains a first stage, "
                         "so give its filter model and re-rank after SPN")
    if not composer.query_parameters():
        raise ValueError(f"method spn: the {composer.kind} model in {cfg.model.backbone} has no query-side "
                         "parameters to train")
    return composer


def _feature_table(composer: Composer, splits: list[CIRSplit], cfg: ExperimentConfig,
                   ids_of) -> tuple[torch.Tensor | RowTable, dict[str, int]]:
    tokens = "tokens" in (composer.gallery_field, composer.reference_field)
    table, rows = image_table(composer, splits, cfg, ids_of, tokens=tokens)
    return table["tokens" if tokens else "embeds"], rows


@torch.no_grad()
def bank_vectors(composer: Composer, table: torch.Tensor | RowTable, rows: list[int], batch_size: int = 512) -> torch.Tensor:
    """(N, d) normalised gallery vectors of feature-table ``rows``."""
    if isinstance(table, RowTable) and composer.gallery_tokens:
        table = table.first(composer.gallery_tokens)
    out = []
    with evaluating(composer):
        for s in range(0, len(rows), batch_size):
            out.append(composer.gallery_vectors(table[rows[s:s + batch_size]]).float())
    return torch.cat(out) if out else torch.empty(0)


# -- positives -----------------------------------------------------------------------------------------


def draw_targets(vectors: torch.Tensor, references: list[int], *, per_reference: int,
                 window: tuple[int, int] | None, seed: int, batch_size: int = 256) -> list[tuple[int, int]]:
    """``(reference row, target row)`` pairs: for each reference, ``per_reference`` distinct other
    rows drawn uniformly from its similarity ranks [lo, hi) (rank 0 = its most similar other row),
    or from every other row without a window."""
    n = len(vectors)
    gen = torch.Generator().manual_seed(seed)
    pairs: list[tuple[int, int]] = []
    if window is not None:
        lo, hi = window
        if not 0 <= lo < hi:
            raise ValueError(f"method.window: expected 0 <= lo < hi, got {list(window)}")
        hi = min(hi, n - 1)
        if hi - lo < per_reference:
            raise ValueError(f"method.window {list(window)} holds fewer than per_reference={per_reference} of "
                             f"the {n} unique images")
    for s in range(0, len(references), batch_size):
        chunk = torch.tensor(references[s:s + batch_size])
        if window is None:
            for r in chunk.tolist():
                others = torch.randperm(n - 1, generator=gen)[:per_reference]
                pairs += [(r, int(o) + (o >= r)) for o in others]  # skip r itself
            continue
        sims = vectors[chunk] @ vectors.T
        sims[torch.arange(len(chunk)), chunk] = float("-inf")  # never itself
        ranked = sims.topk(hi, dim=1).indices[:, lo:hi]
        for r, row in zip(chunk.tolist(), ranked):
            pick = torch.randperm(len(row), generator=gen)[:per_reference]
            pairs += [(r, int(row[p])) for p in pick]
    return pairs


def template_texts(reference_caption: str, target_caption: str, templates: list[int]) -> list[str]:
    return [TEMPLATES[t].format(ref=reference_caption, tgt=target_caption) for t in templates]


@register_stage("spn", "generate", config=GenerateConfig, produces="files")
def generate(cfg: ExperimentConfig) -> list[Path]:
    """Write the generated triplets of every training split (FashionIQ: per category)."""
    gcfg: GenerateConfig = cfg.method
    bad = [t for t in gcfg.templates if not 0 <= t < len(TEMPLATES)]
    if bad:
        raise ValueError(f"method.templates: {bad} are not template ids 0..{len(TEMPLATES) - 1}")
    composer = load(cfg.model.backbone) if cfg.model.backbone else None
    if composer is None:
        raise ValueError("spn generate: model.backbone must name the model folder whose gallery encoder "
                         "ranks image-image similarity")
    plain = cfg.model_copy(update={"data": cfg.data.model_copy(update={"extensions": []})})
    originals = training_splits(plain)
    written = []
    for split, original in zip(method_splits(plain, cfg.data.train_split), originals):
        category = benchmark(split.dataset).category_of(split)
        out = Path(gcfg.out.replace("{category}", category or ""))
        dup = duplicate_map(split, split.gallery)
        unique = list(dict.fromkeys(dup[i] for i in split.gallery))
        pool = replace(split, gallery=unique)
        table, rows = _feature_table(composer, [pool], cfg, lambda s: list(s.gallery))
        vectors = bank_vectors(composer, table, [rows[i] for i in unique])
        index = {i: k for k, i in enumerate(unique)}
        refs = (list(dict.fromkeys(dup[q.reference] for q in original.queries)) if gcfg.references_only
                else unique)
        pairs = draw_targets(vectors, [index[r] for r in refs], per_reference=gcfg.per_reference,
                             window=gcfg.window, seed=cfg.seed, batch_size=gcfg.batch_size)
        if gcfg.max_triplets is not None and len(pairs) > gcfg.max_triplets:
            pairs = random.Random(cfg.seed).sample(pairs, gcfg.max_triplets)
        involved = list(dict.fromkeys(unique[k] for p in pairs for k in p))
        prompt = gcfg.captioner.prompt.replace("{category}", category or "image")  # SPN: the FashionIQ dress type
        captioner = build_captioner(gcfg.captioner.model_copy(update={"prompt": prompt}), cfg.data.root,
                                    cfg.data.train_split)
        cache = CaptionCache(gcfg.cache or f"{out}.captions.jsonl", captioner.signature)
        missing = [i for i in involved if split.find_image(i) is None]
        if missing:
            raise FileNotFoundError(f"spn generate: {len(missing)} images of {split.name} are missing, e.g. {missing[:3]}")
        captions = caption_images(captioner, [(i, split.find_image(i)) for i in involved], cache)
        copies: dict[str, list[str]] = {}
        for i in split.gallery:
            copies.setdefault(dup[i], []).append(i)
        first = max((int(q.qid) for q in split.queries if q.qid.isdigit()), default=-1) + 1  # after every pairid
        records = [_record(split, first + n, unique[r], unique[t], captions, copies, gcfg.templates)
                   for n, (r, t) in enumerate(pairs)]
        atomic_write_json(out, records, indent=1)
        print(f"{split.name}: {len(records)} generated triplets from {len(refs)} references "
              f"({len(split.gallery) - len(unique)} duplicate images merged) -> {out}", flush=True)
        written.append(out)
    return written


def _record(split: CIRSplit, pairid: int, ref: str, tgt: str, captions: dict[str, str],
            copies: dict[str, list[str]], templates: list[int]) -> dict:
    make = benchmark(split.dataset).generated_record
    if make is None:
        raise ValueError(f"spn generate: {split.dataset} has no training-split extension format")
    return make(pairid=pairid, reference=ref, target=tgt, texts=template_texts(captions[ref], captions[tgt], templates),
                captioned={"reference_caption": captions[ref], "target_caption": captions[tgt]},
                target_copies=copies[tgt])


# -- negatives: the bank stage -------------------------------------------------------------------------


class BankStage(nn.Module):
    """Stage 2: the composer's query side against a static bank of every training image."""

    def __init__(self, composer: Composer, bank: torch.Tensor, references: torch.Tensor | RowTable,
                 bank_row: torch.Tensor, cfg: BankConfig):
        super().__init__()
        self.composer, self.cfg, self.references = composer, cfg, references
        composer.requires_grad_(False)
        for p in composer.query_parameters():
            p.requires_grad_(True)
        self.tau = nn.Parameter(torch.tensor(float(cfg.tau)), requires_grad=cfg.learn_tau)
        self.register_buffer("bank", bank, persistent=False)
        self.register_buffer("bank_row", bank_row, persistent=False)  # feature-table row -> bank row

    def train(self, mode: bool = True) -> "BankStage":
        super().train(mode)
        self.composer.eval()  # no dropout in stage 2 (SPN's BLIP variant)
        return self

    def _references(self, rows: torch.Tensor) -> torch.Tensor:
        if isinstance(self.references, RowTable):
            return self.references[rows.to(self.bank.device)]
        return self.references.to(self.bank.device)[rows]

    def logits(self, queries: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(scores, label column) of each query: the whole bank, ``neg_num`` random bank rows after
        the target, or the batch's targets (duplicates of a query's target masked out)."""
        cfg = self.cfg
        if cfg.negatives == "in_batch":
            logits = queries @ self.bank[labels].T / self.tau
            same = (labels[:, None] == labels[None, :]) & ~torch.eye(len(labels), dtype=torch.bool, device=labels.device)
            return logits.masked_fill(same, float("-inf")), torch.arange(len(labels), device=labels.device)
        if cfg.neg_num is None:
            return queries @ self.bank.T / self.tau, labels
        negatives = torch.randint(len(self.bank), (len(labels), cfg.neg_num), device=labels.device)
        rows = torch.cat([labels[:, None], negatives], dim=1)
        logits = torch.einsum("bd,bkd->bk", queries, self.bank[rows]) / self.tau
        logits[:, 1:] = logits[:, 1:].masked_fill(negatives == labels[:, None], float("-inf"))
        return logits, torch.zeros_like(labels)

    def training_step(self, batch: dict) -> dict[str, torch.Tensor]:
        queries = self.composer.compose(self._references(batch["reference"]), list(batch["text"]))
        labels = self.bank_row[batch["target"]]
        logits, target = self.logits(queries.float(), labels)
        loss = F.cross_entropy(logits, target)
        return {"loss": loss, "tau": self.tau.detach()}


@register_stage("spn", "bank", config=BankConfig, default=True)
def build_bank(cfg: ExperimentConfig) -> Stage:
    """SPN's stage 2: the first stage's query side trained against a static bank of gallery vectors."""
    scfg = cfg.method
    composer = base_composer(cfg)
    if scfg.caption_orders is not None:
        composer.recipe = dataclasses.replace(composer.recipe, caption_orders=scfg.caption_orders)
    splits = training_splits(cfg)
    table, rows = _feature_table(composer, splits, cfg, triplet_ids)
    dup: dict[str, str] = {}
    for s in splits:
        dup.update(duplicate_map(s, triplet_ids(s)))
    unique = list(dict.fromkeys(dup[i] for i in rows))
    bank_index = {i: k for k, i in enumerate(unique)}
    bank_row = torch.full((len(table),), -1, dtype=torch.long)
    for image_id, row in rows.items():
        bank_row[row] = bank_index[dup[image_id]]
    bank = bank_vectors(composer, table, [rows[i] for i in unique])
    text = lambda q: default_text(q, True)  # noqa: E731
    datasets = [FeatureTriplets(s, rows, text) for s in splits]
    data = datasets[0] if len(datasets) == 1 else torch.utils.data.ConcatDataset(datasets)
    n_gen = sum(q.extra.get("generated", False) for s in splits for q in s.queries)
    print(f"spn bank: {len(bank)} unique training images ({len(rows) - len(bank)} duplicates merged), "
          f"{len(data)} triplets ({n_gen} generated)", flush=True)
    model = BankStage(composer, bank, table, bank_row, scfg)
    groups: list[dict] = [{"params": composer.query_parameters()}]
    if scfg.learn_tau:
        groups.append({"params": [model.tau], "weight_decay": 0.0})
    return composer_stage(cfg, model, data, lambda m: m.composer, param_groups=groups)
