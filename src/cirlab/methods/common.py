"""What several methods share: the stage they hand to ``cirlab train``, their splits and backbones,
the cached image-feature table."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from pydantic import BaseModel
from torch import nn
from torch.utils.data import Dataset

from cirlab.composers import Composer, QueryRecipe
from cirlab.config import ExperimentConfig
from cirlab.data.base import CIRSplit
from cirlab.data.registry import benchmark, extend_split, load_splits
from cirlab.evaluation.evaluate import evaluate_composer, metric_names
from cirlab.models import Backbone, load_backbone


@dataclass
class Stage:
    """What a method's ``build(cfg)`` hands to ``cirlab train``: the module whose ``training_step``
    the engine runs, its data, optimiser groups, the validation callback (flat metrics), the
    metric names it reports (``trainer.select_metric`` is checked against them before training) and
    ``export(model, folder, provenance)``, which writes the trained model folder."""

    model: nn.Module
    train_data: Dataset
    evaluate: Callable[[nn.Module], Mapping[str, float]]
    metric_names: list[str]
    export: Callable[[nn.Module, Path, dict[str, Any]], Path]
    param_groups: list[dict] | None = None


def composer_stage(cfg: ExperimentConfig, model: nn.Module, train_data: Dataset,
                   to_composer: Callable[[nn.Module], Composer], *, param_groups: list[dict] | None = None,
                   **eval_options: Any) -> Stage:
    """A stage whose trained model is a composer: validation and export both go through it
    (:func:`cirlab.evaluation.evaluate.evaluate_composer`, :meth:`Composer.save`)."""
    val_splits = method_splits(cfg, cfg.data.val_split)
    names = metric_names(to_composer(model), val_splits, topk_depths=eval_options.get("topk_depths"))

    def evaluate(m: nn.Module) -> dict[str, float]:
        composer = to_composer(m)
        result = evaluate_composer(composer, val_splits, batch_size=cfg.evaluation.batch_size,
                                   token_dtype=cfg.data.token_dtype, **eval_options)
        return result.flat(primary=composer.name)

    def export(m: nn.Module, folder: Path, provenance: dict[str, Any]) -> Path:
        return to_composer(m).save(folder, provenance)

    return Stage(model, train_data, evaluate, names, export, param_groups)


def recipe_of(cfg: ExperimentConfig, mcfg: BaseModel) -> QueryRecipe:
    """The query recipe of a stage: the data's image preprocessing and the method's text options."""
    return QueryRecipe(direction=getattr(mcfg, "direction", "none"),
                       backward_text=getattr(mcfg, "backward_text", "forward"),
                       backward_target=getattr(mcfg, "reversed_target", "normalized"),
                       max_text_length=mcfg.max_text_length, transform=cfg.data.transform,
                       target_ratio=cfg.data.target_ratio)


def backbone_folder(path: str | Path) -> Path:
    """A backbone folder, or the backbone inside a model folder (the previous stage's export)."""
    path = Path(path)
    return path / "backbone" if (path / "composer.json").is_file() else path


def stage_backbone(cfg: ExperimentConfig, what: str) -> Backbone:
    """The backbone a stage starts from (``model.backbone``: a backbone or a model folder)."""
    if not cfg.model.backbone:
        raise ValueError(f"{what}: model.backbone must name a backbone or model folder")
    return load_backbone(backbone_folder(cfg.model.backbone), kind=cfg.model.kind)


def method_splits(cfg: ExperimentConfig, split: str) -> list[CIRSplit]:
    """The config's dataset split (one per configured category where the benchmark has categories)."""
    categories = benchmark(cfg.data.dataset).category_filter(cfg.data.categories)
    return load_splits(cfg.data.dataset, cfg.data.root, split, categories=categories)


def training_splits(cfg: ExperimentConfig) -> list[CIRSplit]:
    """The training split(s), cut to ``data.train_fraction`` of their triplets.

    The kept triplets are a fixed draw (generator seed 0, independent of ``seed``), so every
    seed and every method of a data-limited comparison trains on the same ones. The triplets of
    ``data.extensions`` (generated ones) are then added whole."""
    splits = method_splits(cfg, cfg.data.train_split)
    fraction = cfg.data.train_fraction
    out = []
    for s in splits:
        if fraction < 1:
            n = max(1, round(fraction * len(s.queries)))
            keep = sorted(torch.randperm(len(s.queries), generator=torch.Generator().manual_seed(0))[:n].tolist())
            s = replace(s, queries=[s.queries[i] for i in keep], name=f"{s.name}[{fraction:g}]")
        for path in cfg.data.extensions:
            s = extend_split(s, path)
        out.append(s)
    return out


def triplet_ids(split: CIRSplit) -> list[str]:
    """Every reference and target image of a split's queries (what training reads)."""
    return list(dict.fromkeys(i for q in split.queries for i in (q.reference, q.target) if i is not None))


class RowTable:
    """Rows of feature tables that stay where they are (memory-mapped cache files), read on demand.

    Image tokens are far too large to hold whole: CIRR's 16.9k training images at BLIP ViT-B size
    (577 x 768) are about 30 GB in float32. ``table[index]`` gathers just the rows asked for,
    as float32, on the index's device (a list index: on ``table.device``); ``index`` may have
    any shape, the result is ``(*index.shape, *row_shape)``."""

    def __init__(self, parts: list[torch.Tensor], device: torch.device | str = "cpu"):
        self.parts, self.device = parts, torch.device(device)
        self.starts = [0]
        for part in parts:
            self.starts.append(self.starts[-1] + len(part))
        self.row_shape = tuple(parts[0].shape[1:])

    def __len__(self) -> int:
        return self.starts[-1]

    def to(self, device: torch.device | str) -> "RowTable":
        """The same rows, gathered onto ``device`` (nothing is copied now)."""
        return RowTable(self.parts, device)

    def first(self, n: int = 1) -> "RowTable":
        """The first ``n`` entries of every row (a view: e.g. the [CLS] token, without reading the rest)."""
        return RowTable([part[:, :n] for part in self.parts], self.device)

    def __getitem__(self, index: torch.Tensor | list[int]) -> torch.Tensor:
        device = index.device if isinstance(index, torch.Tensor) else self.device
        index = torch.as_tensor(index, dtype=torch.long).cpu()
        flat = index.reshape(-1)
        if len(flat) and (flat.min() < 0 or flat.max() >= len(self)):
            raise IndexError(f"RowTable: rows {flat.min().item()}..{flat.max().item()} outside 0..{len(self) - 1}")
        out = torch.empty(len(flat), *self.row_shape, dtype=torch.float32)
        for part, start, end in zip(self.parts, self.starts, self.starts[1:]):
            inside = (flat >= start) & (flat < end)
            if inside.any():
                out[inside] = part[flat[inside] - start].float()
        return out.reshape(*index.shape, *self.row_shape).to(device)


def image_table(composer: Composer, splits: list[CIRSplit], cfg: ExperimentConfig,
                ids_of: Callable[[CIRSplit], list[str]] | None = None,
                tokens: bool = False) -> tuple[dict[str, torch.Tensor | RowTable], dict[str, int]]:
    """``({"embeds": (N, d)}, id -> row)`` of the images the splits need, or with ``tokens``
    ``({"tokens": RowTable (N, L, h)}, ...)`` over the memory-mapped cache files: the composer's own
    cached features (:meth:`Composer.features`: its backbone and preprocessing, each image encoded once)."""
    field_ = "tokens" if tokens else "embeds"
    parts: list[torch.Tensor] = []
    rows: dict[str, int] = {}
    offset = 0
    for split in splits:
        feats = composer.features(split, ids=ids_of(split) if ids_of else None, fields=[field_],
                                  batch_size=cfg.evaluation.batch_size, token_dtype=cfg.data.token_dtype)
        for k, i in enumerate(feats.ids):
            rows.setdefault(i, offset + k)
        parts.append(feats[field_])
        offset += len(feats)
    if tokens:
        return {"tokens": RowTable(parts)}, rows
    return {"embeds": torch.cat(parts).float()}, rows
