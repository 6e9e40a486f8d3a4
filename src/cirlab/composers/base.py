"""The composer: a trained CIR model as one object that everything downstream takes.

A composer maps gallery images to normalised vectors and (reference image, text) queries to
vectors in the same space; evaluation uses only this interface, and so will the planned index,
retrieval service and second stages (SPN). It owns its backbone, its heads and its *query recipe* (how texts and images
are prepared), so a folder written by :meth:`Composer.save` is all it needs to work again.

Images come in as PIL images, paths, a pixel batch ``(B, 3, H, W)`` or the backbone's cached
features: ``(B, d)`` embeddings or ``(B, L, h)`` tokens, whichever ``gallery_field`` /
``reference_field`` name (the feature cache stores exactly those fields, see
:func:`cirlab.features.encode.image_features`).

Folder layout::

    composer.json     format, version, kind, recipe, the parts' sub-folders, fingerprint, provenance
    backbone/         HF folder of the backbone (model + tokenizer)
    <head>/           head folders (combiner/, reranker/), each with head.json + model.safetensors
"""

from __future__ import annotations

import hashlib
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterator, Literal, Sequence

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from cirlab.data.base import CIRSplit
from cirlab.data.fashioniq import fiq_val_texts
from cirlab.data.images import decode_image
from cirlab.data.transforms import build_transform
from cirlab.features.cache import FeatureSet
from cirlab.features.encode import TokenDtype, image_features, split_image_ids
from cirlab.models import Backbone, load_backbone, save_backbone
from cirlab.utils.io import atomic_dir, dump_json, read_json, recover_dir

FORMAT, VERSION = "cirlab-composer", 1
MANIFEST = "composer.json"
FORWARD, BACKWARD = "[FORWARD]", "[BACKWARD]"

Field = Literal["embeds", "tokens"]
ImageInput = torch.Tensor | Sequence[Image.Image | str | Path]


def with_direction(text: str, forward: bool, mode: str) -> str:
    """``text`` with its Bi-BLIP4CIR direction marker: ``tokens`` prepends ``[FORWARD]`` /
    ``[BACKWARD]`` (learnable tokens); ``compat`` reproduces the official text prefix, prepended
    to every chunk of the text split on the substring "and" (inside words too); ``none`` adds nothing."""
    token = FORWARD if forward else BACKWARD
    if mode == "tokens":
        return f"{token} {text}"
    if mode == "compat":
        return "and".join(f" {token} {chunk}" for chunk in text.split("and"))
    return text


@dataclass(frozen=True)
class QueryRecipe:
    """Everything besides the weights that changes a query's or an image's vector.

    ``prompt`` wraps the text (``{text}`` is replaced; projection-based zero-shot CIR uses
    e.g. "a photo of $ that {text}"); ``direction`` is the Bi-BLIP4CIR marker mode;
    ``backward_text`` says what a backward query's text is ("forward": the forward text with
    ``[BACKWARD]``; "reversed": the shapes generator's exact reversed text, marked forward);
    ``backward_target`` how a backward query's image enters the sum, as stage I trained it
    ("normalized": normalize(T) + t, the official reversed query; "raw": T + t);
    ``caption_orders`` the rule that turns FashionIQ's two captions into the query text(s), as
    each official evaluation does it (:data:`cirlab.data.fashioniq.VAL_RULES`): "one" (the
    supervised repos' "C1 and c2", '.?, ' stripped), "one-uncapitalized" (SPN4CIR's CLIP-based
    models), "both" (SEARLE, LinCIR, RTD: the mean of "c1 and c2" and "c2 and c1") or
    "pic2word" ("c2 and c1", unstripped)."""

    prompt: str = "{text}"
    direction: Literal["tokens", "compat", "none"] = "none"
    backward_text: Literal["forward", "reversed"] = "forward"
    backward_target: Literal["normalized", "raw"] = "normalized"
    caption_orders: Literal["one", "one-uncapitalized", "both", "pic2word"] = "one"
    max_text_length: int = 77
    transform: Literal["targetpad", "squarepad", "resize"] = "targetpad"
    target_ratio: float = 1.25

    def text(self, text: str, forward: bool = True) -> str:
        """``text`` as the text encoder reads it: wrapped in ``prompt``, with the direction marker."""
        return with_direction(self.prompt.replace("{text}", text), forward, self.direction)

    def query_texts(self, captions: Sequence[str]) -> tuple[str, ...]:
        """The raw text(s) a query is composed from at evaluation: a single caption as it is,
        FashionIQ's two by ``caption_orders``; several texts are averaged (see
        :func:`cirlab.evaluation.evaluate.query_vectors`)."""
        return tuple(captions) if len(captions) == 1 else fiq_val_texts(captions, self.caption_orders)


