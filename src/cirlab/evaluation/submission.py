"""Prediction files: the CIRR and CIRCO server formats, a FashionIQ equivalent, and a reader.

Every file maps query ids to ranked gallery ids, best first:

* CIRR (and shapes): ``recall_submission_<name>.json`` =
  ``{"version": "rc2", "metric": "recall", "<pairid>": [top-50 image names]}`` and
  ``recall_subset_submission_<name>.json`` with ``"metric": "recall_subset"`` and the top 3
  of the query's member set; keys ``str(int(pairid))``; each file at most 5 MB.
* CIRCO: ``{"<query id>": [top-50 image ids]}`` (integer ids, as the server's examples).
* FashionIQ (no server; for ``cirlab score``):
  ``{"version": "fashioniq", "metric": "recall", "<category>-<index>": [top-50 ids]}``,
  one file for any number of categories.

Writers validate the rankings against the split first (every query present, ids in the
gallery, no duplicates, deep enough; under CIRR's protocol a list holding the reference is
an error, never silently dropped) and write atomically, so a bad call leaves nothing behind
and an existing file is never half-overwritten.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import Tensor

from cirlab.data.base import CIRSplit
from cirlab.data.registry import benchmark
from cirlab.evaluation.metrics import rank_gallery, rank_subset
from cirlab.evaluation.protocols import index_split, validate_rankings
from cirlab.utils.io import atomic_write_text, read_json

MAX_SUBMISSION_BYTES = 5_000_000  # the CIRR server's "5 MB", read strictly
TOP_K = 50
SUBSET_TOP_K = 3
META_KEYS = ("version", "metric")

Rankings = Mapping[str, Sequence[str]]


def rankings_from_similarity(split: CIRSplit, sim: Tensor,
                             k: int = TOP_K) -> tuple[dict[str, list[str]], dict[str, list[str]] | None]:
    """Top-``k`` gallery ids per query (reference deleted where the protocol says), and the
    ranked member set without the reference when the split has one (else None)."""
    expected = (len(split.queries), len(split.gallery))
    if tuple(sim.shape) != expected:
        raise ValueError(f"{split.name}: similarity has shape {tuple(sim.shape)}, expected {expected}")
    index = index_split(split, require_targets=False)
    qids = [q.qid for q in split.queries]

    def to_ids(ranking: Tensor) -> dict[str, list[str]]:
        return {qid: [split.gallery[i] for i in row if i >= 0] for qid, row in zip(qids, ranking.tolist())}

    ranked = to_ids(rank_gallery(sim, k, index.exclude))
    subset = to_ids(rank_subset(sim, index.members, index.exclude)) if index.members is not None else None
    return ranked, subset


def _serialize(path: Path, payload: dict[str, Any], limit: int | None = None) -> str:
    """Compact JSON (a full CIRR file is about 4.0 MB this way, 4.2 MB with spaces)."""
    text = json.dumps(payload, sort_keys=True, separators=(",", ":")) + "\n"
    size = len(text.encode("utf-8"))
    if limit is not None and size > limit:
        raise ValueError(f"{path}: the submission would be {size:,} bytes, over the server's limit of {limit:,}")
    return text


def _pairid(qid: str) -> str:
    try:
        return str(int(qid))
    except ValueError:
        raise ValueError(f"query id {qid!r} is not an integer pairid") from None


def write_cirr_submission(out_dir: str | os.PathLike, name: str, ranked: Rankings, subset_ranked: Rankings,
                          *, split: CIRSplit) -> tuple[Path, Path]:
    """Write CIRR's two server files into ``out_dir``; returns (recall, recall_subset) paths.

    Lists are cut to the top 50 / top 3. ``split`` (the test1 split, targets not needed)
    is used to check the rankings before anything is written.
    """
    validate_rankings(split, ranked, subset_ranked, labels=("CIRR rankings", "CIRR subset rankings"))
    out_dir = Path(out_dir)
    texts = {}
    recall_name, subset_name = FILE_NAMES["cirr"](name)
    for file_name, metric, lists, k in ((recall_name, "recall", ranked, TOP_K),
                                        (subset_name, "recall_subset", subset_ranked, SUBSET_TOP_K)):
        path = out_dir / file_name
        payload: dict[str, Any] = {"version": "rc2", "metric": metric}
        payload.update({_pairid(qid): list(ids[:k]) for qid, ids in lists.items()})
        texts[path] = _serialize(path, payload, MAX_SUBMISSION_BYTES)
    for path, text in texts.items():  # both checked before either is written
        atomic_write_text(path, text)
    recall, subset = texts
    return recall, subset


def write_circo_submission(path: str | os.PathLike, ranked: Rankings, *, split: CIRSplit) -> Path:
    """CIRCO's server format: ``{"<query id>": [top-50 image ids]}`` with integer image ids."""
    validate_rankings(split, ranked, labels=("CIRCO rankings", ""))
    path = Path(path)
    payload = {qid: [int(x) if x.isdigit() else x for x in ids[:TOP_K]] for qid, ids in ranked.items()}
    atomic_write_text(path, _serialize(path, payload))
    return path


