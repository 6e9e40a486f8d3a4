"""Does the service rank as evaluation does? Every query of a split through ``POST /search``
(in-process HTTP) against an exact index, compared with ``cirlab eval``'s ranking of the same
model; optionally the same queries against a Milvus index (a milvus-lite server on loopback).

    python experiments/check_serving.py --model runs/demo/bi-text/model --root runs/demo/shapes --milvus

Prints how many top-10 lists are equal position by position, and how many differ only by
swapping images of equal score (identical scenes, float noise: the order of ties is arbitrary).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from cirlab.cli import main as cli
from cirlab.config import ServeConfig
from cirlab.data.registry import load_split
from cirlab.data.torch_data import default_text
from cirlab.composers.vectors import similarity, split_features
from cirlab.evaluation.submission import rankings_from_similarity
from cirlab.retrieval.milvus import milvus_lite_server
from cirlab.retrieval.search import Query, Searcher

TIE = 1e-5


def compare(got: list[str], want: list[str], scores: np.ndarray, column: dict[str, int]) -> str:
    """'equal', 'ties' (differs only where the two images score within TIE) or 'different'."""
    if got == want:
        return "equal"
    tied = all(a == b or abs(scores[column[a]] - scores[column[b]]) < TIE for a, b in zip(got, want))
    return "ties" if tied and len(got) == len(want) else "different"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, type=Path)
    p.add_argument("--root", required=True, type=Path)
    p.add_argument("--split", default="test")
    p.add_argument("--milvus", action="store_true")
    args = p.parse_args()
    from fastapi.testclient import TestClient

    from cirlab.serving.app import create_app

    work = Path(tempfile.mkdtemp(prefix="check-serving-"))
    build = ["index", "build", "--model", str(args.model), "--dataset", "shapes", "--root", str(args.root),
             "--split", args.split]
    assert cli(build + ["--out", str(work / "flat")]) == 0
    searcher = Searcher.open(work / "flat")
    split = load_split("shapes", args.root, args.split)
    sim = similarity(searcher.composer, split, split_features(searcher.composer, split)).numpy()
    ranked, _ = rankings_from_similarity(split, torch.from_numpy(sim))
    column = {image: j for j, image in enumerate(split.gallery)}
    counts: dict[str, dict[str, int]] = {"served": {}, "milvus": {}}
    start = time.perf_counter()
    with TestClient(create_app(searcher, ServeConfig())) as client:
        for n, q in enumerate(split.queries):
            r = client.post("/search", data={"id": q.reference, "text": default_text(q, False), "k": 10})
            verdict = compare([h["id"] for h in r.json()["results"]], ranked[q.qid][:10], sim[n], column)
            counts["served"][verdict] = counts["served"].get(verdict, 0) + 1
    served_s = time.perf_counter() - start
    if args.milvus:
        with milvus_lite_server(work / "milvus-data") as uri:
            assert cli(build + ["--out", str(work / "milvus"), "--backend", "milvus", "--uri", uri]) == 0
            milvus = Searcher.open(work / "milvus")
            queries = [Query(default_text(q, False), id=q.reference) for q in split.queries]
            for s in range(0, len(queries), 64):
                for n, hits in enumerate(milvus.search(queries[s:s + 64], k=10), start=s):
                    verdict = compare([h.id for h in hits], ranked[split.queries[n].qid][:10], sim[n], column)
                    counts["milvus"][verdict] = counts["milvus"].get(verdict, 0) + 1
    print(f"{split.name}: {len(split.queries)} queries, gallery {len(split.gallery)}, model {args.model}")
    print(f"served over HTTP (faiss Flat) vs cirlab eval top-10: {counts['served']} ({served_s:.0f} s)")
    if args.milvus:
        print(f"Milvus (milvus-lite server) vs cirlab eval top-10: {counts['milvus']}")


if __name__ == "__main__":
    main()
