"""A composer over a whole benchmark split: its cached image features, the queries' texts, gallery
and query vectors in batches, the (Q, N) similarity.

Evaluation, the index builder (:mod:`cirlab.retrieval.gallery`) and training stages compute vectors
here, so an exact index ranks as ``cirlab eval`` does.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from cirlab.composers.base import Composer, Field
from cirlab.data.base import CIRSplit, Query
from cirlab.features.cache import FeatureSet
from cirlab.features.encode import TokenDtype
from cirlab.features.similarity import dot_similarity
from cirlab.utils.progress import progress


def query_texts(composer: Composer, queries: Sequence[Query], forward: bool) -> tuple[list[tuple[str, ...]], bool]:
    """Raw texts of the queries (one or more per query, see :meth:`QueryRecipe.query_texts`) and
    the direction they are composed in. A backward query on the generator's exact reversed text
    is a forward instruction from target to reference."""
    if not forward and composer.recipe.backward_text == "reversed":
        missing = [q.qid for q in queries if "caption_reversed" not in q.extra]
        if missing:
            raise ValueError(f"backward_text 'reversed' needs the shapes generator's reversed captions; "
                             f"query {missing[0]} has none")
        return [(q.extra["caption_reversed"],) for q in queries], True
    return [composer.recipe.query_texts(q.captions) for q in queries], forward


def split_features(composer: Composer, split: CIRSplit, *, batch_size: int = 64,
                   extra_fields: Sequence[Field] = (), token_dtype: TokenDtype = "float16") -> FeatureSet:
    """The cached image fields the composer reads for the split's gallery and references."""
    fields = [composer.gallery_field, composer.reference_field, *extra_fields]
    return composer.features(split, fields=fields, batch_size=batch_size, token_dtype=token_dtype)


def feature_rows(feats: FeatureSet, name: str, ids: Sequence[str], leading: int | None = None) -> torch.Tensor:
    """Rows of the cached field ``name`` for ``ids`` (``leading``: only the first tokens), float32."""
    table = feats[name] if leading is None else feats[name][:, :leading]
    return table.index_select(0, torch.tensor([feats.index_of(i) for i in ids], dtype=torch.long)).float()


@torch.no_grad()
def gallery_vectors(composer: Composer, split: CIRSplit, feats: FeatureSet, batch_size: int = 256) -> torch.Tensor:
    """(N, d) normalised gallery vectors of the split's gallery, in gallery order."""
    out = []
    for s in range(0, len(split.gallery), batch_size):
        rows = feature_rows(feats, composer.gallery_field, split.gallery[s:s + batch_size], composer.gallery_tokens)
        out.append(composer.gallery_vectors(rows))
    return torch.cat(out)


@torch.no_grad()
def query_vectors(composer: Composer, split: CIRSplit, feats: FeatureSet, *, forward: bool = True,
                  batch_size: int = 64) -> torch.Tensor:
    """(Q, d) normalised query vectors of the split's queries."""
    out = []
    for s in progress(range(0, len(split.queries), batch_size), desc=f"queries {split.name}"):
        chunk = split.queries[s:s + batch_size]
        texts, direction = query_texts(composer, chunk, forward)
        refs = feature_rows(feats, composer.reference_field, [q.reference for q in chunk])
        n = {len(t) for t in texts}
        if len(n) != 1:
            raise ValueError(f"{split.name}: queries {chunk[0].qid}..{chunk[-1].qid} mix {sorted(n)} texts per query")
        vectors = [composer.encode_queries(refs, [t[i] for t in texts], forward=direction) for i in range(n.pop())]
        # several texts (FashionIQ's two orders): normalize((f1 + f2) / 2) of the normalised f1, f2
        out.append(vectors[0] if len(vectors) == 1 else F.normalize(sum(vectors), dim=-1))
    return torch.cat(out)


def similarity(composer: Composer, split: CIRSplit, feats: FeatureSet, *, forward: bool = True,
               batch_size: int = 64) -> torch.Tensor:
    """(Q, N) query x gallery cosine similarities (fp32, on the CPU like the split's index tensors)."""
    return dot_similarity(query_vectors(composer, split, feats, forward=forward, batch_size=batch_size),
                          gallery_vectors(composer, split, feats)).cpu()
