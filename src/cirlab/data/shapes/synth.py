"""Generating the benchmark: scenes, five edits per reference scene, images and CIRR-layout files.

Each reference scene gets five different edits, hence five target scenes; its five triplets
share ``img_set.members`` = [reference, the 5 targets], so the other four targets are the
hard distractors of each triplet (CIRR's subset protocol). Every scene is drawn from a
``random.Random`` seeded by (seed, split, index) alone, so the output does not depend on
the number of worker processes.
"""

from __future__ import annotations

import multiprocessing
import random
from collections import Counter, defaultdict
from functools import partial
from pathlib import Path
from typing import Any

from ...utils.io import atomic_write_bytes, atomic_write_json, read_json
from .render import png_bytes, render_scene
from .scene import (COLOURS, HOLDOUT_PAIRS, MAX_OBJECTS, OPERATIONS, POSITIONS, SHAPES, SIZES, Edit,
                    Obj, Scene, holdout_pairs_in, make_scene, scene_caption, scene_to_json)
from .text import edit_text

GENERATOR_VERSION = 1
SPLITS = ("train", "val", "test")
TARGETS_PER_SCENE = 5
# Relative frequency of 0..5 objects in a reference scene (CSS: mostly 2 to 5, some empty).
OBJECT_COUNT_WEIGHTS = (1, 3, 4, 4, 4, 4)
# In val/test, share of add/colour/shape edits steered into a held-out (shape, colour) pair,
# so that the novel compositions are what the edit text asks for, not only scenery.
NOVEL_EDIT_RATE = 0.5


def scene_rng(seed: int, split: str, index: int) -> random.Random:
    # A string seed is hashed with SHA-512 by random.Random: stable across processes and runs.
    return random.Random(f"cirlab-shapes/{seed}/{split}/{index}")


def sample_scene(rng: random.Random, pairs: list[tuple[str, str]]) -> Scene:
    n = rng.choices(range(MAX_OBJECTS + 1), weights=OBJECT_COUNT_WEIGHTS)[0]
    cells = rng.sample(POSITIONS, n)
    return make_scene(Obj(cell, colour, rng.choice(SIZES), shape)
                      for cell, (shape, colour) in zip(cells, rng.choices(pairs, k=n)))


def sample_edit(scene: Scene, rng: random.Random, pairs: list[tuple[str, str]],
                novel: tuple[tuple[str, str], ...]) -> Edit | None:
    """A random edit whose result uses only ``pairs``; with ``novel`` pairs given, some edits
    are steered into them. None when the drawn edit has no admissible value."""
    can_add, can_change = len(scene) < MAX_OBJECTS, bool(scene)
    ops = [op for op in OPERATIONS if (can_add if op == "add" else can_change)]
    op = rng.choice(ops)
    steer = bool(novel) and op in ("add", "colour", "shape") and rng.random() < NOVEL_EDIT_RATE
    if op == "add":
        cell = rng.choice([c for c in POSITIONS if all(o.cell != c for o in scene)])
        shape, colour = rng.choice(novel if steer else pairs)
        return Edit("add", Obj(cell, colour, rng.choice(SIZES), shape))
    obj = rng.choice(scene)
    if op == "remove":
        return Edit("remove", obj)
    if op == "size":
        return Edit("size", obj, "small" if obj.size == "large" else "large")
    if op == "colour":
        options = [c for c in COLOURS if c != obj.colour and (obj.shape, c) in pairs]
        steered = [c for c in options if (obj.shape, c) in novel]
    else:
        options = [s for s in SHAPES if s != obj.shape and (s, obj.colour) in pairs]
        steered = [s for s in options if (s, obj.colour) in novel]
    options = steered if steer and steered else options
    return Edit(op, obj, rng.choice(options)) if options else None


def make_group(seed: int, split: str, index: int, pairs: list[tuple[str, str]],
               novel: tuple[tuple[str, str], ...]) -> tuple[Scene, list[dict[str, Any]]]:
    """A reference scene and its five edits to pairwise different target scenes."""
    rng = scene_rng(seed, split, index)
    reference = sample_scene(rng, pairs)
    seen, edits = {reference}, []
    while len(edits) < TARGETS_PER_SCENE:  # every scene admits far more than five distinct edits
        edit = sample_edit(reference, rng, pairs, novel)
        if edit is None or (target := edit.apply(reference)) in seen:
            continue
        seen.add(target)
        edits.append({"operation": edit.op, "target": target,
                      "caption": edit_text(reference, edit, rng),
                      "caption_reversed": edit_text(target, edit.inverse(), rng)})
    return reference, edits


def image_id(split: str, index: int, member: int) -> str:
    """Member 0 is the reference scene, 1..5 its targets."""
    return f"{split}-{index:06d}-{member}"


def _build_group(index: int, *, seed, split, pairs, novel, image_size, out) -> tuple[Scene, list]:
    """Worker task: one group's scenes and texts; its six images are written here."""
    reference, edits = make_group(seed, split, index, pairs, novel)
    for member, scene in enumerate([reference] + [e["target"] for e in edits]):
        path = out / "images" / split / f"{image_id(split, index, member)}.png"
        atomic_write_bytes(path, png_bytes(render_scene(scene, image_size)))
    return reference, edits


