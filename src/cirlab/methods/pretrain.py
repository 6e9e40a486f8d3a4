"""Image-caption pretraining of the small backbones on shapes scene captions.

BLIP: image-text contrastive loss (ITC, learnable temperature from 0.07) plus image-text
matching (ITM) on hard negatives drawn from the ITC similarities, as BLIP pretrains; CLIP: ITC
only. Scenes that look identical share a caption, so ITC uses soft targets spread over every
in-batch item with the same caption, and ITM never draws one of them as a negative.
The result is saved with ``save_pretrained`` + tokenizer files, like a real checkpoint.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn
from torch.utils.data import Dataset

from cirlab.config import ExperimentConfig, ModelConfig, Strict
from cirlab.data.base import CIRSplit
from cirlab.data.registry import load_split
from cirlab.data.torch_data import GalleryDataset, make_loader
from cirlab.data.transforms import build_transform
from cirlab.methods.common import Stage, stage_backbone
from cirlab.methods.stages import register_stage
from cirlab.models import (Backbone, BlipBackbone, build_small_blip, build_small_clip, init_text_from_minilm,
                           load_backbone, save_backbone)
from cirlab.features.similarity import dot_similarity
from cirlab.utils.io import read_json


class PretrainConfig(Strict):
    name: Literal["pretrain"] = "pretrain"
    itm: bool = True
    # BLIP runs ITM on every image and caption of the batch; on 2 CPU cores that triples the
    # step time, so the small backbones use hard negatives for the first fraction of the batch.
    itm_fraction: float = Field(1.0, gt=0, le=1)
    temperature: float = 0.07
    max_text_length: int = 64
    eval_images: int | None = Field(None, description="evaluate on the first N test images (all when None)")


def backbone_from_config(cfg: ModelConfig) -> Backbone:
    """A backbone from a local folder, or a new small one (with MiniLM text init if asked)."""
    if cfg.backbone:
        return load_backbone(cfg.backbone, kind=cfg.kind)
    sizes = dict(cfg.small or {})
    if "stage_channels" in sizes:
        sizes["stage_channels"] = tuple(sizes["stage_channels"])
    backbone = build_small_blip(**sizes) if cfg.kind == "blip" else build_small_clip(**sizes)
    if cfg.init_text == "minilm":
        if not isinstance(backbone, BlipBackbone):
            raise ValueError("model.init_text: minilm applies to BLIP only (CLIP's text tower is causal)")
        init_text_from_minilm(backbone)
    return backbone


def scene_captions(root: str | Path, split: str) -> dict[str, str]:
    """``image id -> full scene caption`` of a shapes split (every object, in grid order)."""
    path = Path(root) / "scenes" / f"scenes.shapes.{split}.json"
    return {image_id: scene["caption"] for image_id, scene in read_json(path, "shapes scene file").items()}


class CaptionedImages(Dataset):
    """Every image of a split with its scene caption: ``{id, index, image, caption}``."""

    def __init__(self, split: CIRSplit, captions: dict[str, str], transform, ids: list[str] | None = None):
        self.images = GalleryDataset(split, transform, ids=ids)
        self.captions = captions

    @property
    def missing(self):
        """The ids of the images that could not be read (the engine reports them)."""
        return self.images.missing

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        item = self.images[index]
        if item is not None:
            item["caption"] = self.captions[item["id"]]
        return item


def _same_caption(captions: list[str], device: torch.device) -> torch.Tensor:
    codes = {c: i for i, c in enumerate(dict.fromkeys(captions))}
    ids = torch.tensor([codes[c] for c in captions], device=device)
    return ids[:, None] == ids[None, :]


class Pretrainer(nn.Module):
    """ITC (+ ITM for BLIP) over a backbone; ``training_step`` is what the engine calls."""

    def __init__(self, backbone: Backbone, cfg: PretrainConfig):
        super().__init__()
        self.backbone, self.cfg = backbone, cfg
        self.itm = cfg.itm and isinstance(backbone, BlipBackbone)
        self.log_temp = nn.Parameter(torch.tensor(cfg.temperature).log())

    def training_step(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        bb = self.backbone
        text = bb.tokenize(batch["caption"], max_length=self.cfg.max_text_length)
        image = bb.encode_image(batch["image"])
        img = F.normalize(image.embeds.float(), dim=-1)
        txt = F.normalize(bb.encode_text(text.input_ids, text.attention_mask).float(), dim=-1)
        temp = self.log_temp.exp().clamp(1e-3, 0.5)
        # fp32 even under bf16 autocast: bf16 resolves a logit of 14 (1/0.07) to about 0.06, too
        # coarse for the near-duplicate captions of one-edit scenes
        sim_i2t = dot_similarity(img, txt) / temp
        same = _same_caption(batch["caption"], img.device)
        targets = same.float() / same.sum(1, keepdim=True)
        itc = (F.cross_entropy(sim_i2t, targets) + F.cross_entropy(sim_i2t.T, targets)) / 2
        out = {"loss": itc, "itc": itc.detach(), "temp": temp.detach()}
        if self.itm:
            itm = self._itm_loss(text, image.tokens, sim_i2t.detach(), same)
            out.update(loss=itc + itm, itm=itm.detach())
        return out

    def _itm_loss(self, text, image_tokens: torch.Tensor, sim: torch.Tensor, same: torch.Tensor) -> torch.Tensor:
        """BLIP's ITM: each image with a hard negative caption, each caption with a hard negative
        image, both drawn in proportion to the softmaxed ITC similarity (positives excluded)."""
        b = min(sim.shape[0], max(2, round(self.cfg.itm_fraction * sim.shape[0])))
        text, image_tokens = {k: v[:b] for k, v in text.items()}, image_tokens[:b]
        sim, same = sim[:b, :b], same[:b, :b]
        # an item whose every in-batch partner shares its caption has no negative: its draw is
        # made from uniform weights and left out of the loss (small batches of one scene)
        has_negative = (~same).any(1)
        weights = sim.softmax(1).masked_fill(same, 0) + 1e-6 * (~same)
        weights[~has_negative] = 1.0
        if not torch.isfinite(weights).all():
            raise FloatingPointError("the image-text similarities are not finite (ITM's negative sampling)")
        neg_text = torch.multinomial(weights, 1).squeeze(1)  # per image
        neg_image = torch.multinomial(weights.T, 1).squeeze(1)  # per caption (same is symmetric)
        ids = torch.cat([text["input_ids"], text["input_ids"][neg_text], text["input_ids"]])
        mask = torch.cat([text["attention_mask"], text["attention_mask"][neg_text], text["attention_mask"]])
        tokens = torch.cat([image_tokens, image_tokens, image_tokens[neg_image]])
        logits = self.backbone.itm_logits(ids, mask, tokens)
        negative = torch.where(has_negative, 0, -100).to(logits.device)  # -100: ignored by cross_entropy
        labels = torch.cat([torch.ones(b, dtype=torch.long, device=logits.device), negative, negative])
        return F.cross_entropy(logits, labels)


@torch.no_grad()
def caption_retrieval(backbone: Backbone, split: CIRSplit, captions: dict[str, str], transform, *,
                      ids: list[str] | None = None, subsets: dict[str, list[str]] | None = None,
                      batch_size: int = 256, max_text_length: int = 64, num_workers: int = 0) -> dict[str, float]:
    """Image->caption and caption->image R@1/R@5 over a split's images (percent).

    A hit is any item with the same caption (identical scenes are indistinguishable). Captions
    are deduplicated: the caption gallery holds each distinct caption once, and each distinct
    caption is one caption->image query. ``subsets`` (prefix -> image ids) repeats the measure
    over just those images and their captions, from the features already computed.
    """
    was_training = backbone.training
    backbone.eval()
    loader = make_loader(CaptionedImages(split, captions, transform, ids=ids), batch_size, num_workers=num_workers)
    image_ids, image_feats = [], []
    for batch in loader:
        image_ids += batch["id"]
        image_feats.append(F.normalize(backbone.encode_image(batch["image"].to(backbone.device)).embeds, dim=-1))
    img = torch.cat(image_feats)
    texts = list(dict.fromkeys(captions[i] for i in image_ids))
    txt = []
    for s in range(0, len(texts), batch_size):
        enc = backbone.tokenize(texts[s:s + batch_size], max_length=max_text_length)
        txt.append(F.normalize(backbone.encode_text(enc.input_ids, enc.attention_mask), dim=-1))
    code = {t: k for k, t in enumerate(texts)}
    label = torch.tensor([code[captions[i]] for i in image_ids], device=img.device)
    sim = dot_similarity(img, torch.cat(txt))  # images x distinct captions
    backbone.train(was_training)
    out = _caption_recall(sim, label)
    for prefix, subset in (subsets or {}).items():
        members = set(subset)
        keep = torch.tensor([i in members for i in image_ids], device=img.device)
        if keep.any():
            cols = label[keep].unique()  # sorted: the distinct captions of the subset
            sub = _caption_recall(sim[keep][:, cols], torch.searchsorted(cols, label[keep]))
            out.update({prefix + k: v for k, v in sub.items()})
    return out


def _caption_recall(sim: torch.Tensor, label: torch.Tensor) -> dict[str, float]:
    """R@1/R@5 both ways of an (images x distinct captions) similarity, ``label`` = each image's caption."""
    out: dict[str, float] = {}
    captions = torch.arange(sim.shape[1], device=sim.device)
    for k in (1, 5):
        top_t = sim.topk(min(k, sim.shape[1]), dim=1).indices
        out[f"i2t_R@{k}"] = 100 * (top_t == label[:, None]).any(1).float().mean().item()
        top_i = sim.T.topk(min(k, sim.shape[0]), dim=1).indices
        out[f"t2i_R@{k}"] = 100 * (label[top_i] == captions[:, None]).any(1).float().mean().item()
    return out


