"""Experiment configs: plain YAML composed from groups, validated into typed models.

An experiment file names one file per group and overrides what it needs::

    defaults:
      data: shapes          # configs/data/shapes.yaml
      trainer: default      # configs/trainer/default.yaml
    seed: 0
    trainer:
      epochs: 5

Groups are merged in order, then the experiment's own keys, then ``--set a.b=c``
overrides from the command line. Unknown keys are errors, reported with the file and
field, so that a typo never silently falls back to a default.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from cirlab.registry import BENCHMARKS, STAGES

# The shipped configs are package data (``src/cirlab/configs``; the repository's top-level
# ``configs`` is a link to it), so a wheel or ``pip install .`` has them too.
CONFIG_ROOT = Path(__file__).resolve().parent / "configs"


def find_config(path: str | Path) -> Path:
    """``path`` itself when it exists; else a relative ``configs/<group>/<name>.yaml`` is looked up
    among the shipped configs, so the paths the docs give work from any folder, installed or not."""
    path = Path(path)
    if path.exists() or path.is_absolute() or len(path.parts) < 2 or path.parts[0] != "configs":
        return path
    shipped = CONFIG_ROOT.joinpath(*path.parts[1:])
    return shipped if shipped.is_file() else path


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class DataConfig(Strict):
    """Which dataset, where, and how its images are preprocessed."""

    dataset: str = Field("shapes", description="a registered benchmark (cirlab.data: shapes, cirr, fashioniq, circo)")
    root: str = "runs/demo/shapes"
    categories: list[str] = Field(["dress", "shirt", "toptee"], description="the categories evaluated, for a "
                                  "benchmark that has them (FashionIQ); ignored by the others")
    train_split: str = "train"
    val_split: str = "val"
    transform: Literal["targetpad", "squarepad", "resize"] = "targetpad"
    target_ratio: float = 1.25
    token_dtype: Literal["float16", "float32"] = Field(
        "float16", description="how cached image token sequences are stored: float16 halves disk and page "
        "cache; float32 as the official code (the CIRR, FashionIQ and CIRCO configs; docs/compat.md)")
    train_fraction: float = Field(1.0, gt=0, le=1, description="train on this share of the training triplets "
                                  "(a fixed draw, the same for every seed and method: data-limited experiments)")
    extensions: list[str] = Field([], description="extension caption files whose triplets are added to the "
                                  "training split (SPN's generated positives; FashionIQ: {category} in the path)")

    @model_validator(mode="after")
    def _known_benchmark(self) -> "DataConfig":
        bench = BENCHMARKS.get(self.dataset)
        if bench is None:
            raise ValueError(f"dataset: must be one of {sorted(BENCHMARKS.keys())}, got {self.dataset!r}")
        unknown = [c for c in self.categories if bench.categories and c not in bench.categories]
        if unknown:
            raise ValueError(f"categories: {unknown} are not categories of {self.dataset} "
                             f"(one of {list(bench.categories)})")
        return self


class OptimConfig(Strict):
    name: Literal["adamw", "adam"] = "adamw"
    lr: float = 1e-4
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8


class ScheduleConfig(Strict):
    """``cosine_epoch`` is BLIP's per-epoch cosine; ``max_epoch`` below ``epochs``
    reproduces the official restart quirk (the cosine climbs back up after it)."""

    name: Literal["constant", "cosine_epoch", "cosine_step"] = "constant"
    min_lr: float = 0.0
    max_epoch: int | None = None
    warmup_steps: int = 0


class TrainerConfig(Strict):
    epochs: int = Field(1, ge=1)
    max_steps: int | None = None
    batch_size: int = Field(32, ge=1)
    grad_accum: int = Field(1, ge=1)
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    grad_clip: float | None = None
    optimizer: OptimConfig = Field(default_factory=OptimConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    checkpoint_every_steps: int | None = None
    eval_every_epochs: int = Field(1, ge=1)
    eval_every_steps: int | None = Field(None, ge=1, description="validate (and save) every this many optimiser "
                                         "steps instead of every eval_every_epochs epochs, inside epochs too")
    eval_at_start: bool = Field(False, description="also validate (and keep as best.pt) the model before the first "
                                "step, so that select_metric can choose no training at all over a worse result")
    select_metric: str | None = None
    stop_at: float | None = Field(None, description="stop after the first validation whose select_metric reaches "
                                  "this value: epochs and max_steps are then a budget, not a length (a run that may "
                                  "need longer on an unlucky seed, e.g. the quick demo's pretraining)")
    log_every_steps: int = Field(10, ge=1)
    num_workers: int = 0
    sampler: Literal["random", "paired_reference"] = Field(
        "random", description="random: one permutation per epoch; paired_reference: samples in pairs that share "
        "a reference image (CSS/TIRG style), so that every batch holds hard negatives")
    output_dir: str = "runs"

    @model_validator(mode="after")
    def _stop_needs_select(self) -> "TrainerConfig":
        if self.stop_at is not None and self.select_metric is None:
            raise ValueError("trainer.stop_at is a value of trainer.select_metric: set that too")
        return self


class EvalConfig(Strict):
    """Which split to score; the metrics themselves are fixed per benchmark protocol."""

    split: str = "val"
    batch_size: int = 64


class ModelConfig(Strict):
    """The backbone: a local HF folder (real or cirlab-made checkpoint), or a new small one.

    ``small`` holds the sizes of a randomly initialised small backbone (pretraining only);
    ``init_text: minilm`` then copies the bundled MiniLM into the BLIP text encoder.
    """

    kind: str = Field("blip", description="the backbone adapter: blip, clip, or one registered with "
                      "cirlab.models.register_backbone (a folder holding another is refused when loaded)")
    backbone: str | None = None
    small: dict[str, Any] | None = None
    init_text: Literal["random", "minilm"] = "random"


class ExperimentConfig(Strict):
    name: str = "experiment"
    seed: int = 0
    data: DataConfig = Field(default_factory=DataConfig)
    trainer: TrainerConfig = Field(default_factory=TrainerConfig)
    evaluation: EvalConfig = Field(default_factory=EvalConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    # The method section: the typed model of the method's stage (method_section); an empty section
    # means no method (engine-only use).
    method: Any = Field(default_factory=dict)

    @model_validator(mode="after")
    def _typed_method(self) -> "ExperimentConfig":
        if isinstance(self.method, dict) and self.method:
            self.method = method_section(self.method)
        elif not isinstance(self.method, (dict, BaseModel)):
            raise ValueError(f"method must be a mapping, got {type(self.method).__name__}")
        return self


def stage_key(section: BaseModel) -> tuple[str, str]:
    """``(method, stage)`` of a typed method section: the key of its stage in ``STAGES``; a
    single-stage method's stage is named as the method."""
    return section.name, getattr(section, "stage", section.name)


