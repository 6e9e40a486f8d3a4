"""Projection-based zero-shot CIR (method ``projection``: train a Phi) and RTD (method ``rtd``: then
tune the text encoder with text triplets). Both export a :class:`~cirlab.composers.ProjectionComposer`.

* ``projection``, style ``pic2word`` (images only): the text feature of "a photo of $" with
  ``$`` = Phi(u) must match the frozen image embedding u; symmetric InfoNCE at CLIP's frozen
  logit scale (google-research/composed_image_retrieval).
* ``projection``, style ``lincir`` (text only): Phi(caption embedding + noise) at every keyword
  span of the caption must give back the caption's embedding; MSE (navervision/lincir). Noise:
  ``noise · U(0,1) · N(0, I)`` per sample.
* ``rtd`` (jaeseokbyun/RTD): a frozen anchor copy of the text encoder encodes the target and
  reference captions; Phi (frozen, eval) maps the reference caption's embedding plus noise
  ``s · U(0,1) · N(0, I)`` to the pseudo-word; the trainable encoder encodes "a photo of $ that
  {c}" and "a photo of $" with it (refined batch sampling); NT-Xent over the joint 4B vectors.

Only Phi trains in ``projection``; only the text encoder and its projection in ``rtd``. The
image side never changes, so a gallery index built with the base stays valid for its RTD model.
"""

from __future__ import annotations

import copy
import random
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn
from torch.utils.data import Dataset

from cirlab.composers import ProjectionComposer, QueryRecipe, load
from cirlab.composers.projection import MARKER
from cirlab.config import ExperimentConfig, Strict
from cirlab.data.text_triplets import TextTriplet, clean_caption, mask_keywords, read_captions, read_triplets, \
    rule_triplets, shapes_triplets
from cirlab.methods.common import (Stage, composer_stage, image_table, stage_backbone,
                                   training_splits)
from cirlab.methods.stages import register_stage
from cirlab.models import Backbone
from cirlab.models.phi import Phi
from cirlab.training.losses import clip_loss, nt_xent

PROMPT = f"a photo of {MARKER} that {{text}}"
PLAIN = f"a photo of {MARKER}"


class ProjectionConfig(Strict):
    name: Literal["projection"] = "projection"
    prompt: str = Field(PROMPT, description="the query at evaluation; {text} is the modification text")
    caption_orders: Literal["both", "pic2word", "one", "one-uncapitalized"] = Field(
        "both", description="FashionIQ's two captions at evaluation: both orders averaged (SEARLE, LinCIR, "
        "RTD) or Pic2Word's one order 'c2 and c1' (cirlab.data.fashioniq.VAL_RULES)")
    max_text_length: int = 77


class PhiConfig(ProjectionConfig):
    stage: Literal["phi"] = "phi"
    style: Literal["pic2word", "lincir"] = "lincir"
    noise: float = Field(1.0, ge=0, description="lincir: noise scale of the caption embedding fed to Phi")
    keywords: Literal["auto", "lexicon"] = Field("auto", description="lincir: spaCy when importable, else the "
                                                 "lexicon heuristic (cirlab.data.text_triplets)")
    logit_scale: float | None = Field(None, description="pic2word: the InfoNCE scale (default: the "
                                      "backbone's own, frozen: CLIP's logit scale, 1/0.07 for BLIP)")
    captions: str | None = Field(None, description="lincir: a caption corpus, one caption per line (.txt) or a "
                                 "JSON list of strings; default: the shapes training scenes' captions")


class RtdConfig(ProjectionConfig):
    name: Literal["rtd"] = "rtd"  # RTD as its paper names it (post-hoc text-encoder tuning of a projection model)
    triplets: Literal["shapes", "rules"] | str = Field("shapes", description="shapes: the generator's scene "
                                                       "captions; rules: swaps over the training scene captions; "
                                                       "else a JSON file of text triplets")
    noise: float = Field(0.5, ge=0, description="s: Phi input = ref caption embedding + s * U(0,1) * N(0, I)")
    tau: float = 0.07
    anchor: bool = Field(True, description="targets from a frozen copy of the text encoder (off: the trainable "
                         "encoder encodes them too, the paper's ablation)")
    refined_sampling: bool = Field(True, description="add the 'a photo of $' queries with the reference "
                                   "captions as their targets (hard negatives of each other)")



