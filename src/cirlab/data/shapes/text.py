"""Modification texts: naming an object, phrasing an edit, and parsing a text back into an edit.

One template table serves both directions: the generator fills a template, the parser
compiles the same template into a regular expression, so every phrasing the generator
emits is one the parser reads (``apply_text``), and the reversed texts can be checked by
applying them.
"""

from __future__ import annotations

import random
import re
import string
from dataclasses import dataclass
from itertools import combinations

from .scene import ATTRIBUTES, COLOURS, POSITIONS, SHAPES, SIZES, Edit, Obj, Scene, describe_object

# Several phrasings per operation so that a text encoder has to read the words that matter
# rather than memorise one template. {d}: an existing object ("the top-left red square");
# {a}: a new object ("a small red circle"); the other fields are the new value.
TEMPLATES: dict[str, tuple[str, ...]] = {
    "add": ("add {a} to the {position}", "put {a} in the {position}",
            "place {a} at the {position}", "insert {a} at the {position}"),
    "remove": ("remove {d}", "take away {d}", "delete {d}", "get rid of {d}"),
    "colour": ("make {d} {colour}", "change the colour of {d} to {colour}",
               "turn {d} {colour}", "paint {d} {colour}"),
    "size": ("make {d} {size}", "make {d} {bigger}", "change the size of {d} to {size}",
             "{grow} {d}"),
    "shape": ("replace {d} with a {shape}", "turn {d} into a {shape}",
              "make {d} a {shape}", "change {d} into a {shape}"),
}

# Words of each value field, keyed by the attribute value they stand for.
VALUE_WORDS: dict[str, dict[str, str]] = {
    "colour": {c: c for c in COLOURS},
    "size": {s: s for s in SIZES},
    "bigger": {"large": "bigger", "small": "smaller"},
    "grow": {"large": "enlarge", "small": "shrink"},
    "shape": {s: s for s in SHAPES},
    "position": {p: p for p in POSITIONS},
}

# Spellings a person may type that mean the same as the generator's words.
_SYNONYMS = (("color", "colour"), ("grey", "gray"), ("centre", "center"))


def _alternation(words) -> str:
    return "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))


_DESCRIPTION_RE = (
    rf"the (?:(?P<cell>{_alternation(POSITIONS)}) )?(?:(?P<size>{_alternation(SIZES)}) )?"
    rf"(?:(?P<colour>{_alternation(COLOURS)}) )?(?P<noun>{_alternation((*SHAPES, 'object'))})"
)
_NEW_OBJECT_RE = (
    rf"an? (?P<new_size>{_alternation(SIZES)}) (?P<new_colour>{_alternation(COLOURS)}) "
    rf"(?P<new_shape>{_alternation(SHAPES)})"
)


# --------------------------------------------------------------------------- naming objects

def matches(scene: Scene, description: dict[str, str]) -> list[Obj]:
    """The objects of ``scene`` that fit every attribute in ``description``."""
    return [o for o in scene if all(getattr(o, a) == v for a, v in description.items())]


def sufficient_descriptions(scene: Scene, obj: Obj) -> list[tuple[str, ...]]:
    """Every attribute subset (fewest first) that picks out ``obj`` alone in ``scene``."""
    subsets = [s for k in range(len(ATTRIBUTES) + 1) for s in combinations(ATTRIBUTES, k)]
    return [s for s in subsets if matches(scene, {a: getattr(obj, a) for a in s}) == [obj]]


def minimal_description(scene: Scene, obj: Obj) -> tuple[str, ...]:
    """The fewest of shape, colour, size that single out ``obj`` (in that preference), else
    its position alone: "the circle", "the red circle", "the large red circle", "the top-left
    object". Deterministic, so that the only variation in naming comes from the seeded RNG."""
    for k in range(4):
        for subset in combinations(("shape", "colour", "size"), k):
            if matches(scene, {a: getattr(obj, a) for a in subset}) == [obj]:
                return tuple(a for a in ATTRIBUTES if a in subset)
    return ("cell",)