# spellings of earlier releases: refused, naming the current one
RENAMED_STAGES = {("projection", "rtd"): "method: {name: rtd} (RTD is its own method; configs/rtd/)"}
# config files of earlier releases: old path under configs/ -> new
MOVED_CONFIGS = {"eval": "zeroshot", "projection/shapes_rtd.yaml": "rtd/shapes_rtd.yaml",
                 "projection/cirr_rtd.yaml": "rtd/cirr_rtd.yaml"}


def method_section(data: dict, source: str = "config") -> BaseModel:
    """A ``method`` section validated into the config model of its registered stage (unknown
    keys are errors; a section without ``stage`` means the method's default stage)."""
    name = data.get("name")
    renamed = RENAMED_STAGES.get((name, data.get("stage")))
    if renamed:
        raise ValueError(f"invalid config {source}:\n  method: {name}, stage {data.get('stage')} is now {renamed}")
    stages = {stage: spec for (method, stage), spec in STAGES.items() if method == name}
    if not stages:
        methods = sorted({method for method, _ in STAGES.keys()})
        raise ValueError(f"invalid config {source}:\n  method.name: must be one of {methods}, got {name!r}")
    stage = data.get("stage", next((s for s, spec in stages.items() if spec.default), next(iter(stages))))
    if stage not in stages:
        raise ValueError(f"invalid config {source}:\n  method.stage: must be one of {list(stages)}, got {stage!r}")
    model = stages[stage].config
    return validate(model, {**data, "stage": stage} if "stage" in model.model_fields else dict(data),
                    f"{source} (method)")


