"""A closed-loop load test on loopback: C clients, each sending its next query when the last is
answered, bounded in requests and in time; throughput, latency percentiles and errors; and
``cirlab serve`` started as its own process for the length of a block.

Used by ``bench_serve_load.py`` and ``bench_serve_soak.py`` (beside it: a script run from this
folder imports it as ``serve_load``) and by ``tests/test_serving.py`` (which loads it by its path)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np


@contextmanager
def served(index: Path, overrides: Sequence[str] = (), timeout: float = 120) -> Iterator[tuple[str, subprocess.Popen]]:
    """``(base url, process)`` of ``cirlab serve --index index`` on a free loopback port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [str(Path(sys.executable).with_name("cirlab")), "serve", "--index", str(index), "--port", str(port)]
    for o in overrides:
        cmd += ["--set", o]
    server = subprocess.Popen(cmd, env={**os.environ, "CIRLAB_API_KEY": ""})
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                urllib.request.urlopen(f"{base}/healthz", timeout=2)
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit("the server did not start") from None
                time.sleep(0.2)
        yield base, server
    finally:
        server.terminate()
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            server.kill()


def load_test(base: str, forms: Sequence[dict[str, Any]], *, concurrency: int, max_requests: int,
              max_seconds: float = 60.0, timeout: float = 30.0) -> dict[str, Any]:
    """POST ``forms`` (cycled) to ``base``/search from ``concurrency`` threads until ``max_requests``
    were sent or ``max_seconds`` passed. Errors: any non-200 answer or transport failure."""
    import httpx

    lock, latencies, statuses = threading.Lock(), [], {}
    sent = [0]
    stop_at = time.monotonic() + max_seconds

    def client() -> None:
        with httpx.Client(base_url=base, timeout=timeout) as http:
            while True:
                with lock:
                    if sent[0] >= max_requests or time.monotonic() > stop_at:
                        return
                    form = forms[sent[0] % len(forms)]
                    sent[0] += 1
                start = time.perf_counter()
                try:
                    status = http.post("/search", data=form).status_code
                except httpx.HTTPError as e:
                    status = type(e).__name__
                elapsed = time.perf_counter() - start
                with lock:
                    statuses[status] = statuses.get(status, 0) + 1
                    if status == 200:
                        latencies.append(elapsed)

    start = time.perf_counter()
    threads = [threading.Thread(target=client, daemon=True) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(max_seconds + timeout + 5)
    wall = time.perf_counter() - start
    ok = np.array(latencies) * 1000
    return {"concurrency": concurrency, "requests": sum(statuses.values()), "ok": len(latencies),
            "errors": sum(n for s, n in statuses.items() if s != 200), "statuses": {str(k): v for k, v in statuses.items()},
            "seconds": wall, "throughput": len(latencies) / wall if wall else 0.0,
            "p50_ms": float(np.percentile(ok, 50)) if len(ok) else float("nan"),
            "p99_ms": float(np.percentile(ok, 99)) if len(ok) else float("nan")}