def caption_embeds(backbone: Backbone, captions: list[str], max_length: int) -> torch.Tensor:
    """Projected, unnormalised text features (LinCIR's Phi input and target)."""
    enc = backbone.tokenize(captions, max_length=max_length)
    return backbone.encode_text(enc.input_ids, enc.attention_mask)


def with_noise(x: torch.Tensor, scale: float) -> torch.Tensor:
    """``x + scale * U(0,1) * N(0, I)``, one uniform draw per row (LinCIR, RTD)."""
    if scale == 0:
        return x
    return x + scale * torch.rand(len(x), 1, device=x.device) * torch.randn_like(x)


class Items(Dataset):
    """A list of items as a dataset (image rows, captions or text triplets)."""

    def __init__(self, items: list):
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        return self.items[index]


class PhiStage(nn.Module):
    def __init__(self, composer: ProjectionComposer, cfg: PhiConfig, image_embeds: torch.Tensor | None = None):
        super().__init__()
        self.composer, self.cfg = composer, cfg
        composer.backbone.requires_grad_(False)
        self.rng = random.Random(0)
        if image_embeds is not None:
            self.register_buffer("image_embeds", image_embeds, persistent=False)

    @property
    def phi(self) -> Phi:
        return self.composer.phi

    def train(self, mode: bool = True) -> "PhiStage":
        super().train(mode)
        self.composer.backbone.eval()  # frozen towers: no dropout in them
        return self

    def training_step(self, batch: dict) -> dict[str, torch.Tensor]:
        c = self.composer
        if self.cfg.style == "pic2word":
            u = self.image_embeds[batch["row"]]
            text = c.encode_prompts([PLAIN] * len(u), c.phi(u))
            scale = self.cfg.logit_scale or c.backbone.logit_scale
            loss = clip_loss(u, text, scale)
        else:
            captions = list(batch["caption"])
            with torch.no_grad():
                target = caption_embeds(c.backbone, captions, self.cfg.max_text_length).float()
            pseudo = c.phi(with_noise(target, self.cfg.noise))
            masked = [mask_keywords(t, self.rng, use_spacy=self.cfg.keywords == "auto") for t in captions]
            enc = c.backbone.tokenize(masked, max_length=self.cfg.max_text_length)
            out = c.backbone.encode_text_with_pseudo(enc.input_ids, enc.attention_mask, pseudo, c.marker_id)
            loss = F.mse_loss(out.float(), target)
        return {"loss": loss}


class RtdStage(nn.Module):
    def __init__(self, composer: ProjectionComposer, cfg: RtdConfig):
        super().__init__()
        self.composer, self.cfg = composer, cfg
        backbone = composer.backbone
        self.anchor = copy.deepcopy(backbone).eval().requires_grad_(False)  # encodes the targets, never moves
        backbone.requires_grad_(False)
        backbone.text_encoder.requires_grad_(True)
        backbone.text_proj.requires_grad_(True)
        composer.phi.requires_grad_(False)

    def train(self, mode: bool = True) -> "RtdStage":
        super().train(mode)
        self.anchor.eval()
        self.composer.phi.eval()  # frozen, and without its dropout, as the official trainer
        return self

    def training_step(self, batch: dict) -> dict[str, torch.Tensor]:
        c, cfg = self.composer, self.cfg
        refs = [clean_caption(t) for t in batch["reference_caption"]]
        tgts = [clean_caption(t) for t in batch["target_caption"]]
        conds = list(batch["conditioning_caption"])
        with torch.no_grad():
            ref_embeds = caption_embeds(self.anchor, refs, cfg.max_text_length).float()
            pseudo = c.phi(with_noise(ref_embeds, cfg.noise))
        encoder = self.anchor if cfg.anchor else c.backbone
        with torch.set_grad_enabled(not cfg.anchor):
            targets = caption_embeds(encoder, tgts, cfg.max_text_length)
            if cfg.refined_sampling:
                targets = torch.cat([targets, caption_embeds(encoder, refs, cfg.max_text_length)])
        queries = c.encode_prompts([cfg.prompt.replace("{text}", t) for t in conds], pseudo)
        if cfg.refined_sampling:
            queries = torch.cat([queries, c.encode_prompts([PLAIN] * len(refs), pseudo)])
        return {"loss": nt_xent(targets.float(), queries.float(), cfg.tau)}