def write_fashioniq_predictions(path: str | os.PathLike, ranked: Rankings, *, splits: Sequence[CIRSplit]) -> Path:
    """cirlab's FashionIQ predictions file (one or several categories, keyed ``<category>-<index>``)."""
    seen: set[str] = set()
    for split in splits:
        part = {q.qid: ranked[q.qid] for q in split.queries if q.qid in ranked}
        validate_rankings(split, part, labels=("FashionIQ rankings", ""))
        seen.update(part)
    unknown = sorted(set(ranked) - seen)
    if unknown:
        raise ValueError(f"FashionIQ rankings: {len(unknown)} query ids are in none of the splits "
                         f"(e.g. {', '.join(unknown[:5])})")
    payload: dict[str, Any] = {"version": "fashioniq", "metric": "recall"}
    payload.update({qid: list(ids[:TOP_K]) for qid, ids in ranked.items()})
    path = Path(path)
    atomic_write_text(path, _serialize(path, payload))
    return path


def read_predictions(path: str | os.PathLike,
                     qids: Sequence[str] | None = None) -> tuple[dict[str, str], dict[str, list[str]]]:
    """Read any of the formats above into ``(meta, {query id: [image ids as strings]})``.

    Checks the structure (a JSON object of lists of unique ids, no key twice) and, given
    ``qids``, that the file covers exactly those queries; every error names the file and the key.
    """
    path = Path(path)
    data = read_json(path, "predictions file", unique_keys=True)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object mapping query ids to ranked image ids, "
                         f"got {type(data).__name__}")
    meta = {k: data[k] for k in META_KEYS if k in data}
    for key, value in meta.items():
        if not isinstance(value, str):
            raise ValueError(f"{path}: {key!r} should be a string, got {value!r}")
    ranked: dict[str, list[str]] = {}
    for key, ids in data.items():
        if key in META_KEYS:
            continue
        if not isinstance(ids, list):
            raise ValueError(f"{path}: the value of {key!r} should be a list of image ids, got {type(ids).__name__}")
        if not all(isinstance(x, (str, int)) and not isinstance(x, bool) for x in ids):
            raise ValueError(f"{path}: the list of {key!r} should hold image ids (strings or integers)")
        ids = [str(x) for x in ids]
        if len(set(ids)) != len(ids):
            dup = next(x for i, x in enumerate(ids) if x in ids[:i])
            raise ValueError(f"{path}: the list of {key!r} holds {dup!r} twice")
        ranked[key] = ids
    if qids is not None:
        check_coverage(path, ranked, qids)
    return meta, ranked


def check_coverage(path: str | os.PathLike, ranked: Mapping[str, object], qids: Sequence[str]) -> None:
    """The file must rank exactly ``qids``: a partial file is a mistake, not a row of misses."""
    expected = set(qids)
    missing = [q for q in qids if q not in ranked]
    if missing:
        raise ValueError(f"{path}: {len(missing)} of {len(expected)} queries are missing "
                         f"(e.g. {', '.join(missing[:5])}); a partial predictions file cannot be scored")
    unknown = sorted(k for k in ranked if k not in expected)
    if unknown:
        raise ValueError(f"{path}: {len(unknown)} keys are not query ids of this split "
                         f"(e.g. {', '.join(unknown[:5])})")


def _cirr_files(out: Path, tag: str, splits: Sequence[CIRSplit], rankings: Sequence[tuple]) -> list[Path]:
    (ranked, subset), = rankings
    return list(write_cirr_submission(out, tag, ranked, subset, split=splits[0]))


def _circo_file(out: Path, tag: str, splits: Sequence[CIRSplit], rankings: Sequence[tuple]) -> list[Path]:
    (ranked, _), = rankings
    return [write_circo_submission(out / FILE_NAMES["circo"](tag)[0], ranked, split=splits[0])]


def _fashioniq_file(out: Path, tag: str, splits: Sequence[CIRSplit], rankings: Sequence[tuple]) -> list[Path]:
    merged = {qid: ids for ranked, _ in rankings for qid, ids in ranked.items()}
    return [write_fashioniq_predictions(out / FILE_NAMES["fashioniq"](tag)[0], merged, splits=splits)]


# a submission format -> the names of the files its writer gives a tag: (ranked, subset ranked or None)
FILE_NAMES = {"cirr": lambda tag: (f"recall_submission_{tag}.json", f"recall_subset_submission_{tag}.json"),
              "circo": lambda tag: (f"circo_submission_{tag}.json", None),
              "fashioniq": lambda tag: (f"fashioniq_predictions_{tag}.json", None)}


# a benchmark's ``submission`` format -> writer(out folder, file tag, splits, per-split (ranked, subset ranked))
WRITERS = {"cirr": _cirr_files, "circo": _circo_file, "fashioniq": _fashioniq_file}


def write_submission(out: str | os.PathLike, tag: str, splits: Sequence[CIRSplit],
                     rankings: Sequence[tuple[Rankings, Rankings | None]]) -> list[Path]:
    """The rankings of ``splits`` in their benchmark's submission format (its ``submission``)."""
    fmt = benchmark(splits[0].dataset).submission
    if fmt not in WRITERS:
        raise ValueError(f"{splits[0].dataset}: unknown submission format {fmt!r} (known: {', '.join(WRITERS)})")
    return WRITERS[fmt](Path(out), tag, splits, rankings)
