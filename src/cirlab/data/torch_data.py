"""PyTorch datasets over a :class:`CIRSplit`: queries ("relative" mode) and gallery ("classic" mode).

Decoding and preprocessing run in DataLoader workers. An item whose image is absent or
unreadable comes back as None and its id goes to a :class:`MissingImages` tracker; the
loader from :func:`make_loader` drops those items, carries the ids that workers found
back to the main process, and warns once at the end of the epoch.
"""

from __future__ import annotations

import random
from typing import Any, Callable, Hashable, Mapping

import torch
from torch.utils.data import ConcatDataset, DataLoader, Dataset, get_worker_info

from cirlab.data.base import CIRSplit, Query
from cirlab.data.fashioniq import fiq_train_caption, fiq_train_forms, fiq_val_caption
from cirlab.data.images import MissingImages, collate_skip_none, decode_image

TextFn = Callable[[Query, bool], str]
Transform = Callable[[Any], torch.Tensor]


def default_text(query: Query, train: bool) -> str:
    """The single caption; for FashionIQ's two, the supervised repos' training draw or
    validation order (ABaldrati/CLIP4Cir's ``generate_randomized_fiq_caption`` and validation
    caption). Zero-shot evaluation uses the validation order too. A generated triplet (SPN)
    draws one of its template texts, as the official trainer's ``random.choice``."""
    if query.extra.get("generated"):
        return random.choice(query.captions) if train else query.captions[0]
    if len(query.captions) == 1:
        return query.captions[0]
    return fiq_train_caption(query.captions) if train else fiq_val_caption(query.captions)


def training_forms(query: Query) -> tuple[str, ...]:
    """Every text a training draw of :func:`default_text` can give for ``query``."""
    if len(query.captions) > 1 and not query.extra.get("generated"):
        return fiq_train_forms(query.captions)
    return query.captions


class _ImageDataset(Dataset):
    def __init__(self, split: CIRSplit, transform: Transform, missing: MissingImages | None) -> None:
        self.split = split
        self.transform = transform
        self.missing = missing if missing is not None else MissingImages()

    def read_image(self, image_id: str) -> torch.Tensor | None:
        """The preprocessed image, or None (recorded as missing) when it cannot be read."""
        path = self.split.find_image(image_id)
        if path is not None:
            try:
                return self.transform(decode_image(path))
            except OSError:  # truncated or not an image: PIL raises OSError subclasses
                pass
        self.missing.add(image_id)
        return None


class QueryDataset(_ImageDataset):
    """Items ``{qid, index, text, reference, target}``; ``reference`` only with ``load_reference``
    (methods that cache reference features skip it), ``target`` only with ``load_target``.

    ``text_fn(query, train)`` builds the text; None uses :func:`default_text`. Training draws
    come from Python's ``random``, which DataLoader workers seed from the loader's generator.
    """

    def __init__(
        self,
        split: CIRSplit,
        transform: Transform,
        text_fn: TextFn | None = None,
        *,
        train: bool,
        load_reference: bool = True,
        load_target: bool = False,
        missing: MissingImages | None = None,
    ) -> None:
        super().__init__(split, transform, missing)
        if load_target and not split.has_targets:
            raise ValueError(f"{split.name} has no targets to load (a test split?)")
        self.text_fn = text_fn or default_text
        self.train = train
        self.load_reference = load_reference
        self.load_target = load_target

    def __len__(self) -> int:
        return len(self.split.queries)

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        query = self.split.queries[index]
        item: dict[str, Any] = {"qid": query.qid, "index": index}
        if self.load_reference:
            item["reference"] = self.read_image(query.reference)
        if self.load_target:
            item["target"] = self.read_image(query.target) if query.target is not None else None
        if any(v is None for v in item.values()):
            return None
        item["text"] = self.text_fn(query, self.train)
        return item


class GalleryDataset(_ImageDataset):
    """Items ``{id, index, image}`` over ``ids`` (the split's gallery by default)."""

    def __init__(
        self,
        split: CIRSplit,
        transform: Transform,
        ids: list[str] | None = None,
        *,
        missing: MissingImages | None = None,
    ) -> None:
        super().__init__(split, transform, missing)
        self.ids = list(split.gallery if ids is None else ids)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        image = self.read_image(self.ids[index])
        return None if image is None else {"id": self.ids[index], "index": index, "image": image}


