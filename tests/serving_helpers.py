"""Test helpers for the service: the app served by uvicorn in a background thread on loopback
(``tests/test_serving.py``, ``tests/test_browser.py``), and ``benchmarks/serve_load.py``'s load test."""

from __future__ import annotations

import importlib.util
import socket
import threading
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


@contextmanager
def serve_in_thread(app, host: str = "127.0.0.1", port: int = 0, timeout: float = 30.0) -> Iterator[str]:
    """The base URL of ``app`` served by uvicorn on ``host`` (a free port by default) until the
    block ends; fails if ``/healthz`` does not answer within ``timeout`` seconds."""
    import uvicorn

    sock = socket.socket()
    sock.bind((host, port))  # the port stays ours: uvicorn serves on this very socket
    base = f"http://{host}:{sock.getsockname()[1]}"
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(f"{base}/healthz", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline or not thread.is_alive():
                raise RuntimeError(f"the server at {base} did not answer /healthz within {timeout} s")
            time.sleep(0.1)
        yield base
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


def _serve_load():
    """``benchmarks/serve_load.py`` (the benchmarks folder is not a package: loaded by its path)."""
    spec = importlib.util.spec_from_file_location("serve_load", SERVE_LOAD)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SERVE_LOAD = Path(__file__).resolve().parents[1] / "benchmarks" / "serve_load.py"
load_test = _serve_load().load_test
