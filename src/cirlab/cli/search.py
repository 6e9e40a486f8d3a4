"""``cirlab search``: one composed query against an index; ranked ids and scores, optionally a picture."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("search", help="search an index with a reference image (or gallery id) and a text")
    p.add_argument("--index", required=True, type=Path, help="an index folder (`cirlab index build`)")
    ref = p.add_mutually_exclusive_group(required=True)
    ref.add_argument("--image", type=Path, help="the reference image file")
    ref.add_argument("--id", help="the reference as a gallery id (left out of the results)")
    p.add_argument("--text", required=True, help='the modification, e.g. "make it blue"')
    p.add_argument("-k", type=int, default=10, help="how many results (default: %(default)s)")
    p.add_argument("--rerank", type=int, metavar="K", help="re-ranking models: re-rank the index's top K")
    p.add_argument("--model", type=Path, help="the model folder (default: the one the index was built with)")
    p.add_argument("--grid", type=Path, help="also draw the reference, the text and the results into this PNG")
    p.add_argument("--json", action="store_true", help="print one JSON list of {id, score}")
    p.add_argument("--device", default="cpu", help="torch device of the model: cpu, cuda, cuda:1 (default: %(default)s)")
    p.set_defaults(func=search)


def search(args: argparse.Namespace) -> int:
    from cirlab.data.images import load_as_shown
    from cirlab.data.show import draw_results
    from cirlab.retrieval.search import Query, Searcher
    from cirlab.utils.io import dump_json

    # checked here: the index asks for max(k, rerank) results and would report that number instead
    for name, value in (("-k", args.k), ("--rerank", args.rerank)):
        if value is not None and value < 1:
            raise ValueError(f"{name} must be at least 1, got {value}")
    searcher = Searcher.open(args.index, args.model, device=args.device)
    # the photo as a viewer shows it: upright by its EXIF orientation, 8-bit, transparency on white
    query = Query(args.text, image=load_as_shown(args.image)) if args.image else Query(args.text, id=args.id)
    if query.id is not None and query.id not in searcher.index:
        raise ValueError(f"{args.index}: no gallery image {query.id!r}")
    hits, = searcher.search([query], k=args.k, rerank=args.rerank)
    if args.json:
        print(dump_json([{"id": h.id, "score": h.score} for h in hits]))
    else:
        for rank, h in enumerate(hits, 1):
            print(f"{rank:>3}  {h.score:+.4f}  {h.id}")
    if args.grid:
        reference = args.image or searcher.image_path(args.id)
        draw_results(reference, args.text, [(searcher.image_path(h.id), f"{h.id} {h.score:.3f}") for h in hits],
                     args.grid)
        print(f"grid: {args.grid}")
    return 0