class FeatureTriplets(Dataset):
    """Training triplets for methods on cached image features: items ``{index, reference,
    target, text}`` (plus ``back_text`` with ``back_text_fn``), where ``reference`` and ``target``
    are rows of a feature table (``rows``: image id -> row). No image is read, so a step costs
    only the trainable part. Texts are drawn per item (FashionIQ's random caption forms)."""

    def __init__(self, split: CIRSplit, rows: Mapping[str, int], text_fn: Callable[[Query], str],
                 back_text_fn: Callable[[Query], str] | None = None) -> None:
        if not split.has_targets:
            raise ValueError(f"{split.name} has no targets to train on")
        self.queries = [q for q in split.queries if q.target is not None]
        unknown = [i for q in self.queries for i in (q.reference, q.target) if i not in rows]
        if unknown:
            raise ValueError(f"{split.name}: {len(unknown)} reference/target images have no features, e.g. {unknown[:3]}")
        self.rows, self.text_fn, self.back_text_fn = rows, text_fn, back_text_fn

    def __len__(self) -> int:
        return len(self.queries)

    def groups(self) -> list[str]:
        """Each sample's reference image (``trainer.sampler: paired_reference``)."""
        return [q.reference for q in self.queries]

    def __getitem__(self, index: int) -> dict[str, Any]:
        q = self.queries[index]
        item = {"index": index, "reference": self.rows[q.reference], "target": self.rows[q.target],
                "text": self.text_fn(q)}
        if self.back_text_fn is not None:
            item["back_text"] = self.back_text_fn(q)
        return item


def sample_groups(dataset: Dataset) -> list[Hashable]:
    """The group key of every sample of ``dataset`` (a ``ConcatDataset`` of parts with ``groups()``,
    or a wrapper whose ``base`` has them), for the paired-reference sampler."""
    if isinstance(dataset, ConcatDataset):
        return [key for part in dataset.datasets for key in sample_groups(part)]
    for d in (dataset, getattr(dataset, "base", None)):
        if hasattr(d, "groups"):
            return list(d.groups())
    raise ValueError(f"trainer.sampler paired_reference: {type(dataset).__name__} has no reference images to pair "
                     "(only the methods that train on triplets have them)")


def _collate(batch: list[Any]) -> tuple[Any, list[str]]:
    """Collate the present items; in a worker, also hand over the ids it found missing."""
    info = get_worker_info()
    tracker = getattr(info.dataset, "missing", None) if info is not None else None
    return collate_skip_none(batch), (tracker.drain() if tracker is not None else [])


class SkipMissingLoader(DataLoader):
    """A DataLoader that skips missing items, collects their ids in ``missing``, and
    reports them once when an epoch ends (or is cut short)."""

    def __init__(self, dataset: Dataset, missing: MissingImages, **kwargs: Any) -> None:
        super().__init__(dataset, collate_fn=_collate, **kwargs)
        self.missing = missing

    def __iter__(self):
        try:
            for batch, missing_ids in super().__iter__():
                self.missing.update(missing_ids)
                if batch is not None:
                    yield batch
        finally:
            self.missing.report()


def make_loader(
    dataset: Dataset,
    batch_size: int,
    shuffle: bool = False,
    num_workers: int = 0,
    seed: int = 0,
    *,
    drop_last: bool = False,
    pin_memory: bool = False,
) -> SkipMissingLoader:
    """A loader whose order and worker seeds follow ``seed``.

    The generator fixes the shuffle order and, through DataLoader's base seed, the seeds of
    ``random``/``torch``/``numpy`` in each worker, so the training-text draws repeat run to
    run. With ``num_workers=0`` the draws use the main process's ``random`` (seed it).
    """
    missing = getattr(dataset, "missing", None)
    return SkipMissingLoader(
        dataset,
        missing if missing is not None else MissingImages(),
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=num_workers,
        generator=torch.Generator().manual_seed(seed),
        drop_last=drop_last,
        pin_memory=pin_memory,
    )