@contextmanager
def evaluating(module: nn.Module) -> Iterator[None]:
    """Eval mode inside, then every submodule back to the mode it had: composers share their
    modules with training stages, which must find them as they left them."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


class Composer(nn.Module):
    """Base of every composer. Subclasses set ``kind``, the fields they read and :meth:`compose`."""

    kind: ClassVar[str] = ""
    heads: ClassVar[tuple[str, ...]] = ()  # sub-folders besides backbone/
    gallery_field: Field = "embeds"
    reference_field: Field = "embeds"
    gallery_tokens: int | None = None  # with gallery_field "tokens": how many leading tokens it reads
    reranks: ClassVar[bool] = False  # a second stage rescores the first stage's top K (rerank_topk)

    def __init__(self, backbone: Backbone, recipe: QueryRecipe):
        super().__init__()
        self.backbone, self.recipe = backbone, recipe
        self.preprocess = build_transform(recipe.transform, backbone.image_size, recipe.target_ratio)

    # -- what a row of results is called ------------------------------------------------------------
    @property
    def name(self) -> str:
        """The row name of this model in result tables (``cirlab eval``, the demo)."""
        return self.kind

    @property
    def bidirectional(self) -> bool:
        """Whether backward queries (target + backward text -> reference) mean something."""
        return self.recipe.direction != "none"

    # -- images ---------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        """The device of the backbone, where inputs are moved before encoding."""
        return self.backbone.device

    def transform_name(self) -> str:
        """The preprocessing as a feature-cache key part."""
        return f"{self.recipe.transform}-{self.recipe.target_ratio}-{self.backbone.image_size}"

    def features(self, split: CIRSplit, *, ids: Sequence[str] | None = None, fields: Sequence[Field] | None = None,
                 batch_size: int = 64, token_dtype: TokenDtype = "float16") -> FeatureSet:
        """The cached image ``fields`` (default: the gallery and reference fields this composer reads)
        of a split's images (``ids``; default: gallery and references), under the composer's own
        backbone and preprocessing: the feature cache's key is the composer's, never rebuilt by hand."""
        wanted = set(fields) if fields is not None else {self.gallery_field, self.reference_field}
        return image_features(self.backbone, split, self.preprocess, self.transform_name(),
                              ids=list(ids) if ids is not None else split_image_ids(split),
                              embeds="embeds" in wanted, tokens="tokens" in wanted, batch_size=batch_size,
                              token_dtype=token_dtype)

    def pixels(self, images: Sequence[Image.Image | str | Path]) -> torch.Tensor:
        """Decode (paths) and preprocess a list of images into a pixel batch."""
        return torch.stack([self.preprocess(decode_image(x) if isinstance(x, (str, Path)) else x) for x in images])

    @torch.no_grad()
    def image_features(self, images: ImageInput, fields: Sequence[Field]) -> dict[str, torch.Tensor]:
        """The backbone's ``fields`` of a batch of images (PIL, paths or pixels), float32."""
        pixels = images if isinstance(images, torch.Tensor) else self.pixels(images)
        with evaluating(self.backbone):
            out = self.backbone.encode_image(pixels.to(self.device))
        return {f: getattr(out, f).float() for f in fields}

    def _as_field(self, images: ImageInput, field_: Field) -> torch.Tensor:
        """``images`` as rows of ``field_``: cached features pass through, anything else is encoded."""
        if isinstance(images, torch.Tensor) and images.dim() == (2 if field_ == "embeds" else 3):
            return images.to(self.device)
        if isinstance(images, torch.Tensor) and images.dim() != 4:
            raise ValueError(f"{self.kind} composer: expected images (B, 3, H, W) or cached {field_} "
                             f"({'(B, d)' if field_ == 'embeds' else '(B, L, h)'}), got shape {tuple(images.shape)}")
        return self.image_features(images, [field_])[field_]

    @torch.no_grad()
    def encode_gallery(self, images: ImageInput) -> torch.Tensor:
        """(N, d) normalised gallery vectors of images or of their cached ``gallery_field``."""
        with evaluating(self):
            return self.gallery_vectors(self._as_field(images, self.gallery_field))

    @torch.no_grad()
    def encode_queries(self, references: ImageInput, texts: Sequence[str], *, forward: bool = True) -> torch.Tensor:
        """(Q, d) normalised query vectors of reference images (or their cached
        ``reference_field``) and raw modification texts; the recipe formats the texts.
        ``forward=False`` asks the reverse direction (target + text -> reference)."""
        if len(references) != len(texts):
            raise ValueError(f"{self.kind} composer: {len(references)} references for {len(texts)} texts")
        with evaluating(self):
            return self.compose(self._as_field(references, self.reference_field), list(texts), forward=forward)

    def gallery_vectors(self, features: torch.Tensor) -> torch.Tensor:
        """Normalised gallery vectors from rows of ``gallery_field``."""
        return F.normalize(features.to(self.device).float(), dim=-1)

    def compose(self, references: torch.Tensor, texts: list[str], *, forward: bool = True) -> torch.Tensor:
        """Normalised query vectors from rows of ``reference_field`` and raw texts (with gradient)."""
        raise NotImplementedError

    def query_parameters(self) -> list[nn.Parameter]:
        """What a second stage (SPN) may train: the query side; the gallery side stays fixed."""
        raise NotImplementedError

    def rerank_topk(self, tokens: Callable[[torch.Tensor], torch.Tensor], references: torch.Tensor,
                    texts: Sequence[str], candidates: torch.Tensor, stage1: torch.Tensor) -> torch.Tensor:
        """(Q, C) final scores of each query's top-C candidates. ``tokens(rows)`` gives image token rows
        (the feature cache's, or images encoded on the spot); ``references`` (Q,) and ``candidates``
        (Q, C) are such rows (-1 = padding, scored -inf); ``stage1`` (Q, C) the first stage's scores.
        Evaluation and search both call this. A one-stage composer keeps ``stage1``: the identity."""
        return stage1.masked_fill(candidates < 0, float("-inf"))

    # -- text helpers ---------------------------------------------------------------------------------
    def tokenize(self, texts: list[str], forward: bool = True):
        """The backbone's token batch of the texts formatted by the recipe (prompt, direction marker)."""
        return self.backbone.tokenize([self.recipe.text(t, forward) for t in texts],
                                      max_length=self.recipe.max_text_length)

    def encode_text(self, texts: list[str], forward: bool = True) -> torch.Tensor:
        """Unnormalised text-only features of the formatted texts."""
        enc = self.tokenize(texts, forward)
        return self.backbone.encode_text(enc.input_ids, enc.attention_mask)

    # -- identity and folders -------------------------------------------------------------------------
    def fingerprint(self) -> str:
        """A digest of everything that changes a vector: kind, recipe, config, the backbone's
        fingerprint and the heads' weights. An index records it, so that it is never queried
        with another model."""
        h = hashlib.blake2b(digest_size=16)
        # recipe fields at their defaults are left out, so a field added later keeps old fingerprints
        recipe = {k: v for k, v in asdict(self.recipe).items() if v != getattr(QueryRecipe, k)}
        h.update(dump_json({"kind": self.kind, "recipe": recipe, "config": self.config(),
                            "backbone": self.backbone.fingerprint()}).encode())
        for name, tensor in sorted(self.state_dict().items()):
            if "backbone" not in name.split(".")[:2]:  # the backbone, also as a first stage's (first.backbone.*)
                h.update(name.encode())
                h.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        return h.hexdigest()

    def config(self) -> dict[str, Any]:
        """The constructor arguments besides the backbone, recipe and heads (JSON)."""
        return {}

    def save_heads(self, folder: Path, fingerprint: str) -> None:
        """Write the head folders into ``folder``, naming the backbone ``fingerprint`` (subclasses with heads)."""

    def save(self, path: str | Path, provenance: dict[str, Any] | None = None) -> Path:
        """Write the composer folder atomically; ``provenance`` (e.g. which checkpoint) is recorded."""
        path = Path(path)
        fingerprint = self.backbone.fingerprint()
        with atomic_dir(path) as tmp:
            save_backbone(self.backbone, tmp / "backbone")
            self.save_heads(tmp, fingerprint)
            manifest = {"format": FORMAT, "version": VERSION, "kind": self.kind, "backbone": "backbone",
                        "backbone_kind": self.backbone.kind, "heads": list(self.heads),
                        "recipe": asdict(self.recipe), "config": self.config(),
                        "fingerprint": fingerprint, "provenance": provenance or {}}
            (tmp / MANIFEST).write_text(dump_json(manifest, indent=1) + "\n")
        return path

    @classmethod
    def from_parts(cls, backbone: Backbone, recipe: QueryRecipe, folder: Path, config: dict[str, Any],
                   fingerprint: str) -> Composer:
        """Rebuild from a loaded backbone (of ``fingerprint``), the recipe and the folder's heads."""
        return cls(backbone, recipe, **config)