def _split_files(split: str, groups: list, first_pairid: int, first_group: int,
                 holdout_pairs) -> tuple[list, dict, dict, dict]:
    """One split's caption records, image paths and scene records, plus its statistics."""
    scenes: dict[str, Scene] = {}
    for index, (reference, edits) in enumerate(groups):
        for member, scene in enumerate([reference] + [e["target"] for e in edits]):
            scenes[image_id(split, index, member)] = scene
    same_scene = defaultdict(list)
    for iid, scene in scenes.items():
        same_scene[scene].append(iid)

    captions = []
    for index, (reference, edits) in enumerate(groups):
        members = [image_id(split, index, m) for m in range(TARGETS_PER_SCENE + 1)]
        for k, e in enumerate(edits, start=1):
            captions.append({
                "pairid": first_pairid + len(captions),
                "reference": members[0],
                "target_hard": members[k],
                "target_soft": {iid: 1.0 for iid in same_scene[e["target"]]},
                "caption": e["caption"],
                "caption_reversed": e["caption_reversed"],
                "reference_caption": scene_caption(reference),
                "target_caption": scene_caption(e["target"]),
                "operation": e["operation"],
                "img_set": {"id": first_group + index, "members": members,
                            "reference_rank": 0, "target_rank": k},
            })
    paths = {iid: f"./images/{split}/{iid}.png" for iid in scenes}
    records = {iid: scene_to_json(s) for iid, s in scenes.items()}
    stats = {
        "scenes": len(groups),
        "images": len(scenes),
        "unique_scenes": len(same_scene),
        "triplets": len(captions),
        "operations": dict(Counter(c["operation"] for c in captions)),
        "holdout_images": sum(holdout_pairs_in(s, holdout_pairs) for s in scenes.values()),
    }
    return captions, paths, records, stats


def synthesize(out: Path, *, train_scenes: int = 4000, val_scenes: int = 400,
               test_scenes: int = 800, image_size: int = 64, seed: int = 0, holdout: bool = True,
               workers: int = 2) -> dict:
    """Write the benchmark under ``out`` and return its statistics (see :func:`format_stats`)."""
    out = Path(out)
    scales = {"train": train_scenes, "val": val_scenes, "test": test_scenes}
    limits = [*((f"{s}_scenes", n, 0) for s, n in scales.items()), ("image_size", image_size, 16),
              ("workers", workers, 1)]
    for name, value, low in limits:
        if not isinstance(value, int) or value < low:
            raise ValueError(f"shapes: {name} must be an integer >= {low}, got {value!r}")
    holdout_pairs = HOLDOUT_PAIRS if holdout else ()
    all_pairs = [(s, c) for s in SHAPES for c in COLOURS]
    stats: dict[str, Any] = {"seed": seed, "image_size": image_size,
                             "holdout_pairs": [list(p) for p in holdout_pairs], "splits": {}}
    first_pairid = first_group = 0
    pool = multiprocessing.get_context("spawn").Pool(workers) if workers > 1 else None
    try:
        for split in SPLITS:
            train = split == "train"
            task = partial(_build_group, seed=seed, split=split, image_size=image_size, out=out,
                           pairs=[p for p in all_pairs if not (train and p in holdout_pairs)],
                           novel=() if train else holdout_pairs)
            n = scales[split]
            if pool is None:
                groups = [task(i) for i in range(n)]
            else:
                chunk = max(1, min(64, n // (4 * workers)))
                groups = list(pool.imap(task, range(n), chunksize=chunk))
            captions, paths, records, stats["splits"][split] = _split_files(
                split, groups, first_pairid, first_group, holdout_pairs)
            atomic_write_json(out / "captions" / f"cap.shapes.{split}.json", captions)
            atomic_write_json(out / "image_splits" / f"split.shapes.{split}.json", paths)
            atomic_write_json(out / "scenes" / f"scenes.shapes.{split}.json", records)
            first_pairid += len(captions)
            first_group += n
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    atomic_write_json(out / "meta.json", {
        "generator": "cirlab.data.shapes", "version": GENERATOR_VERSION, "seed": seed,
        "scales": scales, "image_size": image_size, "targets_per_scene": TARGETS_PER_SCENE,
        "holdout": holdout, "holdout_pairs": stats["holdout_pairs"],
        "vocabulary": {"colours": list(COLOURS), "sizes": list(SIZES), "shapes": list(SHAPES),
                       "positions": list(POSITIONS), "operations": list(OPERATIONS)},
        "stats": stats["splits"],
    }, indent=2)
    return stats


def read_stats(out: Path) -> dict:
    """The statistics of an already generated benchmark, from its ``meta.json``."""
    meta = read_json(Path(out) / "meta.json", "shapes meta file")
    return {"seed": meta["seed"], "image_size": meta["image_size"],
            "holdout_pairs": meta["holdout_pairs"],
            "splits": {split: meta["stats"][split] for split in SPLITS if split in meta["stats"]}}


def format_stats(stats: dict) -> str:
    """A plain-text table of what :func:`synthesize` wrote."""
    rows = [["split", "scenes", "images", "unique", "triplets", *OPERATIONS, "held-out imgs"]]
    for split, s in stats["splits"].items():
        rows.append([split, s["scenes"], s["images"], s["unique_scenes"], s["triplets"],
                     *(s["operations"].get(op, 0) for op in OPERATIONS), s["holdout_images"]])
    widths = [max(len(str(v)) for v in column) for column in zip(*rows)]
    lines = ["  ".join(str(v).rjust(w) if i else str(v).ljust(w)
                       for i, (v, w) in enumerate(zip(row, widths))) for row in rows]
    pairs = ", ".join(f"{colour} {shape}" for shape, colour in stats["holdout_pairs"]) or "none"
    lines.append(f"held-out (shape, colour) pairs, absent from every train image: {pairs}")
    return "\n".join(lines)
