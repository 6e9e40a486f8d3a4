"""FashionIQ: loader and the caption conventions of the official repositories.

Layout (``root`` = ``fashionIQ_dataset/``)::

    captions/cap.<category>.<split>.json       [{"candidate", "target", "captions": [c1, c2]}]
    image_splits/split.<category>.<split>.json [asin, ...]  (the category's gallery)
    images/<asin>.png | <asin>.jpg             both circulate (SPN4CIR converted to .png)

Each category is its own split and is evaluated separately; the reference is *not* removed
from the ranking (as in the validation code of CLIP4Cir, ABaldrati/CLIP4Cir, and of the repos
built on it). Many images are missing from every public mirror, which the query/gallery
datasets tolerate (``images.MissingImages``).
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Callable, Sequence

from cirlab.data.base import (Benchmark, CIRSplit, Protocol, Query, check_gallery, check_split_name, field, read_records,
                              register_benchmark)
from cirlab.utils.io import read_json

CATEGORIES = ("dress", "shirt", "toptee")
SPLITS = ("train", "val", "test")
_STRIP = ".?, "  # the characters the official code strips from both ends of each caption


class _ImageFiles:
    """``asin -> [images/<asin>.png, images/<asin>.jpg]``: .png first, as SPN4CIR's copy."""

    def __init__(self, images_dir: Path) -> None:
        self.images_dir = images_dir

    def __call__(self, image_id: str) -> list[Path]:
        return [self.images_dir / f"{image_id}.png", self.images_dir / f"{image_id}.jpg"]


def load_fashioniq(root: str | Path, split: str, category: str) -> CIRSplit:
    """One category of one split. ``qid`` is ``<category>-<index in the caption file>``."""
    root = Path(root)
    check_split_name(split, SPLITS, "FashionIQ")
    if category not in CATEGORIES:
        raise ValueError(f"unknown FashionIQ category {category!r}; expected one of {list(CATEGORIES)}")
    cap_path = root / "captions" / f"cap.{category}.{split}.json"
    queries = _read_queries(cap_path, category, split)
    split_path = root / "image_splits" / f"split.{category}.{split}.json"
    gallery = _read_id_list(split_path)
    check_gallery(gallery, split_path)
    return CIRSplit(
        dataset="fashioniq",
        split=split,
        queries=queries,
        gallery=gallery,
        image_paths=_ImageFiles(root / "images"),
        exclude_reference=False,
        name=f"fashioniq/{category}/{split}",
    )


def read_extension(path: str | Path, category: str) -> list[Query]:
    """Training triplets added to one category (SPN's generated positives), in the caption
    file's format; a record with ``"generated": true`` may hold any number of captions (its
    templates' texts, one drawn per training sample). Their qids are ``<category>-x<index>``."""
    return _read_queries(Path(path), category, "train", qid_prefix="x")


def _read_queries(cap_path: Path, category: str, split: str, qid_prefix: str = "") -> list[Query]:
    queries = []
    for i, r in enumerate(read_records(cap_path, "FashionIQ caption file")):
        captions = field(r, "captions", cap_path, i, list)
        generated = bool(r.get("generated"))
        if not all(isinstance(c, str) for c in captions) or (len(captions) < 1 if generated else len(captions) != 2):
            raise ValueError(f"{cap_path}: record {i} has captions={captions!r:.80}, expected a list of 2 strings "
                             "(every FashionIQ query has two relative captions; generated ones one or more)")
        # Test captions may come without targets; everywhere else a target is required.
        target = r.get("target") if split == "test" else field(r, "target", cap_path, i, str)
        queries.append(
            Query(
                qid=f"{category}-{qid_prefix}{i}",
                reference=field(r, "candidate", cap_path, i, str),
                captions=tuple(captions),
                target=target,
                positives=(target,) if target is not None else (),
                extra={"category": category, **({"generated": True} if generated else {})},
            )
        )
    return queries


def _read_id_list(path: Path) -> list[str]:
    ids = read_json(path, "FashionIQ image split file")
    if not isinstance(ids, list) or not all(isinstance(x, str) for x in ids):
        raise ValueError(f"{path}: expected a JSON list of image ids (strings)")
    return ids


# --- captions ---------------------------------------------------------------------------------


def _two(captions: Sequence[str]) -> tuple[str, str]:
    if len(captions) != 2:
        raise ValueError(f"FashionIQ queries have two captions, got {len(captions)}: {list(captions)!r:.120}")
    return captions[0].strip(_STRIP), captions[1].strip(_STRIP)


def fiq_train_forms(captions: Sequence[str], capitalize: bool = True) -> tuple[str, str, str, str]:
    """The four training texts of a FashionIQ pair: (a) "C1 and c2", (b) "C2 and c1", (c) "C1",
    (d) "C2" (first letter capitalised as the official code does; ``capitalize=False`` is
    SPN4CIR's variant). Methods that pre-encode every possible text enumerate these."""
    c1, c2 = _two(captions)
    cap1, cap2 = (c1.capitalize(), c2.capitalize()) if capitalize else (c1, c2)
    return f"{cap1} and {c2}", f"{cap2} and {c1}", cap1, cap2


