"""``cirlab data check``: does every image a split refers to exist on disk, and can it be read?

Run before a long job: FashionIQ mirrors lack many images (CLIP4Cir issue #1, SPN4CIR issue
#5), and a wrong ``root`` shows up here as "everything missing" rather than as a crash hours
in. Each distinct file is checked once: its header is read (:func:`open_image`, no decoding:
about 0.1 ms a file from a warm cache against 1.6 ms to decode a 256 px one), so a file that is
not an image, or one over the pixel limit, is reported; ``decode=True`` also
decodes every file as the datasets do (:func:`load_image`), to catch truncated data.

:func:`drop_missing` removes what is not on disk from a split, so that evaluation can run
on what exists (and say how much it left out) instead of refusing to start.
"""

from __future__ import annotations

import dataclasses
import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from cirlab.data.base import CIRSplit
from cirlab.data.images import load_image, open_image

Status = Literal["ok", "missing", "unreadable"]


def _referenced_ids(split: CIRSplit) -> set[str]:
    """Gallery ids plus every id a query names (reference, target, positives, subset)."""
    ids = set(split.gallery)
    for q in split.queries:
        ids.add(q.reference)
        if q.target is not None:
            ids.add(q.target)
        ids.update(q.positives)
        if q.subset:
            ids.update(q.subset)
    return ids


def _file_status(path: Path, decode: bool) -> Status:
    try:
        st = os.stat(path)
    except OSError:
        return "missing"
    if not stat.S_ISREG(st.st_mode):
        return "missing"
    if st.st_size == 0:
        return "unreadable"
    try:
        if decode:
            load_image(path)
        else:
            open_image(path).close()  # the header only
    except OSError:
        return "unreadable"
    return "ok"


def image_status(split: CIRSplit, ids: Iterable[str], *, decode: bool = False,
                 seen: dict[Path, Status] | None = None) -> dict[str, Status]:
    """``{id: "missing" | "unreadable"}`` for those of ``ids`` that cannot be read.

    An id's file is the first existing one (what :meth:`CIRSplit.find_image` and the datasets
    read), so a broken .png next to a good .jpg counts as unreadable. ``seen`` caches each
    file's status across calls (FashionIQ's categories share one images/ folder).
    """
    seen = {} if seen is None else seen
    bad: dict[str, Status] = {}
    for image_id in ids:
        status: Status = "missing"
        for path in split.image_paths(image_id):
            if path not in seen:
                seen[path] = _file_status(path, decode)
            if seen[path] != "missing":
                status = seen[path]
                break
        if status != "ok":
            bad[image_id] = status
    return bad


def neighbour_folders(root: str | Path) -> list[Path]:
    """The folders one level from ``root``: its parent, then its subfolders (sorted): where a
    dataset root given one level too deep or too shallow really is."""
    root = Path(root)
    parent = root.parent if root.parent != root else root.resolve().parent  # "." -> the real parent
    folders = [parent] if parent.resolve() != root.resolve() else []
    try:
        folders += sorted(p for p in root.iterdir() if p.is_dir())
    except OSError:  # root does not exist or is not a folder
        pass
    return folders