def triplet_source(cfg: ExperimentConfig, rcfg: RtdConfig) -> list[TextTriplet]:
    if rcfg.triplets in ("shapes", "rules"):
        if cfg.data.dataset != "shapes":
            raise ValueError(f"method.triplets: {rcfg.triplets} needs the shapes data; give a JSON triplet file")
        splits = training_splits(cfg)
        triplets = [t for s in splits for t in shapes_triplets(s)]
        if rcfg.triplets == "rules":
            captions = list(dict.fromkeys(c for t in triplets for c in (t.reference_caption, t.target_caption)))
            triplets = rule_triplets(captions, seed=cfg.seed)
        return triplets
    return read_triplets(rcfg.triplets)


def _as_dicts(triplets: list[TextTriplet]) -> list[dict]:
    return [{"reference_caption": t.reference_caption, "conditioning_caption": t.conditioning_caption,
             "target_caption": t.target_caption} for t in triplets]


def projection_recipe(cfg: ExperimentConfig) -> QueryRecipe:
    """The query recipe of a projection stage: its prompt and caption rule, the data's preprocessing."""
    pcfg = cfg.method
    return QueryRecipe(prompt=pcfg.prompt, caption_orders=pcfg.caption_orders, max_text_length=pcfg.max_text_length,
                       transform=cfg.data.transform, target_ratio=cfg.data.target_ratio)


@register_stage("rtd", config=RtdConfig)
def build_rtd(cfg: ExperimentConfig) -> Stage:
    """RTD: the text encoder of a trained projection model tuned post hoc (its Phi frozen)."""
    pcfg = cfg.method
    recipe = projection_recipe(cfg)
    base = load(cfg.model.backbone)  # the base's model folder: its backbone and its Phi
    if not isinstance(base, ProjectionComposer):
        raise ValueError(f"method rtd: model.backbone must be a projection model folder, got a {base.kind} model")
    composer = ProjectionComposer(base.backbone.float(), recipe, base.phi)
    model = RtdStage(composer, pcfg)
    data = Items(_as_dicts(triplet_source(cfg, pcfg)))
    return composer_stage(cfg, model, data, lambda m: m.composer,
                          param_groups=[{"params": [p for p in composer.backbone.parameters() if p.requires_grad]}])


@register_stage("projection", "phi", config=PhiConfig, default=True)
def build_phi(cfg: ExperimentConfig) -> Stage:
    """The projection Phi (Pic2Word- or LinCIR-style) over a frozen backbone."""
    pcfg = cfg.method
    recipe = projection_recipe(cfg)
    backbone = stage_backbone(cfg, "method projection")
    phi = Phi("pic2word" if pcfg.style == "pic2word" else "searle", backbone.embed_dim, backbone.token_dim)
    composer = ProjectionComposer(backbone, recipe, phi)
    if pcfg.style == "pic2word":
        table, rows = image_table(composer, training_splits(cfg), cfg)
        model = PhiStage(composer, pcfg, table["embeds"])
        data = Items([{"row": r} for r in sorted(set(rows.values()))])
    else:
        model = PhiStage(composer, pcfg)
        data = Items([{"caption": c} for c in training_captions(cfg, pcfg)])
    return composer_stage(cfg, model, data, lambda m: m.composer, param_groups=[{"params": list(phi.parameters())}])


def training_captions(cfg: ExperimentConfig, pcfg: PhiConfig) -> list[str]:
    """LinCIR's training text: ``method.captions`` (LinCIR: CC3M captions and SD / Midjourney
    prompts), else the shapes training scenes' captions. Unique, in a fixed order."""
    if pcfg.captions is not None:
        return read_captions(pcfg.captions)
    if cfg.data.dataset != "shapes":
        raise ValueError("method.captions: LinCIR-style Phi training needs a caption corpus (a .txt file, one "
                         "caption per line, or a JSON list) outside shapes")
    from cirlab.methods.pretrain import scene_captions

    return sorted(set(scene_captions(cfg.data.root, cfg.data.train_split).values()))
