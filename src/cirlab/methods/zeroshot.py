"""Zero-shot composed baselines: a pretrained backbone and no CIR training.

* ``image``: the reference image feature alone;
* ``text``: the modification text feature alone;
* ``sum``: normalize(normalize(image) + normalize(text)), the element-wise sum that
  CLIP4Cir and BLIP4CIR start from;
* ``grounded`` (BLIP only): the image-grounded text encoder, ``[ENC]`` + text cross-attending
  to the reference image tokens, through ``text_proj`` (the re-ranking paper's stage-I query).

Gallery side: normalize(image embedding) for every mode. Scored with the dataset's protocol.
"""

from __future__ import annotations

from pathlib import Path

from typing import Literal

import torch
import torch.nn.functional as F

from cirlab.config import ExperimentConfig, Strict, validate
from cirlab.data.base import CIRSplit
from cirlab.data.torch_data import default_text
from cirlab.data.transforms import build_transform
from cirlab.evaluation.protocols import evaluate_similarity
from cirlab.models import Backbone, BlipBackbone
from cirlab.retrieval.encode import image_features
from cirlab.retrieval.similarity import dot_similarity
from cirlab.utils.progress import progress

Mode = Literal["image", "text", "sum", "grounded"]


class ZeroShotConfig(Strict):
    name: str = "zeroshot"
    modes: list[Mode] = ["image", "text", "sum", "grounded"]
    max_text_length: int = 77


@torch.no_grad()
def composed_similarity(backbone: Backbone, split: CIRSplit, modes: list[str], *, transform, transform_name: str,
                        batch_size: int = 256, max_text_length: int = 77) -> dict[str, torch.Tensor]:
    """Query x gallery cosine similarity of each mode."""
    if "grounded" in modes and not isinstance(backbone, BlipBackbone):
        raise ValueError("zero-shot mode 'grounded' needs a BLIP backbone")
    feats = image_features(backbone, split, transform, transform_name, tokens="grounded" in modes,
                           batch_size=batch_size)
    gallery = F.normalize(feats.get("embeds", [feats.index_of(i) for i in split.gallery]), dim=-1)
    ref_rows = [feats.index_of(q.reference) for q in split.queries]
    texts = [default_text(q, False) for q in split.queries]
    queries: dict[str, list[torch.Tensor]] = {m: [] for m in modes}
    for s in progress(range(0, len(texts), batch_size), desc=f"queries {split.name}"):
        rows = ref_rows[s:s + batch_size]
        enc = backbone.tokenize(texts[s:s + batch_size], max_length=max_text_length)
        img = F.normalize(feats.get("embeds", rows), dim=-1)
        txt = F.normalize(backbone.encode_text(enc.input_ids, enc.attention_mask), dim=-1) \
            if {"text", "sum"} & set(modes) else None
        for m in modes:
            if m == "image":
                q = img
            elif m == "text":
                q = txt
            elif m == "sum":
                q = F.normalize(img + txt, dim=-1)
            else:
                tokens = feats.get("tokens", rows, dtype=torch.float32)
                q = F.normalize(backbone.grounded_embeds(enc.input_ids, enc.attention_mask, tokens), dim=-1)
            queries[m].append(q)
    return {m: dot_similarity(torch.cat(qs), gallery) for m, qs in queries.items()}


def evaluate(cfg: ExperimentConfig, backbone: Backbone, split: CIRSplit,
             out: Path | None = None) -> dict[str, dict[str, float]]:
    """Metrics of every configured mode on ``split``."""
    zcfg = validate(ZeroShotConfig, cfg.method, "method")
    transform_name = f"{cfg.data.transform}-{cfg.data.target_ratio}-{backbone.image_size}"
    transform = build_transform(cfg.data.transform, backbone.image_size, cfg.data.target_ratio)
    sims = composed_similarity(backbone, split, zcfg.modes, transform=transform, transform_name=transform_name,
                               batch_size=cfg.evaluation.batch_size, max_text_length=zcfg.max_text_length)
    return {m: evaluate_similarity(split, sim) for m, sim in sims.items()}
