"""``cirlab data check``: does every image a split refers to exist on disk?

Run before a long job: FashionIQ mirrors lack many images (REFERENCE 0.7), and a wrong
``root`` shows up here as "everything missing" rather than as a crash hours in. Each
distinct file is stat-ed once, so tens of thousands of ids take well under a second;
``decode=True`` also opens every file with Pillow to catch truncated or non-image files.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

from PIL import Image

from cirlab.data.base import CIRSplit


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


def _readable(path: Path, decode: bool) -> bool:
    try:
        st = os.stat(path)
    except OSError:
        return False
    if not stat.S_ISREG(st.st_mode) or st.st_size == 0:
        return False
    if decode:
        try:
            with Image.open(path) as image:
                image.verify()
        except Exception:  # Pillow raises many types for a corrupt file; all mean "unreadable"
            return False
    return True


def check_splits(splits: list[CIRSplit], *, decode: bool = False) -> dict[str, Any]:
    """Counts and missing images, summed over ``splits`` (e.g. FashionIQ's three categories).

    Returns ``{"queries", "gallery", "missing": sorted unique ids, "splits": [per-split detail]}``;
    ``gallery`` sums each split's distinct gallery ids.
    """
    seen: dict[Path, bool] = {}  # FashionIQ categories share one images/ folder
    missing: set[str] = set()
    details = []
    for split in splits:
        ids = _referenced_ids(split)
        split_missing = set()
        for image_id in ids:
            found = False
            for path in split.image_paths(image_id):
                if path not in seen:
                    seen[path] = _readable(path, decode)
                if seen[path]:
                    found = True
                    break
            if not found:
                split_missing.add(image_id)
        missing |= split_missing
        details.append(
            {
                "name": split.name,
                "queries": len(split.queries),
                "gallery": len(set(split.gallery)),
                "images": len(ids),
                "missing": len(split_missing),
            }
        )
    return {
        "queries": sum(d["queries"] for d in details),
        "gallery": sum(d["gallery"] for d in details),
        "missing": sorted(missing),
        "splits": details,
    }


def format_check(report: dict[str, Any], examples: int = 5) -> str:
    """A short human-readable table of :func:`check_splits`' report."""
    lines = [
        f"{d['name']}: {d['queries']} queries, {d['gallery']} gallery images, "
        f"{d['missing']} of {d['images']} referenced images missing"
        for d in report.get("splits", [])
    ]
    missing = report["missing"]
    total = f"total: {report['queries']} queries, {report['gallery']} gallery images, {len(missing)} missing"
    if missing:
        more = ", ..." if len(missing) > examples else ""
        total += f" (e.g. {', '.join(missing[:examples])}{more})"
    return "\n".join([*lines, total])