def reference_scenes(split: CIRSplit) -> list[str]:
    """The split's reference images: independently drawn scenes, without their one-edit variants."""
    return list(dict.fromkeys(q.reference for q in split.queries))


REFS = "refs_"  # metric prefix of the reference-scene measure


def scene_retrieval(backbone: Backbone, split: CIRSplit, captions: dict[str, str], transform, *, batch_size: int = 256,
                    max_text_length: int = 64, eval_images: int | None = None) -> dict[str, float]:
    """Caption retrieval over all the split's images (each reference scene and its one-edit
    variants: distractors one attribute away) and, prefixed ``refs_``, over the reference scenes
    alone (independent scenes, the setting of the prototype in which a small CNN learned the
    scenes in minutes, see :mod:`cirlab.models.conv_vision`)."""
    return caption_retrieval(backbone, split, captions, transform,
                             ids=split.gallery[:eval_images] if eval_images else None,
                             subsets={REFS: reference_scenes(split)},
                             batch_size=batch_size, max_text_length=max_text_length)


def _check_shapes(cfg: ExperimentConfig) -> None:
    if cfg.data.dataset != "shapes":
        raise ValueError(f"pretrain: data.dataset must be shapes (scene captions), got {cfg.data.dataset!r}")


def evaluate(cfg: ExperimentConfig, splits: list[CIRSplit]) -> dict[str, dict[str, float]]:
    """``cirlab eval --config`` of a pretrained backbone (``model.backbone``): scene caption retrieval, in fp32."""
    mcfg = cfg.method
    _check_shapes(cfg)
    backbone, split = stage_backbone(cfg, "pretrain eval"), splits[0]
    transform = build_transform(cfg.data.transform, backbone.image_size, cfg.data.target_ratio)
    metrics = scene_retrieval(backbone, split, scene_captions(cfg.data.root, split.split), transform,
                              batch_size=cfg.evaluation.batch_size, max_text_length=mcfg.max_text_length,
                              eval_images=mcfg.eval_images)
    return {"all images": {k: v for k, v in metrics.items() if not k.startswith(REFS)},
            "reference scenes": {k.removeprefix(REFS): v for k, v in metrics.items() if k.startswith(REFS)}}


