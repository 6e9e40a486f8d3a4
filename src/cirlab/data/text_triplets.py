"""Text-only triplets (reference caption, conditioning text, target caption) and caption keywords.

RTD tunes a text encoder on such triplets, without images; LinCIR trains its Phi on captions
whose keywords are masked. Triplet sources:

* :func:`shapes_triplets`: the shapes generator's own (``reference_caption``, caption,
  ``target_caption``) of each query;
* :func:`rule_triplets`: attribute and object swaps over any list of captions, seeded;
* :func:`read_triplets`: a JSON list with ``reference_caption``, ``conditioning_caption``,
  ``target_caption`` (the CompoDiff-style file the official RTD code reads).

:func:`read_captions` reads a caption corpus, LinCIR's training text outside shapes.

Keywords (:func:`keyword_spans`): LinCIR takes spaCy's maximal runs of NOUN / PROPN / ADJ / DET
tokens. spaCy's English model is not an official PyPI package, so it is used when importable
and otherwise a lexicon heuristic stands in: a word is a keyword word unless it is a closed-class
function word (prepositions, conjunctions, pronouns, auxiliaries) or looks like a verb form
(ending in -ing / -ed and not in the attribute lexicon), and maximal runs of keyword words are
the spans. On shapes captions ("a small red circle at the top-left") both give the same spans.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Sequence

from cirlab.data.base import CIRSplit, field, read_records
from cirlab.utils.io import read_json
from cirlab.data.shapes.scene import COLOURS, POSITIONS, SHAPES, SIZES

MARKER = "$"
FUNCTION_WORDS = frozenset("""
    at of in on with without to from by for into onto over under above below behind beside near next
    and or but nor so than then while as if that which who whom whose where when
    is are was were be been being am has have had do does did will would can could should may might must
    it its it's he she they them their his her him we us our you your i me my mine yours ours theirs
    there here not no very too also just only more most less least instead
    """.split())
# attribute and object words the rule-based generator swaps (shapes' own, plus common catalogue words)
LEXICON: dict[str, tuple[str, ...]] = {
    "colour": tuple(dict.fromkeys((*COLOURS, "black", "white", "pink", "orange", "beige", "navy"))),
    "size": tuple(dict.fromkeys((*SIZES, "big", "tiny", "long", "short"))),
    "shape": SHAPES,
    "position": POSITIONS,
}
TEMPLATES = ("change {a} to {b}", "make it {b} instead of {a}", "{b} instead of {a}", "replace {a} with {b}")
_WORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9'-]*")


@dataclass(frozen=True)
class TextTriplet:
    reference_caption: str
    conditioning_caption: str
    target_caption: str


def clean_caption(text: str) -> str:
    """As the official loader: lower-cased, ``$`` removed (it marks the pseudo-word)."""
    return text.lower().replace(MARKER, "").strip()


# -- sources ---------------------------------------------------------------------------------------


def shapes_triplets(split: CIRSplit) -> list[TextTriplet]:
    """The generator's scene captions around each shapes query."""
    missing = [q.qid for q in split.queries if "reference_caption" not in q.extra]
    if missing:
        raise ValueError(f"{split.name}: query {missing[0]} has no scene captions (a shapes split is needed)")
    return [TextTriplet(q.extra["reference_caption"], q.captions[0], q.extra["target_caption"]) for q in split.queries]


def rule_triplets(captions: Sequence[str], *, per_caption: int = 1, seed: int = 0) -> list[TextTriplet]:
    """For each caption, ``per_caption`` triplets that swap one lexicon word (colour, size, shape,
    position) for another of its class, the change said by a template. Captions with no lexicon
    word give none."""
    rng = random.Random(seed)
    out = []
    for caption in captions:
        words = [(m, cls) for m in _WORD.finditer(caption) for cls, vocab in LEXICON.items()
                 if m.group().lower() in vocab]
        for _ in range(per_caption if words else 0):
            match, cls = rng.choice(words)
            a = match.group().lower()
            b = rng.choice([w for w in LEXICON[cls] if w != a])
            target = caption[:match.start()] + b + caption[match.end():]
            out.append(TextTriplet(caption, rng.choice(TEMPLATES).format(a=a, b=b), target))
    return out