class ServeConfig(Strict):
    """Bounds and batching of ``cirlab serve`` (configs/serve/default.yaml)."""

    max_upload_bytes: int = Field(10 * 2**20, ge=1, description="request bodies above this are refused (413) "
                                  "before they are read")
    max_pixels: int = Field(40_000_000, ge=1, description="uploaded images with more pixels are refused (413) "
                            "from their header, never decoded (cirlab.data.images.MAX_PIXELS caps it)")
    allowed_types: list[str] = ["image/png", "image/jpeg", "image/webp"]
    allowed_formats: list[str] = ["PNG", "JPEG", "WEBP"]
    max_text_chars: int = Field(500, ge=1)
    max_k: int = Field(100, ge=1)
    max_batch: int = Field(16, ge=1, description="queries encoded together at most")
    batch_wait_ms: float = Field(5.0, ge=0, description="how long the first query of a batch waits for others")
    max_queue: int = Field(64, ge=1, description="queries waiting beyond this are refused (429)")
    request_timeout_s: float = Field(30.0, gt=0, description="a query not answered by then gets 504")
    health_timeout_s: float = Field(2.0, gt=0, description="/healthz answers 503 when the vector backend's probe "
                                    "takes longer")
    gallery_root: str | None = Field(None, description="gallery images are served only from inside this folder "
                                     "(or the index folder); default: the deepest folder holding the gallery's "
                                     "files at start")


def _deep_merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _moved(path: Path) -> str:
    """`` (moved to configs/<new>)`` when ``path`` is a config file of an earlier release."""
    parts = path.as_posix().split("configs/", 1)
    if len(parts) == 2:
        for old, new in MOVED_CONFIGS.items():
            if parts[1] == old or parts[1].startswith(old + "/"):
                return f" (moved to configs/{new}{parts[1][len(old):]})"
    return ""


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}{_moved(path)}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise ValueError(f"config file {path} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"config file {path} must hold a mapping at top level")
    return data


def _resolve_group(group: str, name: str, config_root: Path, origin: Path) -> Path:
    for candidate in (config_root / group / f"{name}.yaml", origin.parent / name):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"{origin}: defaults.{group} = {name!r}: expected {config_root / group / (name + '.yaml')}"
    )


def compose(path: str | Path, config_root: Path | None = None) -> dict:
    """Load an experiment file and merge the group files its ``defaults`` names."""
    path = find_config(path)
    config_root = config_root or CONFIG_ROOT
    raw = _read_yaml(path)
    merged: dict = {}
    for group, name in (raw.pop("defaults", None) or {}).items():
        group_data = compose(_resolve_group(group, str(name), config_root, path), config_root)
        merged = _deep_merge(merged, {group: group_data})
    return _deep_merge(merged, raw)


def apply_overrides(cfg: dict, overrides: list[str]) -> dict:
    """Apply ``a.b.c=value`` overrides; values are parsed as YAML scalars."""
    cfg = copy.deepcopy(cfg)
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like key.path=value")
        key, value = item.split("=", 1)
        node = cfg
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {item!r}: {p} is not a section")
        node[parts[-1]] = _parse_scalar(value)
    return cfg


def _parse_scalar(text: str) -> Any:
    """YAML scalar, except that ``1e-3`` is a float (YAML 1.1 would keep it a string)."""
    value = yaml.safe_load(text)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    return value


def validate(model: type[BaseModel], data: dict, source: str) -> Any:
    """Validate ``data`` into ``model``; errors name the source and the dotted field."""
    try:
        return model.model_validate(data)
    except ValidationError as e:
        lines = [f"invalid config {source}:"]
        for err in e.errors():
            msg = err["msg"].removeprefix("Value error, ")
            if msg.startswith("invalid config "):  # a section validated on its own (method): its lines
                lines += msg.split("\n")[1:]
                continue
            field = ".".join(str(p) for p in err["loc"])
            lines.append(f"  {field}: {msg}")
        raise ValueError("\n".join(lines)) from None


def load_config(path: str | Path, overrides: list[str] | None = None) -> ExperimentConfig:
    data = apply_overrides(compose(path), overrides or [])
    return validate(ExperimentConfig, data, str(path))


def dataset_defaults(dataset: str) -> DataConfig:
    """The data group of ``dataset`` (``configs/data/<dataset>.yaml``): its preprocessing and storage
    defaults, for commands that take a dataset name rather than a config; a benchmark without a
    data group (a plugin's) gets the field defaults."""
    path = CONFIG_ROOT / "data" / f"{dataset}.yaml"
    return validate(DataConfig, compose(path) if path.is_file() else {"dataset": dataset}, str(path))


def load_serve_config(path: str | Path | None = None, overrides: list[str] | None = None) -> ServeConfig:
    """The serve config in ``path`` (default ``configs/serve/default.yaml``) with ``overrides``."""
    default = CONFIG_ROOT / "serve" / "default.yaml"
    path = find_config(path) if path else default
    data = apply_overrides({} if path == default and not path.is_file() else compose(path), overrides or [])
    return validate(ServeConfig, data, str(path))