@register_stage("pretrain", config=PretrainConfig, produces="backbone", evaluate=evaluate)
def build(cfg: ExperimentConfig) -> Stage:
    """The pretraining module, its captioned training images, and validation on ``data.val_split``
    (the checkpoint is selected there; the test split is for ``cirlab eval`` only)."""
    mcfg = cfg.method
    _check_shapes(cfg)
    backbone = backbone_from_config(cfg.model)
    transform = build_transform(cfg.data.transform, backbone.image_size, cfg.data.target_ratio)
    train = load_split("shapes", cfg.data.root, cfg.data.train_split)
    train_data = CaptionedImages(train, scene_captions(cfg.data.root, cfg.data.train_split), transform)
    val = load_split("shapes", cfg.data.root, cfg.data.val_split)
    val_captions = scene_captions(cfg.data.root, cfg.data.val_split)

    def evaluate(model: nn.Module) -> dict[str, float]:
        return scene_retrieval(model.backbone, val, val_captions, transform, batch_size=cfg.evaluation.batch_size,
                               max_text_length=mcfg.max_text_length, eval_images=mcfg.eval_images)

    names = [f"{p}{d}_R@{k}" for p in ("", REFS) for d in ("i2t", "t2i") for k in (1, 5)]

    def export(model: nn.Module, folder: Path, provenance: dict) -> Path:
        """The trained backbone in HF format (weights, config, tokenizer): a zero-shot base."""
        return save_backbone(model.backbone, folder)

    return Stage(Pretrainer(backbone, mcfg), train_data, evaluate, names, export)