def read_triplets(path: str | Path) -> list[TextTriplet]:
    """A JSON list of records with ``reference_caption``, ``conditioning_caption``, ``target_caption``."""
    path = Path(path)
    records = read_records(path, "text triplets file")
    return [TextTriplet(*(field(r, k, path, i, str) for k in ("reference_caption", "conditioning_caption",
                                                                 "target_caption")))
            for i, r in enumerate(records)]


def read_captions(path: str | Path) -> list[str]:
    """A caption corpus (LinCIR's Phi training text): a JSON list of strings (``.json``) or one
    caption per line; blank lines are skipped and repeats kept once, in file order."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"caption corpus not found: {path}")
    if path.suffix == ".json":
        data = read_json(path, "caption corpus")
        if not isinstance(data, list):
            raise ValueError(f"{path}: expected a JSON list of captions, got {type(data).__name__}")
        bad = next((i for i, c in enumerate(data) if not isinstance(c, str)), None)
        if bad is not None:
            raise ValueError(f"{path}: entry {bad} is a {type(data[bad]).__name__}, expected a caption string")
        captions = [c.strip() for c in data]
    else:
        captions = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    captions = list(dict.fromkeys(c for c in captions if c))
    if not captions:
        raise ValueError(f"{path}: no captions")
    return captions


# -- keywords (LinCIR's masking) -------------------------------------------------------------------


@lru_cache(maxsize=1)
def _spacy():
    try:
        import spacy

        return spacy.load("en_core_web_sm")
    except Exception:  # not installed, or no English model: the heuristic stands in
        return None


def _is_keyword_word(word: str) -> bool:
    w = word.lower()
    if w in FUNCTION_WORDS:
        return False
    in_lexicon = any(w in vocab for vocab in LEXICON.values())
    return in_lexicon or not (len(w) > 4 and (w.endswith("ing") or w.endswith("ed")))


def keyword_spans(caption: str, *, use_spacy: bool = True) -> list[tuple[int, int]]:
    """Character spans of the caption's keywords: maximal runs of keyword words (spaCy: POS in
    NOUN, PROPN, ADJ, DET), only whitespace between the words of a run."""
    nlp = _spacy() if use_spacy else None
    if nlp is not None:
        tokens = [(t.idx, t.idx + len(t.text), t.pos_ in ("NOUN", "PROPN", "ADJ", "DET")) for t in nlp(caption)]
    else:
        tokens = [(w.start(), w.end(), bool(_WORD.fullmatch(w.group())) and _is_keyword_word(w.group()))
                  for w in re.finditer(r"[A-Za-z0-9][A-Za-z0-9'-]*|[^A-Za-z0-9\s]", caption)]
    spans: list[tuple[int, int]] = []
    for start, end, keyword in tokens:
        if not keyword:
            continue
        if spans and (caption[spans[-1][1]:start].isspace() or spans[-1][1] == start):
            spans[-1] = (spans[-1][0], end)
        else:
            spans.append((start, end))
    return spans


def mask_keywords(caption: str, rng: random.Random, *, use_spacy: bool = True) -> str:
    """The caption with every keyword span replaced by ``$`` (whole spans only: a keyword inside
    another word is never hit, unlike the official substring replace). No keyword: one random word
    is masked; nothing left to mask: "a photo of $"."""
    spans = keyword_spans(caption, use_spacy=use_spacy)
    if not spans:
        words = [(m.start(), m.end()) for m in _WORD.finditer(caption)]
        if not words:
            return f"a photo of {MARKER}"
        spans = [rng.choice(words)]
    out, last = [], 0
    for start, end in spans:
        out += [caption[last:start], MARKER]
        last = end
    return "".join(out + [caption[last:]])
