"""The stage registry: every stage of every method, registered where it is defined.

A stage is a config model plus what the stage produces (``produces``):

* ``model``: ``build(cfg) -> Stage`` trains on the engine; ``cirlab train`` exports ``<run>/model``;
* ``backbone``: the same, exporting ``<run>/backbone`` (pretraining);
* ``composers``: ``composers(cfg)`` gives untrained composers that ``cirlab eval --config`` scores
  (zero-shot baselines); ``evaluate(cfg, splits)`` instead where a stage scores itself otherwise;
* ``files``: ``run(cfg) -> [paths]`` writes files in one pass (SPN's generated triplets).

The typed config of an experiment's ``method`` section is the registered stage's ``config``
(:func:`cirlab.config.method_section` looks it up), so a new method is a module under
``cirlab/methods/`` that registers its stages, and a config file that names it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Literal

from pydantic import BaseModel

from cirlab.config import ExperimentConfig, stage_key
from cirlab.registry import STAGES

if TYPE_CHECKING:
    from cirlab.methods.common import Stage

Produces = Literal["model", "backbone", "composers", "files"]


@dataclass(frozen=True)
class StageSpec:
    method: str
    stage: str
    config: type[BaseModel]
    produces: Produces
    default: bool = False  # the stage a method section without ``stage`` means
    build: Callable[[ExperimentConfig], Stage] | None = None
    composers: Callable[[ExperimentConfig], list] | None = None
    evaluate: Callable[[ExperimentConfig, list], dict[str, dict[str, float]]] | None = None
    run: Callable[[ExperimentConfig], list[Path]] | None = None

    @property
    def label(self) -> str:
        return self.method if self.method == self.stage else f"{self.method}, stage {self.stage}"


def register_stage(method: str, stage: str | None = None, *, config: type[BaseModel], produces: Produces = "model",
                   default: bool = False, **hooks: Any) -> Callable:
    """Decorator of a stage's function: ``build`` (produces model / backbone), ``composers`` or
    ``run`` (files), by ``produces``; further hooks (``evaluate``) as keywords."""
    role = {"model": "build", "backbone": "build", "composers": "composers", "files": "run"}[produces]

    def decorate(fn: Callable) -> Callable:
        spec = StageSpec(method, stage or method, config, produces, default or stage is None, **{role: fn}, **hooks)
        STAGES.add((spec.method, spec.stage), spec)
        return fn

    return decorate


def spec_of(cfg: ExperimentConfig, source: str = "config") -> StageSpec:
    """The registered stage of ``cfg.method``."""
    if not cfg.method:
        raise ValueError(f"{source}: the config has no method section")
    return STAGES[stage_key(cfg.method)]


def build_stage(cfg: ExperimentConfig, source: str = "config") -> Stage:
    """The trainable stage of ``cfg`` (what ``cirlab train`` runs on the engine)."""
    spec = spec_of(cfg, source)
    if spec.build is None:
        how = {"composers": "evaluate it with cirlab eval --config", "files": "it runs in one pass: cirlab train "
               "runs it and writes its files"}[spec.produces]
        raise ValueError(f"{source}: method {spec.label} is not trained on the engine ({how})")
    return spec.build(cfg)
