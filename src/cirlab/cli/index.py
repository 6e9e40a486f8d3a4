"""``cirlab index build|info``: encode a gallery with an exported model into a search index."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

DATASET_HELP = "a registered benchmark: shapes, cirr, fashioniq, circo, or a plugin's (CIRLAB_PLUGINS)"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("index", help="build or inspect a gallery index")
    commands = p.add_subparsers(dest="index_command", required=True, metavar="COMMAND")
    b = commands.add_parser("build", help="encode a gallery with a model into an index folder")
    b.add_argument("--model", required=True, type=Path, help="an exported model folder (<run>/model)")
    source = b.add_mutually_exclusive_group(required=True)
    source.add_argument("--images", type=Path, help="a folder of images (ids: paths relative to it, no suffix)")
    source.add_argument("--dataset", help="a benchmark split's gallery (with --root, --split): " + DATASET_HELP)
    b.add_argument("--root", type=Path, help="--dataset: the dataset root")
    b.add_argument("--split", default="test", help="--dataset: the split (default test)")
    b.add_argument("--out", required=True, type=Path, help="the index folder (written atomically)")
    b.add_argument("--add", action="store_true", help="add to the existing index in --out (same model) instead "
                   "of replacing it; ids already there get their new vector")
    b.add_argument("--backend", choices=["faiss", "milvus"], default="faiss",
                   help="where the vectors live: faiss (files in the index folder) or milvus (a Milvus server, "
                   "--uri) (default: %(default)s)")
    b.add_argument("--factory", default="Flat", help="faiss index-factory string: Flat (exact, default), HNSW32, "
                   "IVF4096,PQ32np,RFlat ... (see docs/serving.md)")
    b.add_argument("--params", default="", help="faiss search parameters, e.g. nprobe=32,k_factor_rf=4 or efSearch=128 "
                   "(default: none, faiss's own)")
    b.add_argument("--uri", help="milvus: the server, e.g. http://127.0.0.1:19530 (required with --backend milvus)")
    b.add_argument("--collection", help="milvus: the alias naming the index's collection (default "
                   "cirlab_<folder name>_<hash of its path>: one per index folder)")
    b.add_argument("--batch-size", type=int, default=64, help="images encoded per batch (default: %(default)s)")
    b.add_argument("--device", default="cpu", help="torch device of the model: cpu, cuda, cuda:1 (default: %(default)s)")
    b.set_defaults(func=build)
    i = commands.add_parser("info", help="print an index's manifest")
    i.add_argument("index", type=Path, help="the index folder")
    i.set_defaults(func=info)


def build(args: argparse.Namespace) -> int:
    from contextlib import nullcontext

    from cirlab.utils.io import exclusive

    if args.dataset and not args.root:
        raise ValueError("--dataset needs --root")
    if args.backend == "milvus" and args.factory != "Flat":
        raise ValueError("--factory is a faiss option; Milvus indexes are FLAT")
    main = int(os.environ.get("RANK", 0)) == 0  # under torchrun every rank encodes, rank 0 writes
    # one writer per index folder, from reading it (--add) to the swap: two builds never interleave
    with exclusive(args.out, "index folder") if main else nullcontext():
        return _build(args, main)


def _build(args: argparse.Namespace, main: bool) -> int:
    import cirlab
    from cirlab.retrieval.gallery import encode_split_gallery, folder_gallery, gallery_paths, model_record
    from cirlab.retrieval.index import check_model, load_index, new_index

    composer = cirlab.load(args.model, device=args.device)
    record = model_record(composer, args.model)
    index = None
    if args.add and main:
        index = load_index(args.out)
        check_model(index, record["fingerprint"], args.model)
    if args.images:
        splits = [folder_gallery(args.images)]
    else:
        from cirlab.data.registry import load_splits

        splits = load_splits(args.dataset, args.root, args.split)
    for split in splits:
        paths = gallery_paths(split)
        vectors = encode_split_gallery(composer, split, batch_size=args.batch_size)
        if not main:
            continue
        if index is None:
            index = new_index(args.backend, vectors.shape[1], model=record, factory=args.factory, params=args.params,
                              uri=args.uri, collection=args.collection, folder=args.out)
        index.add(split.gallery, vectors, [paths[i] for i in split.gallery])
        print(f"encoded {len(vectors)} images of {split.name}")
    if main:
        index.save(args.out)
        print(f"index: {args.out} ({len(index)} images, {index.backend}, dim {index.dim})")
    return 0


def info(args: argparse.Namespace) -> int:
    from cirlab.retrieval.index import read_index_manifest
    from cirlab.utils.io import dump_json

    print(dump_json(read_index_manifest(args.index), indent=1))
    return 0
