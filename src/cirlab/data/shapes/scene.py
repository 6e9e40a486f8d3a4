"""Scene graphs of the shapes benchmark: objects on a 3x3 grid, and the edits between scenes.

A scene is a tuple of :class:`Obj` sorted in grid order (row by row, top-left first), so
two scenes are identical exactly when their tuples are equal; this is the identity that
``target_soft`` uses.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

COLOURS = ("gray", "red", "blue", "green", "brown", "purple", "cyan", "yellow")  # CLEVR's eight
SIZES = ("small", "large")
SHAPES = ("square", "circle", "triangle")
ROWS = ("top", "middle", "bottom")
COLUMNS = ("left", "center", "right")
POSITIONS = tuple(f"{r}-{c}" for r in ROWS for c in COLUMNS)  # "top-left" ... "bottom-right"
ATTRIBUTES = ("cell", "size", "colour", "shape")
OPERATIONS = ("add", "remove", "colour", "size", "shape")
MAX_OBJECTS = 5

# Compositional hold-out (CLEVR CoGenT style): these (shape, colour) pairs never occur in a
# training image. Fixed rather than drawn from the seed so that every generated copy of the
# benchmark tests the same novel compositions; every shape and no colour twice.
HOLDOUT_PAIRS = (("square", "cyan"), ("circle", "yellow"), ("circle", "brown"),
                 ("triangle", "purple"))


class Obj(NamedTuple):
    cell: str
    colour: str
    size: str
    shape: str


Scene = tuple[Obj, ...]


def make_scene(objects) -> Scene:
    """Canonical scene: objects validated and sorted in grid order, at most one per cell."""
    objects = list(objects)
    for o in objects:
        for value, vocab, name in ((o.cell, POSITIONS, "cell"), (o.colour, COLOURS, "colour"),
                                   (o.size, SIZES, "size"), (o.shape, SHAPES, "shape")):
            if value not in vocab:
                raise ValueError(f"unknown {name} {value!r}; expected one of {', '.join(vocab)}")
    cells = [o.cell for o in objects]
    if len(set(cells)) != len(cells):
        raise ValueError(f"two objects share a cell: {sorted(cells)}")
    return tuple(sorted(objects, key=lambda o: POSITIONS.index(o.cell)))


def describe_object(o: Obj) -> str:
    return f"a {o.size} {o.colour} {o.shape}"


def scene_caption(scene: Scene) -> str:
    """Every object in grid order, e.g. 'a large red circle at the top-left, a small ...'."""
    if not scene:
        return "an empty scene"
    return ", ".join(f"{describe_object(o)} at the {o.cell}" for o in scene)


def scene_to_json(scene: Scene) -> dict[str, Any]:
    return {"objects": [o._asdict() for o in scene], "caption": scene_caption(scene)}


def scene_from_json(record: dict[str, Any]) -> Scene:
    try:
        return make_scene(Obj(**o) for o in record["objects"])
    except (KeyError, TypeError) as e:
        raise ValueError(f"scene record needs 'objects' with fields {Obj._fields}: {e}") from None


def holdout_pairs_in(scene: Scene, pairs) -> bool:
    return any((o.shape, o.colour) in pairs for o in scene)


@dataclass(frozen=True)
class Edit:
    """One modification. ``obj`` is the object as it is before the edit (for ``add``: the new
    object); ``value`` is the new attribute value of a change edit (colour, size or shape)."""

    op: str
    obj: Obj
    value: str | None = None

    def apply(self, scene: Scene) -> Scene:
        """The edited scene; ValueError when the edit does not fit the scene or changes nothing."""
        if self.op == "add":
            if any(o.cell == self.obj.cell for o in scene):
                raise ValueError(f"cannot add an object at the {self.obj.cell}: the cell is taken")
            return make_scene((*scene, self.obj))
        if self.obj not in scene:
            raise ValueError(f"no {self.obj.size} {self.obj.colour} {self.obj.shape} at the "
                             f"{self.obj.cell} in the scene")
        rest = [o for o in scene if o != self.obj]
        if self.op == "remove":
            return make_scene(rest)
        if self.op not in ("colour", "size", "shape"):
            raise ValueError(f"unknown operation {self.op!r}; expected {', '.join(OPERATIONS)}")
        if getattr(self.obj, self.op) == self.value:
            raise ValueError(f"the {self.obj.shape} at the {self.obj.cell} is already {self.value}")
        return make_scene((*rest, self.obj._replace(**{self.op: self.value})))

    def inverse(self) -> Edit:
        """The edit that takes the edited scene back to the original one."""
        if self.op == "add":
            return Edit("remove", self.obj)
        if self.op == "remove":
            return Edit("add", self.obj)
        return Edit(self.op, self.obj._replace(**{self.op: self.value}), getattr(self.obj, self.op))