REGISTRY: dict[str, type[Composer]] = {}


def register(cls: type[Composer]) -> type[Composer]:
    """Class decorator: makes ``cls`` loadable by ``kind`` (what :func:`load` reads from ``composer.json``)."""
    REGISTRY[cls.kind] = cls
    return cls


def read_manifest(path: str | Path) -> dict[str, Any]:
    """The checked ``composer.json`` of a composer folder; errors name the file and field."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"model folder not found: {path}")
    file = path / MANIFEST
    if not file.is_file():
        raise FileNotFoundError(f"{path} is not a cirlab model folder: no {MANIFEST} (nor a backbone folder: "
                                f"no config.json)")
    manifest = read_json(file, "composer manifest")
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ValueError(f"{file}: not a cirlab composer manifest (format {FORMAT!r} expected)")
    if manifest.get("version") != VERSION:
        raise ValueError(f"{file}: unsupported version {manifest.get('version')!r} (this cirlab reads {VERSION})")
    for key, kind in (("kind", str), ("backbone", str), ("recipe", dict), ("config", dict)):
        if not isinstance(manifest.get(key), kind):
            raise ValueError(f"{file}: field {key!r} is missing or not a {kind.__name__}")
    if manifest["kind"] not in REGISTRY:
        raise ValueError(f"{file}: unknown composer kind {manifest['kind']!r} (known: {sorted(REGISTRY)})")
    return manifest


def load(path: str | Path, device: str | torch.device = "cpu") -> Composer:
    """The composer saved in ``path``, in eval mode; no training code or config is needed. A plain
    backbone folder (BLIP or CLIP, e.g. from ``cirlab import blip``) gives its zero-shot model
    (:meth:`~cirlab.composers.ZeroShotComposer.from_backbone`).

    The backbone's fingerprint is checked against the manifest, so a folder whose parts were
    swapped or damaged is refused rather than silently giving other results."""
    path = recover_dir(path)  # a crash mid-export leaves the old model, put back here
    if not (path / MANIFEST).is_file() and (path / "config.json").is_file():  # a plain BLIP / CLIP folder
        return REGISTRY["zeroshot"].from_backbone(load_backbone(path, device=device)).to(device).eval()
    manifest = read_manifest(path)
    backbone = load_backbone(path / manifest["backbone"], kind=manifest.get("backbone_kind"), device=device)
    fingerprint = backbone.fingerprint()
    if manifest.get("fingerprint") not in (None, fingerprint):
        raise ValueError(f"{path / MANIFEST}: the backbone in {path / manifest['backbone']} is not the one this "
                         f"model was saved with (fingerprint differs)")
    try:
        recipe = QueryRecipe(**manifest["recipe"])
    except TypeError as e:
        raise ValueError(f"{path / MANIFEST}: field 'recipe': {e}") from None
    try:
        composer = REGISTRY[manifest["kind"]].from_parts(backbone, recipe, path, manifest["config"], fingerprint)
    except (TypeError, ValueError) as e:  # a bad value in the manifest's config, or a head folder's own error
        raise ValueError(f"{path}: {e}") from None
    return composer.to(device).eval()