def fiq_train_caption(captions: Sequence[str], rng: random.Random | None = None, capitalize: bool = True) -> str:
    """The training text of CLIP4Cir's ``generate_randomized_fiq_caption`` (ABaldrati/CLIP4Cir): one of
    :func:`fiq_train_forms`, 0.25 each. The official tests are ``r < .25``, ``.25 < r < .5``,
    ``.5 < r < .75``, else (d), so r == 0.25 or 0.5 falls through to (d); reproduced on purpose.
    ``rng`` defaults to Python's global ``random``, which DataLoader workers seed per worker.
    """
    a, b, c, d = fiq_train_forms(captions, capitalize)
    r = (rng or random).random()
    if r < 0.25:
        return a
    if 0.25 < r < 0.5:
        return b
    if 0.5 < r < 0.75:
        return c
    return d


def fiq_both_orders(captions: Sequence[str]) -> tuple[str, str]:
    """The zero-shot repos' two validation texts, "c1 and c2" and "c2 and c1", each caption
    stripped of '.?, ' (miccunifi/SEARLE, navervision/lincir, jaeseokbyun/RTD ``validate.py``);
    the query is the mean of their normalised features. Wrapping in a prompt such as
    "a photo of $ that ..." belongs to the method."""
    c1, c2 = _two(captions)
    return f"{c1} and {c2}", f"{c2} and {c1}"


def fiq_val_caption(captions: Sequence[str], capitalize: bool = True) -> str:
    """The supervised repos' one deterministic validation text, "C1 and c2", each caption
    stripped of '.?, ' at both ends (Python's ``str.strip('.?, ')``), the first capitalised
    (ABaldrati/CLIP4Cir, Cuberick-Orion/Bi-Blip4CIR, Cuberick-Orion/Candidate-Reranking-CIR,
    BUAADreamer/SPN4CIR ``blip4cir``: ``validate.py``). ``capitalize=False`` is SPN4CIR's
    ``clip4cir`` and ``zscir`` validation. ``capitalize`` is Python's: the first character
    upper-cased, every other one lower-cased."""
    c1, c2 = _two(captions)
    return f"{c1.capitalize() if capitalize else c1} and {c2}"


def fiq_pic2word_caption(captions: Sequence[str]) -> str:
    """Pic2Word's one validation text, "c2 and c1": the second caption first, nothing stripped
    (google-research/composed_image_retrieval ``src/data.py``, "a photo of * , {cap2} and {cap1}")."""
    if len(captions) != 2:
        raise ValueError(f"FashionIQ queries have two captions, got {len(captions)}: {list(captions)!r:.120}")
    return f"{captions[1]} and {captions[0]}"


# How each official evaluation turns a query's two captions into the text(s) it encodes; the
# recipe of a model names its rule (``QueryRecipe.caption_orders``). Two texts: the query is
# the normalised mean of their normalised features.
VAL_RULES: dict[str, Callable[[Sequence[str]], tuple[str, ...]]] = {
    "one": lambda c: (fiq_val_caption(c),),  # supervised (CLIP4Cir lineage)
    "one-uncapitalized": lambda c: (fiq_val_caption(c, capitalize=False),),  # SPN4CIR's CLIP-based
    "both": fiq_both_orders,  # SEARLE, LinCIR, RTD
    "pic2word": lambda c: (fiq_pic2word_caption(c),),
}


def fiq_val_texts(captions: Sequence[str], rule: str = "one") -> tuple[str, ...]:
    """The validation text(s) of a FashionIQ query under ``rule`` (a key of :data:`VAL_RULES`)."""
    try:
        return VAL_RULES[rule](captions)
    except KeyError:
        raise ValueError(f"unknown FashionIQ caption rule {rule!r}; known: {', '.join(VAL_RULES)}") from None


def _load(root: Path, split: str, category: str | None) -> CIRSplit:
    if category is None:
        raise ValueError(f"FashionIQ needs a category, one of {list(CATEGORIES)}")
    return load_fashioniq(root, split, category)


def _extension(path: Path, split: CIRSplit) -> tuple[Path, list[Query]]:
    """``{category}`` in ``path`` is replaced by the split's category."""
    category = split.name.split("/")[1]  # fashioniq/<category>/<split>...
    path = Path(str(path).replace("{category}", category))
    return path, read_extension(path, category)


def _generated_record(*, reference: str, target: str, texts: list[str], captioned: dict, **_: object) -> dict:
    """A generated triplet in the caption file's format (``generated``: any number of captions)."""
    return {"candidate": reference, "target": target, "captions": texts, "generated": True, "captioned": captioned}


register_benchmark(Benchmark(
    "fashioniq", _load, Protocol(recall_ks=(10, 50), per_category=True), submission="fashioniq",
    categories=CATEGORIES, read_extension=_extension, generated_record=_generated_record))
