"""The one record every loader produces, and the split interface every method consumes.

A loader reads a benchmark's real file layout into a :class:`CIRSplit`: a list of
:class:`Query` records (query mode) plus the gallery of image ids (gallery mode) and a
way to find each image on disk. Methods, evaluation and the submission writers only
see this interface, never a benchmark's JSON.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from cirlab.registry import BENCHMARKS
from cirlab.utils.io import read_json


@dataclass(frozen=True)
class Query:
    """One composed query.

    ``qid``: CIRR/shapes ``str(pairid)``; FashionIQ ``<category>-<index>``; CIRCO ``str(id)``.
    ``captions``: the raw relative caption(s); FashionIQ has two, the others one.
    ``target``: the annotated target id, ``None`` on test splits.
    ``positives``: every id that counts as a hit (CIRR: target_hard only, as the official
    server; shapes: every image with the target's scene; CIRCO: gt_img_ids).
    ``subset``: CIRR's ``img_set.members`` (6 ids, the reference included), else ``None``.
    ``extra``: dataset-specific fields (reversed caption, scene captions, category...).
    """

    qid: str
    reference: str
    captions: tuple[str, ...]
    target: str | None = None
    positives: tuple[str, ...] = ()
    subset: tuple[str, ...] | None = None
    extra: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)


@dataclass
class CIRSplit:
    """One split of one benchmark (for FashionIQ: one category)."""

    dataset: str
    split: str
    queries: list[Query]
    gallery: list[str]
    image_paths: Callable[[str], list[Path]]
    exclude_reference: bool
    name: str = ""

    def __post_init__(self) -> None:
        self.name = self.name or f"{self.dataset}/{self.split}"

    def find_image(self, image_id: str) -> Path | None:
        """The first existing file for ``image_id`` (FashionIQ ships .png or .jpg), else None."""
        for p in self.image_paths(image_id):
            if p.is_file():
                return p
        return None

    @property
    def has_targets(self) -> bool:
        return any(q.target is not None for q in self.queries)


# --- annotation-reading helpers shared by the loaders ----------------------------------------


def read_records(path: Path, what: str) -> list[dict[str, Any]]:
    """A JSON file holding a non-empty list of objects (the annotation format of every benchmark);
    an empty list is an error, as it is what a truncated download or a bad export leaves."""
    data = read_json(path, what)
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
    if not data:
        raise ValueError(f"{path}: no queries (the {what} holds an empty list)")
    for i, record in enumerate(data):
        if not isinstance(record, dict):
            raise ValueError(f"{path}: record {i} is a {type(record).__name__}, expected an object")
    return data


def field(record: dict[str, Any], key: str, path: Path, index: int, kind: type | tuple[type, ...] = object) -> Any:
    """``record[key]``, or a ValueError naming the file, the record and the field."""
    if key not in record:
        raise ValueError(f"{path}: record {index} lacks {key!r}")
    value = record[key]
    if not isinstance(value, kind):
        expected = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
        raise ValueError(f"{path}: record {index} has {key}={value!r:.80}, expected {expected}")
    return value


def check_unique_qids(queries: list[Query], path: Path) -> None:
    """Query ids key predictions files, so two records with one id could not be told apart."""
    first: dict[str, int] = {}
    for i, q in enumerate(queries):
        if q.qid in first:
            raise ValueError(f"{path}: records {first[q.qid]} and {i} have the same query id {q.qid!r}")
        first[q.qid] = i


def check_gallery(gallery: list[str], path: Path) -> None:
    """An empty gallery can only come from a broken split file; nothing could be retrieved."""
    if not gallery:
        raise ValueError(f"{path}: no gallery images")


def check_split_name(split: str, allowed: tuple[str, ...], dataset: str) -> None:
    if split not in allowed:
        raise ValueError(f"unknown {dataset} split {split!r}; expected one of {list(allowed)}")


class PathTable:
    """``image id -> [base / relative path]``, picklable so a split can travel to DataLoader workers.

    Ids the table does not know map to no file (reported missing by ``data check``).
    """

    def __init__(self, base: Path, relpaths: dict[str, str]) -> None:
        self.base = base
        self.relpaths = relpaths

    def __call__(self, image_id: str) -> list[Path]:
        rel = self.relpaths.get(image_id)
        return [] if rel is None else [self.base / rel]


# --- benchmarks ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Protocol:
    """What a benchmark's evaluation reports (scored by :mod:`cirlab.evaluation.protocols`)."""

    recall_ks: tuple[int, ...]
    subset_ks: tuple[int, ...] = ()  # Recall_subset@K over img_set.members (when present)
    map_ks: tuple[int, ...] = ()
    recall_on_target: bool = False  # CIRCO: Recall@K counts target_img_id only
    per_category: bool = False  # FashionIQ: metric names carry the category

    @property
    def depth(self) -> int:
        """How many ranked items the metrics look at (and a predictions file must hold)."""
        return max(self.recall_ks + self.map_ks)


@dataclass(frozen=True)
class Benchmark:
    """One benchmark: how its splits load, how it is scored, how predictions are submitted.

    ``load(root, split, category)``: one split (``category`` is None unless ``categories`` lists
    some: FashionIQ evaluates each category as its own split); ``read_extension(path, split)``:
    the file (after any per-split substitution) and the generated training triplets it holds, in
    the benchmark's caption format (SPN), None where it has no training split;
    ``generated_record(pairid=, reference=, target=, texts=, captioned=, target_copies=)``: one
    generated triplet as a record of that format (what ``spn generate`` writes); ``submission``:
    the predictions-file format (a writer of :mod:`cirlab.evaluation.submission`);
    ``backward_rows``: the generator stores both scene captions, so bidirectional models also get
    backward-retrieval rows (shapes)."""

    name: str
    load: Callable[[Path, str, str | None], CIRSplit]
    protocol: Protocol
    submission: str
    categories: tuple[str, ...] = ()
    read_extension: Callable[[Path, CIRSplit], tuple[Path, list[Query]]] | None = None
    generated_record: Callable[..., dict[str, Any]] | None = None
    backward_rows: bool = False

    def category_filter(self, categories: Any) -> list[str] | None:
        """``categories`` where the benchmark has categories (a config's ``data.categories``), else None."""
        return list(categories) if self.categories and categories else None

    def category_of(self, split: CIRSplit) -> str | None:
        """The category a split holds (from its ``<category>-<index>`` query ids), None without categories."""
        if not self.categories:
            return None
        names = {q.qid.rsplit("-", 1)[0] for q in split.queries}
        if len(names) != 1:
            raise ValueError(f"{split.name}: expected query ids '<category>-<index>' of one category, "
                             f"found categories {sorted(names)[:5]}")
        return names.pop()


def register_benchmark(benchmark: Benchmark) -> Benchmark:
    """Make ``benchmark`` known by its name (configs' ``data.dataset``, ``--dataset`` options)."""
    return BENCHMARKS.add(benchmark.name, benchmark)