def suggest_root(splits: list[CIRSplit], root: str | Path, sample: int = 20) -> Path | None:
    """The folder one level up or down from ``root`` (its parent or a subfolder) under which
    the images of ``splits`` are, for a root under which none is; None when there is none.

    Each split's image paths are taken relative to ``root`` and looked for under each candidate,
    for ``sample`` gallery ids spread over each gallery; the candidate holding the most wins."""
    root = Path(root)
    rels: list[Path] = []
    for split in splits:
        ids = split.gallery[:: max(1, len(split.gallery) // sample)][:sample]
        for image_id in ids:
            for path in split.image_paths(image_id):
                try:
                    rels.append(path.relative_to(root))
                except ValueError:  # an image outside root (an absolute path in the annotations)
                    pass
    if not rels:
        return None
    best, hits = None, 0
    for candidate in neighbour_folders(root):
        found = sum((candidate / rel).is_file() for rel in rels)
        if found > hits:
            best, hits = candidate, found
    return best


def check_splits(splits: list[CIRSplit], *, decode: bool = False, root: str | Path | None = None) -> dict[str, Any]:
    """Counts and missing images, summed over ``splits`` (e.g. FashionIQ's three categories).

    Returns ``{"queries", "gallery", "missing", "unreadable", "splits": [per-split detail]}``;
    ``missing`` lists (sorted, unique) every id that cannot be used, absent or unreadable,
    ``unreadable`` those of them whose file exists but cannot be read; ``gallery`` sums each
    split's distinct gallery ids. Given the dataset ``root`` the splits were loaded from, the
    report also holds ``"suggested_root"``: when every referenced image is missing, the folder
    next to it that holds them (:func:`suggest_root`), else None.
    """
    seen: dict[Path, Status] = {}
    bad: dict[str, Status] = {}
    details = []
    referenced: set[str] = set()
    for split in splits:
        ids = _referenced_ids(split)
        referenced |= ids
        split_bad = image_status(split, ids, decode=decode, seen=seen)
        bad.update(split_bad)
        details.append(
            {
                "name": split.name,
                "queries": len(split.queries),
                "gallery": len(set(split.gallery)),
                "images": len(ids),
                "missing": len(split_bad),
                "unreadable": sum(s == "unreadable" for s in split_bad.values()),
            }
        )
    report = {
        "queries": sum(d["queries"] for d in details),
        "gallery": sum(d["gallery"] for d in details),
        "missing": sorted(bad),
        "unreadable": sorted(i for i, s in bad.items() if s == "unreadable"),
        "splits": details,
    }
    if root is not None:
        nothing = bool(referenced) and all(bad.get(i) == "missing" for i in referenced)  # not one file there
        hint = suggest_root(splits, root) if nothing else None
        report["suggested_root"] = None if hint is None else str(hint)
    return report


def _examples(ids: list[str], n: int) -> str:
    return ", ".join(ids[:n]) + (", ..." if len(ids) > n else "")


def format_check(report: dict[str, Any], examples: int = 5) -> str:
    """A short human-readable table of :func:`check_splits`' report."""
    lines = []
    for d in report.get("splits", []):
        line = (f"{d['name']}: {d['queries']} queries, {d['gallery']} gallery images, "
                f"{d['missing']} of {d['images']} referenced images missing")
        if d.get("unreadable"):
            line += f" ({d['unreadable']} unreadable)"
        lines.append(line)
    unreadable = report.get("unreadable", [])
    if unreadable:
        lines.append(f"unreadable (the file exists but cannot be decoded): {len(unreadable)} "
                     f"(e.g. {_examples(unreadable, examples)})")
    missing = report["missing"]
    total = f"total: {report['queries']} queries, {report['gallery']} gallery images, {len(missing)} missing"
    if missing:
        total += f" (e.g. {_examples(missing, examples)})"
    lines.append(total)
    if report.get("suggested_root"):
        lines.append(f"every referenced image is missing, but they are under {report['suggested_root']}: "
                     f"try --root {report['suggested_root']}")
    return "\n".join(lines)


@dataclass(frozen=True)
class Dropped:
    """What :func:`drop_missing` removed from split ``name``; ``str()`` is its one-line report."""

    name: str
    images: tuple[str, ...]  # referenced image ids that are absent (or unreadable), sorted
    gallery: tuple[str, ...]  # gallery ids removed
    queries: tuple[str, ...]  # qids removed
    positives_trimmed: int  # queries kept with some (not all) of their positives removed
    gallery_before: int
    queries_before: int

    def __str__(self) -> str:
        if not self.images:
            return f"{self.name}: every referenced image is on disk"
        text = (f"{self.name}: {len(self.images)} images missing or unreadable "
                f"(e.g. {_examples(list(self.images), 5)}); evaluating without {len(self.gallery)} of {self.gallery_before} gallery images and "
                f"{len(self.queries)} of {self.queries_before} queries")
        if self.queries:
            text += f" (e.g. {_examples(list(self.queries), 5)})"
        if self.positives_trimmed:
            text += f"; {self.positives_trimmed} queries lost some of their positives"
        return text


def drop_missing(split: CIRSplit, *, decode: bool = False) -> tuple[CIRSplit, Dropped]:
    """``split`` without the images that are not on disk, and a :class:`Dropped` report.

    Removes missing gallery images, and every query whose reference, target or any
    ``subset`` member is missing (Rs@K needs the whole member set), or all of whose positives
    are; a kept query loses only its missing positives. With nothing missing, ``split``
    itself comes back. ``decode=True`` also counts files that cannot be decoded (slow: it
    decodes every image once). Raises ValueError when no query or no gallery image is left,
    which usually means a wrong dataset root.
    """
    bad = image_status(split, _referenced_ids(split), decode=decode)
    if not bad:
        return split, Dropped(split.name, (), (), (), 0, len(split.gallery), len(split.queries))
    gallery = [i for i in split.gallery if i not in bad]
    queries, dropped, trimmed = [], [], 0
    for q in split.queries:
        positives = tuple(p for p in q.positives if p not in bad)
        needed = [q.reference, *([q.target] if q.target is not None else []), *(q.subset or ())]
        if any(i in bad for i in needed) or (q.positives and not positives):
            dropped.append(q.qid)
            continue
        if positives != q.positives:
            trimmed += 1
            q = dataclasses.replace(q, positives=positives)
        queries.append(q)
    report = Dropped(split.name, tuple(sorted(bad)), tuple(i for i in split.gallery if i in bad),
                     tuple(dropped), trimmed, len(split.gallery), len(split.queries))
    if not queries or not gallery:
        raise ValueError(f"{report}: nothing left to evaluate; is the dataset root right?")
    return dataclasses.replace(split, queries=queries, gallery=gallery), report
