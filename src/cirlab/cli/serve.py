"""``cirlab serve``: the HTTP API and web page over an index (model and index loaded once)."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve an index over HTTP: POST /search, a web page at /")
    p.add_argument("--index", required=True, type=Path, help="an index folder (`cirlab index build`)")
    p.add_argument("--model", type=Path, help="the model folder (default: the one the index was built with)")
    p.add_argument("--config", type=Path, help="a serve config (default configs/serve/default.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a serve config field, e.g. --set max_batch=32")
    p.add_argument("--host", default="127.0.0.1", help="bind address; 0.0.0.0 listens on every network interface "
                   "(default: %(default)s, this machine only)")
    p.add_argument("--port", type=int, default=8000, help="TCP port to listen on (default: %(default)s)")
    p.add_argument("--api-key", help="enables the endpoints that change the index, for requests with this "
                   "X-API-Key (default: the environment's CIRLAB_API_KEY; none: index changes are refused)")
    p.add_argument("--device", default="cpu", help="torch device of the model: cpu, cuda, cuda:1 (default: %(default)s)")
    p.set_defaults(func=serve)


def serve(args: argparse.Namespace) -> int:
    import os

    from contextlib import nullcontext

    import uvicorn

    from cirlab.config import load_serve_config
    from cirlab.retrieval.search import Searcher
    from cirlab.serving.app import create_app
    from cirlab.utils.io import exclusive

    cfg = load_serve_config(args.config, args.overrides)
    api_key = args.api_key or os.environ.get("CIRLAB_API_KEY")
    # a server that may change the index is its one writer for its whole life: an `index build
    # --add` meanwhile is refused, instead of being overwritten by the server's next save
    with exclusive(args.index, "index folder") if api_key else nullcontext():
        # read-only memory map unless the index may change (then it must be in memory to be written)
        searcher = Searcher.open(args.index, args.model, device=args.device, mmap=api_key is None)
        app = create_app(searcher, cfg, api_key=api_key)
        print(f"serving {args.index} ({len(searcher.index)} images, model {searcher.composer.name}) "
              f"on http://{args.host}:{args.port}/")
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0
