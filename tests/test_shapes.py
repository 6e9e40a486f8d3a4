"""The built-in shapes benchmark: determinism, hold-out, texts that replay, CIRR layout."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import pytest
from PIL import Image

from cirlab.data.shapes import (HOLDOUT_PAIRS, Obj, apply_text, format_stats, make_scene,
                                minimal_description, parse_text, render_scene, synthesize)
from cirlab.data.shapes.render import cell_centre
from cirlab.data.shapes.scene import scene_caption, scene_from_json
from cirlab.data.shapes.text import TEMPLATES, description_text, matches
from cirlab.data.show import draw_triplets

SCALE = dict(train_scenes=30, val_scenes=10, test_scenes=30)
SPLITS = ("train", "val", "test")
INVERSE_OP = {"add": "remove", "remove": "add"}


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes") / "data"
    stats = synthesize(out, **SCALE, seed=0, workers=2)
    return out, stats


def load(out: Path, split: str):
    captions = json.loads((out / "captions" / f"cap.shapes.{split}.json").read_text())
    paths = json.loads((out / "image_splits" / f"split.shapes.{split}.json").read_text())
    records = json.loads((out / "scenes" / f"scenes.shapes.{split}.json").read_text())
    return captions, paths, {iid: scene_from_json(r) for iid, r in records.items()}


def test_same_seed_gives_same_bytes_for_any_worker_count(generated, tmp_path):
    out, _ = generated
    synthesize(tmp_path / "again", **SCALE, seed=0, workers=1)
    first, second = tree_bytes(out), tree_bytes(tmp_path / "again")
    assert sorted(first) == sorted(second)
    assert len(first) == 6 * 70 + 3 * 3 + 1  # images, three files per split, meta.json
    for name in first:
        assert first[name] == second[name], name


def test_other_seed_differs(generated, tmp_path):
    out, _ = generated
    synthesize(tmp_path / "other", **SCALE, seed=1, workers=1)
    first, other = tree_bytes(out), tree_bytes(tmp_path / "other")
    assert first["captions/cap.shapes.train.json"] != other["captions/cap.shapes.train.json"]
    assert sum(first[k] != other[k] for k in first if k.endswith(".png")) > 100


def test_counts_layout_and_stats(generated):
    out, stats = generated
    pairids = []
    for split in SPLITS:
        captions, paths, scenes = load(out, split)
        n = SCALE[f"{split}_scenes"]
        assert len(captions) == 5 * n and len(paths) == len(scenes) == 6 * n
        for iid, rel in paths.items():
            assert rel == f"./images/{split}/{iid}.png" and (out / rel).is_file()
        s = stats["splits"][split]
        assert (s["images"], s["triplets"]) == (6 * n, 5 * n)
        assert sum(s["operations"].values()) == 5 * n
        assert f"{5 * n}" in format_stats(stats)
        pairids += [c["pairid"] for c in captions]
    assert len(set(pairids)) == len(pairids)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["holdout_pairs"] == [list(p) for p in HOLDOUT_PAIRS] and meta["seed"] == 0


def test_holdout_pairs_only_outside_train(generated, tmp_path):
    out, _ = generated
    held = set(HOLDOUT_PAIRS)

    def share_with_holdout(scenes):
        with_pair = [any((o.shape, o.colour) in held for o in s) for s in scenes.values()]
        return sum(with_pair) / len(with_pair)

    assert share_with_holdout(load(out, "train")[2]) == 0
    assert share_with_holdout(load(out, "test")[2]) > 0.25
    synthesize(tmp_path / "open", train_scenes=30, val_scenes=0, test_scenes=0, holdout=False,
               workers=1)
    assert share_with_holdout(load(tmp_path / "open", "train")[2]) > 0


def test_texts_replay_both_ways(generated):
    out, _ = generated
    for split in SPLITS:
        captions, _, scenes = load(out, split)
        for c in captions:
            reference, target = scenes[c["reference"]], scenes[c["target_hard"]]
            assert apply_text(reference, c["caption"]) == target, c["caption"]
            assert apply_text(target, c["caption_reversed"]) == reference, c["caption_reversed"]
            assert parse_text(c["caption"]).op == c["operation"]
            reversed_op = INVERSE_OP.get(c["operation"], c["operation"])
            assert parse_text(c["caption_reversed"]).op == reversed_op
            assert c["reference_caption"] == scene_caption(reference)
            assert c["target_caption"] == scene_caption(target)


def test_minimal_description_picks_out_one_object(generated):
    red_circle = Obj("top-left", "red", "small", "circle")
    red_square = Obj("top-right", "red", "large", "square")
    blue_circle = Obj("bottom-left", "blue", "small", "circle")
    scene = make_scene([red_circle, red_square, blue_circle])
    assert description_text(red_circle, minimal_description(scene, red_circle)) == "the red circle"
    assert description_text(red_square, minimal_description(scene, red_square)) == "the square"
    twin = Obj("bottom-right", "red", "small", "circle")
    scene = make_scene([red_circle, twin])
    assert description_text(twin, minimal_description(scene, twin)) == "the bottom-right object"
    assert description_text(twin, minimal_description((twin,), twin)) == "the object"

    out, _ = generated
    for scene in load(out, "test")[2].values():
        for o in scene:
            attrs = minimal_description(scene, o)
            assert matches(scene, {a: getattr(o, a) for a in attrs}) == [o]


def test_target_soft_and_members(generated):
    out, _ = generated
    for split in SPLITS:
        captions, _, scenes = load(out, split)
        same = defaultdict(set)
        for iid, s in scenes.items():
            same[s].add(iid)
        for c in captions:
            target = scenes[c["target_hard"]]
            assert set(c["target_soft"]) == same[target] and set(c["target_soft"].values()) == {1.0}
            members = c["img_set"]["members"]
            assert len(set(members)) == 6 and members[0] == c["reference"]
            assert members[c["img_set"]["target_rank"]] == c["target_hard"]
            others = [scenes[m] for m in members[1:] if m != c["target_hard"]]
            assert target not in others and scenes[c["reference"]] != target
    # identical scenes do occur, so the check above is not vacuous
    assert any(len(c["target_soft"]) > 1 for c in load(out, "train")[0])


def test_each_operation_uses_several_phrasings(generated):
    out, _ = generated
    used = defaultdict(set)
    for c in load(out, "train")[0]:
        used[c["operation"]].add(parse_text(c["caption"]).template)
    assert set(used) == set(TEMPLATES)
    assert all(len(templates) > 1 for templates in used.values()), used


def test_render_puts_colour_at_the_cell():
    image = render_scene(make_scene([Obj("top-left", "red", "large", "square")]), 64)
    assert image.size == (64, 64)
    x, y = cell_centre("top-left", 64)
    r, g, b = image.getpixel((int(x), int(y)))
    assert r > 150 and g < 80 and b < 80
    assert image.getpixel((63, 63)) == (255, 255, 255)
    assert image.getpixel((int(x) + 9, int(y))) == (255, 255, 255)  # large half-size is 8 px


def test_apply_text_rejects_what_it_cannot_do():
    red, blue = Obj("top-left", "red", "large", "circle"), Obj("middle-center", "blue", "large", "circle")
    scene = make_scene([red, blue])
    for text in ("fly the red circle to the moon", "", "make the red circle", "remove the green circle",
                 "remove the circle", "make the red circle bigger", "make the red circle red",
                 "add a small red square to the top-left"):
        with pytest.raises(ValueError):
            apply_text(scene, text)
    assert apply_text(scene, "Make the red circle SMALLER.") == make_scene([red._replace(size="small"), blue])
    assert apply_text(scene, "change the color of the blue circle to grey")[1].colour == "gray"


def test_synthesize_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="train_scenes"):
        synthesize(tmp_path, train_scenes=-1)
    with pytest.raises(ValueError, match="workers"):
        synthesize(tmp_path, workers=0)


def test_draw_triplets(generated, tmp_path):
    out, _ = generated
    captions, paths, _ = load(out, "val")
    rows = [(out / paths[c["reference"]], c["caption"], out / paths[c["target_hard"]])
            for c in captions[:3]]
    draw_triplets(rows, tmp_path / "grid.png", thumb=64)
    one_row = tmp_path / "one.png"
    draw_triplets(rows[:1], one_row, thumb=64)
    with Image.open(tmp_path / "grid.png") as three, Image.open(one_row) as one:
        assert three.width == one.width and three.height - one.height == 2 * (64 + 8)
    with pytest.raises(FileNotFoundError, match="missing.png"):
        draw_triplets([(tmp_path / "missing.png", "x", rows[0][2])], tmp_path / "bad.png")
