"""Zero-shot composed baselines (:class:`~cirlab.composers.ZeroShotComposer`): a pretrained backbone
and no CIR training, evaluated with ``cirlab eval --config`` (one row per mode)."""

from __future__ import annotations

from typing import Literal

from cirlab.composers import ZeroShotComposer
from cirlab.composers.zeroshot import Mode
from cirlab.config import ExperimentConfig, Strict
from cirlab.methods.common import recipe_of, stage_backbone
from cirlab.methods.stages import register_stage


class ZeroShotConfig(Strict):
    name: Literal["zeroshot"] = "zeroshot"
    modes: list[Mode] = ["image", "text", "sum", "grounded"]
    max_text_length: int = 77


@register_stage("zeroshot", config=ZeroShotConfig, produces="composers")
def composers(cfg: ExperimentConfig) -> list[ZeroShotComposer]:
    """One composer per configured mode, all on the same backbone."""
    backbone = stage_backbone(cfg, "method zeroshot")
    recipe = recipe_of(cfg, cfg.method)
    return [ZeroShotComposer(backbone, recipe, mode) for mode in cfg.method.modes]