def description_text(obj: Obj, attributes) -> str:
    """'the' + the chosen attributes in a fixed order + the shape or 'object'."""
    words = [getattr(obj, a) for a in ATTRIBUTES if a in attributes and a != "shape"]
    words.append(obj.shape if "shape" in attributes else "object")
    return "the " + " ".join(words)


def choose_description(scene: Scene, obj: Obj, rng: random.Random) -> tuple[str, ...]:
    """Half the time the minimal description, else any sufficient one (e.g. with position)."""
    if rng.random() < 0.5:
        return minimal_description(scene, obj)
    return rng.choice(sufficient_descriptions(scene, obj))


# --------------------------------------------------------------------------- phrasing edits

def _value_field(template: str) -> str:
    """The field that carries a change's new value ("colour", "bigger", ...)."""
    return next(n for n in VALUE_WORDS if n != "position" and "{" + n + "}" in template)


def edit_text(scene: Scene, edit: Edit, rng: random.Random) -> str:
    """A modification text for ``edit``; existing objects are named as they are in ``scene``."""
    template = rng.choice(TEMPLATES[edit.op])
    if edit.op == "add":
        return template.format(a=describe_object(edit.obj), position=edit.obj.cell)
    fields = {"d": description_text(edit.obj, choose_description(scene, edit.obj, rng))}
    if edit.op != "remove":
        name = _value_field(template)
        fields[name] = VALUE_WORDS[name][edit.value]
    return template.format(**fields)


# --------------------------------------------------------------------------- parsing texts

@dataclass(frozen=True)
class ParsedText:
    """A text read back: the operation, the template that matched, and what it names.
    ``description`` names the existing object (attribute -> value); ``new`` is the object an
    ``add`` creates; ``value`` is the new attribute value of a change."""

    op: str
    template: str
    description: dict[str, str] | None = None
    new: Obj | None = None
    value: str | None = None


def _compile(template: str) -> re.Pattern:
    parts = []
    for literal, name, _, _ in string.Formatter().parse(template):
        parts.append(re.escape(literal))
        if name == "d":
            parts.append(_DESCRIPTION_RE)
        elif name == "a":
            parts.append(_NEW_OBJECT_RE)
        elif name is not None:
            group = "position" if name == "position" else "value"
            parts.append(f"(?P<{group}>{_alternation(VALUE_WORDS[name].values())})")
    return re.compile("".join(parts))


_PATTERNS = [(op, t, _compile(t)) for op, ts in TEMPLATES.items() for t in ts]


def normalise(text: str) -> str:
    text = " ".join(text.lower().split()).rstrip(".!")
    for variant, word in _SYNONYMS:
        text = re.sub(rf"\b{variant}\b", word, text)
    return text


def parse_text(text: str) -> ParsedText:
    """Read a modification text in any phrasing of :data:`TEMPLATES`; ValueError otherwise."""
    clean = normalise(text)
    for op, template, pattern in _PATTERNS:
        m = pattern.fullmatch(clean)
        if m is None:
            continue
        g = m.groupdict()
        if op == "add":
            new = Obj(g["position"], g["new_colour"], g["new_size"], g["new_shape"])
            return ParsedText(op, template, new=new)
        description = {a: g[a] for a in ("cell", "size", "colour") if g[a]}
        if g["noun"] != "object":
            description["shape"] = g["noun"]
        value = None
        if op != "remove":
            words = VALUE_WORDS[_value_field(template)]
            value = next(v for v, w in words.items() if w == g["value"])
        return ParsedText(op, template, description=description, value=value)
    raise ValueError(
        f"cannot parse modification text {text!r}; expected e.g. 'make the red circle blue', "
        "'remove the top-left object', 'add a small red circle to the middle-left'"
    )


def apply_text(scene: Scene, text: str) -> Scene:
    """The scene after the modification ``text``. ValueError when the text cannot be parsed,
    does not name exactly one object of ``scene``, or does not fit it (occupied cell, no-op)."""
    parsed = parse_text(text)
    if parsed.op == "add":
        return Edit("add", parsed.new).apply(scene)
    found = matches(scene, parsed.description)
    if len(found) != 1:
        raise ValueError(f"{text!r} names {len(found)} objects of the scene; expected exactly one")
    return Edit(parsed.op, found[0], parsed.value).apply(scene)
