"""The built-in shapes benchmark, in the style of CSS (Vo et al., Composing Text and Image for
Image Retrieval - An Empirical Odyssey, CVPR 2019).

Scenes of 0 to 5 coloured squares, circles and triangles on a 3x3 grid, rendered with
Pillow on white (64 px by default, 4x supersampled); five edits per reference scene (add,
remove, change colour, size or shape), phrased in several templates; written in CIRR's
layout so that the CIRR loader reads it unchanged:

    captions/cap.shapes.{train,val,test}.json      CIRR triplets + caption_reversed,
                                                   reference_caption, target_caption, operation
    image_splits/split.shapes.{split}.json         {image id: "./images/<split>/<id>.png"}
    scenes/scenes.shapes.{split}.json              {image id: {"objects": [...], "caption": ...}}
    images/<split>/<split>-<scene:06d>-<member>.png member 0 = reference, 1..5 = targets
    meta.json                                      version, seed, scales, hold-out pairs, vocabulary

Default scale: 4000 train, 400 val, 800 test reference scenes, i.e. 31,200 images and
26,000 triplets (6 images and 5 triplets per scene), 160 MB on disk; 18 to 31 s with 2
workers on the project's 2-core machine, 25 to 34 s with one (benchmarks/bench_synth.py).
The (shape, colour) pairs in :data:`HOLDOUT_PAIRS` never occur in a train image; val/test
steer half of their add, colour and shape edits into them. The same seed gives
byte-identical files for any number of workers.
"""

from .render import render_scene
from .scene import (COLOURS, HOLDOUT_PAIRS, POSITIONS, SHAPES, SIZES, Edit, Obj, Scene, make_scene,
                    scene_caption)
from .synth import format_stats, read_stats, synthesize
from .text import apply_text, minimal_description, parse_text

__all__ = [
    "COLOURS", "HOLDOUT_PAIRS", "POSITIONS", "SHAPES", "SIZES", "Edit", "Obj", "Scene",
    "apply_text", "format_stats", "make_scene", "minimal_description", "parse_text",
    "read_stats", "render_scene", "scene_caption", "synthesize",
]
