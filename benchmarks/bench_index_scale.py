"""Gallery indexes at scale: build time, memory, search QPS and recall@10 of faiss Flat, HNSW, IVF-PQ, Milvus.

Why: ``cirlab index build`` offers exact ``Flat`` (the default, what ``cirlab eval`` ranks by),
approximate faiss indexes and a Milvus server; this says what each costs at a million images,
how much of the exact top 10 the approximate ones keep, and how close the exact scan comes to
its floor, the machine's memory bandwidth.

Data: N gallery and Q query vectors of dim D, float32, "random but clustered": 1000 Gaussian
centres plus Gaussian noise (``--noise``: noise norm / centre norm), L2-normalised, seeded.
Inside a cluster the points are isotropic in all D dimensions, which is harder for approximate
search than real embeddings (they lie near a low-dimensional surface): read the recall of HNSW
and IVF-PQ as a pessimistic figure.

Every index goes through cirlab's own classes (``FaissIndex``, ``MilvusIndex``). Build = all the
``add`` calls: the first gets ``--train-n`` rows (IVF-PQ trains on them), the rest follow in
``--add-chunk`` rows. Search = ``index.search`` in batches of ``--search-batch`` queries, after a
warm-up call. IVF-PQ is ``IVF<nlist>,PQ32np,RFlat``, nlist a power of two near 4 sqrt(N), searched
with ``nprobe=32,k_factor_rf=4`` (the exact refine re-scores 4 x 10 PQ candidates; faiss's
default k_factor 1 re-scores only the 10 it returns, so the refine would buy nothing). ``np``:
plain ``PQ32`` under IVF also trains polysemous codes, minutes of annealing for codes that only
polysemous search uses (``--ivf IVF4096,PQ32,RFlat`` shows it). Memory: for faiss the growth of
this process's resident set (``VmRSS``) over the build, cirlab's id maps included, and the peak
during the build (``VmHWM``, reset first); for Milvus the same of the server process. Recall@10:
the fraction of the exact top-10 ids (faiss ``Flat`` on the same vectors) found in the top 10.
milvus-lite (``milvus-lite server`` on loopback, started here and killed in a ``finally``) is a
pure-Python engine, slow and memory-hungry, so it gets a smaller gallery (``--milvus-n``, the
first rows) and query set (``--milvus-queries``); a faiss ``Flat`` row on that subset sits beside it.

Bandwidth floor: the exact scan reads all N*D*4 bytes at least once per call. With one query
(nq=1) that is ~2 flops per 4 bytes, so it is bound by memory bandwidth and cannot beat
bytes / read bandwidth; the table gives measured / floor, for the one-thread read bandwidth
and (with --threads > 1) the all-thread one, and CPU s / wall s: how many cores a call kept
busy (OpenMP threads spinning at a barrier count too). Batched
flat search (nq >= 20 in faiss) is a matrix product (GEMM): each block of data is reused by
every query of the batch, so it is compute-bound; its time per query, amortised over the batch,
falls far below the nq=1 floor, and the table gives its GFLOP/s. (For 1 < nq < 20 faiss scans
query by query, one thread each, reading the data once per query.) Bandwidth: a numpy copy of
a ``--bw-gb`` array (read + written bytes / time) and read-only passes (``arr.sum()``,
``arr.max()``, ``arr @ v`` with BLAS on 1 and on all threads), best of ``--bw-reps``. The floor
means something only when N*D*4 is well above the last-level cache (a note says when not).
On a machine busy with other work, use ``--threads 1``: faiss's OpenMP with more threads than
free cores is many times slower (a warning says when the load average is up).

    python benchmarks/bench_index_scale.py --quick                 # 20k vectors, under a minute
    python benchmarks/bench_index_scale.py [--n 1000000] [--dim 256] [--queries 10000] [--threads 2] \\
        [--milvus-n 100000] [--milvus-queries 1000] [--json results.json]
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import math
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from cirlab.retrieval.index import FaissIndex, VectorIndex

K = 10
MB = 2**20


# -- process memory ---------------------------------------------------------------------------------
def proc_status(pid: int | str = "self") -> dict[str, int]:
    """VmRSS / VmHWM of a process in bytes (empty where /proc does not say)."""
    out = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0]) * 1024
    except OSError:
        pass
    return out


PEAK = {"bytes": 0}  # this process's peak RSS over the whole run (VmHWM is reset per build)


def note_peak() -> int:
    PEAK["bytes"] = max(PEAK["bytes"], proc_status().get("VmHWM", 0))
    return PEAK["bytes"]


def reset_peak() -> bool:
    """Reset this process's VmHWM to its current RSS (Linux >= 4.0), noting the old peak first."""
    note_peak()
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


_libc = None


def trim() -> None:
    """Collect garbage and hand freed heap back to the OS, so the next RSS baseline is honest."""
    global _libc
    gc.collect()
    try:
        _libc = _libc or ctypes.CDLL("libc.so.6")
        _libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass


def llc_bytes() -> int | None:
    caches = sorted(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"))
    sizes = []
    for c in caches:
        try:
            s = (c / "size").read_text().strip()
            sizes.append(int(s[:-1]) * {"K": 2**10, "M": 2**20}.get(s[-1], 1) if s[-1] in "KM" else int(s))
        except (OSError, ValueError):
            pass
    return max(sizes) if sizes else None


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


# -- data ---------------------------------------------------------------------------------------------
def clustered(n: int, centres: np.ndarray, noise: float, rng: np.random.Generator, chunk: int = 65536) -> np.ndarray:
    """n rows: a random centre (unit norm) + isotropic noise of norm ~``noise``, L2-normalised."""
    dim = centres.shape[1]
    out = np.empty((n, dim), dtype=np.float32)
    sigma = np.float32(noise / math.sqrt(dim))
    for s in range(0, n, chunk):
        e = min(n, s + chunk)
        block = rng.standard_normal((e - s, dim), dtype=np.float32)
        block *= sigma
        block += centres[rng.integers(len(centres), size=e - s)]
        block /= np.linalg.norm(block, axis=1, keepdims=True)
        out[s:e] = block
    return out


# -- faiss / index helpers ------------------------------------------------------------------------------
def default_nlist(n: int) -> int:
    """A power of two near 4 * sqrt(n) (faiss's rule of thumb), with >= 39 training points per list."""
    nlist = 2 ** round(math.log2(4 * math.sqrt(n)))
    while nlist > 16 and 39 * nlist > n:
        nlist //= 2
    return max(nlist, 1)


def build(index: VectorIndex, ids: list[str], x: np.ndarray, first: int, chunk: int,
          process: int | None = None) -> dict[str, Any]:
    """Add ``x`` to ``index`` (``first`` rows in the first call, which trains, then ``chunk`` rows a
    call); time it and measure the RSS growth of ``process`` (default: this one)."""
    trim()
    pid = process or "self"
    peak_ok = process is None and reset_peak()
    before = proc_status(pid).get("VmRSS", 0)
    t0 = time.perf_counter()
    index.add(ids[:first], x[:first])
    first_s = time.perf_counter() - t0
    for s in range(first, len(ids), chunk):
        index.add(ids[s:s + chunk], x[s:s + chunk])
    build_s = time.perf_counter() - t0
    after = proc_status(pid)
    return {"build_s": build_s, "first_add_s": first_s, "rss_before_mb": before / MB,
            "rss_growth_mb": (after.get("VmRSS", 0) - before) / MB,
            "peak_growth_mb": (after["VmHWM"] - before) / MB if peak_ok and "VmHWM" in after else None}


def timed_search(index: VectorIndex, q: np.ndarray, batch: int) -> tuple[list[list[str]], float]:
    index.search(q[:min(8, len(q))], K)  # warm-up
    t0 = time.perf_counter()
    ids: list[list[str]] = []
    for s in range(0, len(q), batch):
        ids.extend([h.id for h in hits] for hits in index.search(q[s:s + batch], K))
    return ids, time.perf_counter() - t0


def recall(found: list[list[str]], exact: list[list[str]]) -> float:
    return float(np.mean([len(set(f) & set(e)) / len(e) for f, e in zip(found, exact)]))


# -- bandwidth ------------------------------------------------------------------------------------------
def best_time(fn, reps: int) -> float:
    best = math.inf
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def bandwidth(gb: float, dim: int, reps: int, threads: int) -> dict[str, float]:
    """GB/s (1e9 bytes) of a copy (read + write) and of read-only passes over a ``gb`` array."""
    rows = max(1, int(gb * 1e9) // (4 * dim))
    src = np.ones((rows, dim), dtype=np.float32)
    dst = np.zeros_like(src)  # touched (zeroed pages are mapped lazily: np.zeros alone would not be)
    dst[:] = 0.5
    v = np.ones(dim, dtype=np.float32)
    nbytes = src.nbytes
    out = {"array_gb": nbytes / 1e9,
           "copy": 2 * nbytes / best_time(lambda: np.copyto(dst, src), reps) / 1e9,
           "read_sum_1t": nbytes / best_time(lambda: src.sum(), reps) / 1e9,
           "read_max_1t": nbytes / best_time(lambda: src.max(), reps) / 1e9}
    del dst
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        threadpool_limits = None
    if threadpool_limits is not None:
        with threadpool_limits(1):
            out["read_gemv_1t"] = nbytes / best_time(lambda: src @ v, reps) / 1e9
        if threads > 1:
            with threadpool_limits(threads):
                out["read_gemv_all"] = nbytes / best_time(lambda: src @ v, reps) / 1e9
    else:
        out["read_gemv_all"] = nbytes / best_time(lambda: src @ v, reps) / 1e9
    del src
    trim()
    return out


def flat_scans(index: FaissIndex, q: np.ndarray, nqs: list[int], reps: int, bw_1t: float, bw_all: float,
               n: int, dim: int) -> list[dict[str, Any]]:
    """Median time of flat searches of nq queries, against the bandwidth floor of one pass over the data."""
    scan_bytes = n * dim * 4
    rows = []
    for nq in nqs:
        nq = min(nq, len(q))
        calls = max(1, min(reps, len(q) // nq))  # distinct queries each call
        index.search(q[:nq], K)  # warm-up
        times = []
        cpu0, wall0 = time.process_time(), time.perf_counter()
        for c in range(calls):
            batch = q[c * nq:(c + 1) * nq]
            t0 = time.perf_counter()
            index.search(batch, K)
            times.append(time.perf_counter() - t0)
        cpu_per_wall = (time.process_time() - cpu0) / (time.perf_counter() - wall0)
        t = float(np.median(times))
        floor_1t, floor_all = scan_bytes / (bw_1t * 1e9), scan_bytes / (bw_all * 1e9)
        rows.append({"nq": nq, "calls": calls, "ms_per_call": t * 1e3, "ms_per_query": t * 1e3 / nq,
                     "floor_ms_1t": floor_1t * 1e3, "ratio_1t": t / floor_1t,
                     "floor_ms_all": floor_all * 1e3, "ratio_all": t / floor_all,
                     "gb_per_s": scan_bytes / t / 1e9, "gflops": 2 * n * dim * nq / t / 1e9,
                     "cpu_per_wall": cpu_per_wall})
    return rows


# -- milvus-lite ----------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MilvusLiteServer:
    """``milvus-lite server`` on loopback in a temporary data dir; ``stop`` kills it (always call it)."""

    def __init__(self, exe: str, port: int, ready_timeout: float):
        self.tmp = Path(tempfile.mkdtemp(prefix="bench-milvus-"))
        self.log = self.tmp / "server.log"
        self.port, self.uri = port, f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen | None = None
        try:
            with open(self.log, "wb") as log:  # a file, not a pipe: a full pipe would block the server
                self.proc = subprocess.Popen([exe, "server", "--data-dir", str(self.tmp / "data"), "--host",
                                              "127.0.0.1", "--port", str(port)], stdout=log, stderr=subprocess.STDOUT,
                                             stdin=subprocess.DEVNULL)
            self._wait_ready(ready_timeout)
        except BaseException:  # the caller never gets the object, so kill the server (and its dir) here
            self.stop()
            raise

    def _wait_ready(self, ready_timeout: float) -> None:
        deadline = time.monotonic() + ready_timeout
        while True:  # bounded: until the port answers, the process dies, or the deadline passes
            if self.proc.poll() is not None:
                raise RuntimeError(f"milvus-lite server exited with {self.proc.returncode}: {self.tail()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"milvus-lite server not listening on {self.port} after {ready_timeout:g} s: "
                                       f"{self.tail()}") from None
                time.sleep(0.2)

    def tail(self, chars: int = 800) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:].strip()
        except OSError:
            return ""

    def disk_mb(self) -> float:
        return sum(f.stat().st_size for f in (self.tmp / "data").rglob("*") if f.is_file()) / MB

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        shutil.rmtree(self.tmp, ignore_errors=True)


def run_milvus(args, ids: list[str], x: np.ndarray, q: np.ndarray, exact: list[list[str]]) -> dict[str, Any]:
    from cirlab.retrieval.milvus import MilvusIndex

    exe = args.milvus_exe or shutil.which("milvus-lite") or str(Path(sys.executable).parent / "milvus-lite")
    server = MilvusLiteServer(exe, args.milvus_port or free_port(), args.milvus_ready_timeout)
    timed_out = threading.Event()

    def watchdog() -> None:  # a hung server call fails as soon as the server is gone
        timed_out.set()
        server.proc.kill()

    timer = threading.Timer(args.milvus_timeout, watchdog)
    timer.daemon = True
    timer.start()
    try:
        base = proc_status(server.proc.pid).get("VmRSS", 0)
        t0 = time.perf_counter()
        index = MilvusIndex(x.shape[1], uri=server.uri, collection="bench", create=True)
        create_s = time.perf_counter() - t0
        stats = build(index, ids, x, min(len(ids), args.add_chunk), args.add_chunk, process=server.proc.pid)
        found, search_s = timed_search(index, q, args.search_batch)
        status = proc_status(server.proc.pid)
        return {**stats, "create_s": create_s, "search_s": search_s, "qps": len(q) / search_s,
                "recall": recall(found, exact), "server_rss_start_mb": base / MB,
                "rss_growth_mb": (status.get("VmRSS", 0) - base) / MB,
                "peak_growth_mb": (status["VmHWM"] - base) / MB if "VmHWM" in status else None,
                "server_rss_mb": status.get("VmRSS", 0) / MB, "disk_mb": server.disk_mb()}
    except Exception as e:
        if timed_out.is_set():
            raise TimeoutError(f"milvus run passed --milvus-timeout {args.milvus_timeout:g} s; server killed") from e
        raise RuntimeError(f"{type(e).__name__}: {e}; server log: {server.tail()}") from e
    finally:
        timer.cancel()
        server.stop()


# -- main -----------------------------------------------------------------------------------------------
def fmt(v: float | None, spec: str) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="N=20000, 1000 queries, milvus 5000/500: checks the "
                   "script in under a minute")
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--queries", type=int, default=10_000)
    p.add_argument("--clusters", type=int, default=1000)
    p.add_argument("--noise", type=float, default=1.0, help="noise norm / centre norm (default 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--hnsw", default="HNSW32", help="faiss factory of the HNSW row")
    p.add_argument("--hnsw-params", default="efSearch=128")
    p.add_argument("--ivf", help="faiss factory of the IVF-PQ row (default IVF<nlist>,PQ32np,RFlat, nlist a power "
                   "of two near 4 sqrt(N); np: no polysemous training, which plain PQ32 adds: minutes, for codes "
                   "only polysemous search would use)")
    p.add_argument("--ivf-params", default="nprobe=32,k_factor_rf=4",
                   help="k_factor_rf: the refine step re-scores k * k_factor_rf PQ candidates exactly")
    p.add_argument("--train-n", type=int, help="rows of the first add, on which IVF-PQ trains (default 64 * nlist)")
    p.add_argument("--add-chunk", type=int, default=100_000, help="rows per add call after the first")
    p.add_argument("--search-batch", type=int, default=1000, help="queries per search call")
    p.add_argument("--skip", nargs="*", default=[], choices=["hnsw", "ivf", "milvus", "bandwidth"])
    p.add_argument("--milvus-n", type=int, default=100_000)
    p.add_argument("--milvus-queries", type=int, default=1000)
    p.add_argument("--milvus-exe", help="default: milvus-lite on PATH or beside this python")
    p.add_argument("--milvus-port", type=int, help="default: a free port")
    p.add_argument("--milvus-ready-timeout", type=float, default=60.0)
    p.add_argument("--milvus-timeout", type=float, default=3600.0, help="the whole milvus run; then the server is "
                   "killed and the row reports the error")
    p.add_argument("--bw-gb", type=float, default=1.0, help="array size of the bandwidth passes (GB)")
    p.add_argument("--bw-reps", type=int, default=5)
    p.add_argument("--scan-nq", type=int, nargs="+", default=[1, 16, 1000], help="query counts of the flat scans")
    p.add_argument("--scan-reps", type=int, default=20, help="calls per scan size (median)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args()
    if args.quick:
        args.n, args.queries, args.milvus_n, args.milvus_queries = 20_000, 1000, 5000, 500
        args.milvus_timeout = min(args.milvus_timeout, 300.0)
    args.milvus_n, args.milvus_queries = min(args.milvus_n, args.n), min(args.milvus_queries, args.queries)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so `finally` still kills the milvus server

    import faiss

    faiss.omp_set_num_threads(args.threads)
    try:
        from threadpoolctl import threadpool_limits

        threadpool_limits(args.threads)
    except ImportError:
        pass
    nlist = default_nlist(args.n)
    ivf = args.ivf or f"IVF{nlist},PQ32np,RFlat"
    train_n = min(args.n, args.train_n or 64 * nlist)
    t_start = time.perf_counter()
    out: dict[str, Any] = {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()} | {"ivf": ivf,
                                                                                               "train_n": train_n},
        "machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "threads": args.threads, "llc_bytes": llc_bytes(),
                    "faiss": faiss.__version__, "numpy": np.__version__, "loadavg_start": os.getloadavg()}}
    if os.getloadavg()[0] > 0.5:
        print(f"warning: load average {os.getloadavg()[0]:.1f} at the start: other processes use the CPU, so the "
              f"times are contended (and OpenMP with more threads than free cores is much slower: try --threads 1)",
              flush=True)

    # Bandwidth first, while the process holds least.
    bw = None
    if "bandwidth" not in args.skip:
        bw = bandwidth(args.bw_gb, args.dim, args.bw_reps, args.threads)
        out["bandwidth_gb_s"] = bw

    t0 = time.perf_counter()
    rng = np.random.default_rng(args.seed)
    centres = rng.standard_normal((args.clusters, args.dim), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    x = clustered(args.n, centres, args.noise, rng)
    q = clustered(args.queries, centres, args.noise, rng)
    ids = [str(i) for i in range(args.n)]
    out["data_s"] = time.perf_counter() - t0
    print(f"data: {args.n} x {args.dim} float32 ({x.nbytes / MB:.0f} MB), {args.queries} queries, "
          f"{args.clusters} clusters, noise {args.noise}, seed {args.seed}; {cpu_name()}, {args.threads} threads, "
          f"faiss {faiss.__version__} ({out['data_s']:.1f} s)", flush=True)

    rows: list[dict[str, Any]] = []

    def row(name: str, params: str, n: int, nq: int, **r: Any) -> None:
        rows.append({"index": name, "params": params, "n": n, "queries": nq, **r})
        print(f"  {name} {params}: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                                  for k, v in r.items()), flush=True)

    # Exact: faiss Flat, the ground truth of every recall.
    flat = FaissIndex(args.dim, "Flat")
    stats = build(flat, ids, x, min(args.n, args.add_chunk), args.add_chunk)
    exact, search_s = timed_search(flat, q, args.search_batch)
    row("faiss Flat", "", args.n, args.queries, **stats, search_s=search_s, qps=args.queries / search_s, recall=1.0)

    if bw is not None:
        bw_1t = max(v for k, v in bw.items() if k.startswith("read") and k.endswith("1t"))
        bw_all = max(v for k, v in bw.items() if k.startswith("read"))
        out["flat_scans"] = flat_scans(flat, q, args.scan_nq, args.scan_reps, bw_1t, bw_all, args.n, args.dim)
    del flat
    trim()

    for key, factory, params, first in (("hnsw", args.hnsw, args.hnsw_params, min(args.n, args.add_chunk)),
                                        ("ivf", ivf, args.ivf_params, train_n)):
        if key in args.skip:
            continue
        try:
            index = FaissIndex(args.dim, factory, params)
            stats = build(index, ids, x, first, args.add_chunk)
            found, search_s = timed_search(index, q, args.search_batch)
            row(f"faiss {factory}", params, args.n, args.queries, **stats, search_s=search_s,
                qps=args.queries / search_s, recall=recall(found, exact))
            del index
        except Exception as e:  # one failing index still leaves the others' rows
            row(f"faiss {factory}", params, args.n, args.queries, error=f"{type(e).__name__}: {e}")
        trim()

    if "milvus" not in args.skip:
        mn, mq = args.milvus_n, args.milvus_queries
        xs, qs, sub_ids = x[:mn], q[:mq], ids[:mn]
        sub = FaissIndex(args.dim, "Flat")  # the subset's exact top 10, and a faiss row to compare with
        stats = build(sub, sub_ids, xs, min(mn, args.add_chunk), args.add_chunk)
        sub_exact, search_s = timed_search(sub, qs, args.search_batch)
        row("faiss Flat", "(milvus subset)", mn, mq, **stats, search_s=search_s, qps=mq / search_s, recall=1.0)
        del sub
        trim()
        try:
            r = run_milvus(args, sub_ids, xs, qs, sub_exact)
            row("milvus-lite FLAT", "(server process RSS)", mn, mq, **r)
        except Exception as e:
            row("milvus-lite FLAT", "(server process RSS)", mn, mq, error=str(e)[:2000])

    out["indexes"] = rows
    out["total_s"] = time.perf_counter() - t_start
    out["machine"]["loadavg_end"] = os.getloadavg()
    out["process_peak_rss_mb"] = note_peak() / MB

    # -- tables ------------------------------------------------------------------------------------------
    print(f"\n{args.n} x {args.dim} vectors, {args.queries} queries, k={K}, {args.threads} threads, search batches of "
          f"{args.search_batch}; IVF-PQ trained on the first {train_n} rows\n")
    print("| index | search params | N | queries | build s | RSS growth MB | peak growth MB | search s | QPS | "
          "recall@10 |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        if "error" in r:
            print(f"| {r['index']} | {r['params']} | {r['n']} | {r['queries']} | error: "
                  f"{r['error'][:200].replace('|', '/')} | | | | | |")
            continue
        print(f"| {r['index']} | {r['params']} | {r['n']} | {r['queries']} | {r['build_s']:.2f} | "
              f"{r['rss_growth_mb']:.0f} | {fmt(r.get('peak_growth_mb'), '.0f')} | {r['search_s']:.2f} | "
              f"{r['qps']:.0f} | {r['recall']:.3f} |")
    if bw is not None:
        print(f"\nmemory bandwidth, {bw['array_gb']:.2f} GB arrays, best of {args.bw_reps} (GB/s = 1e9 B/s)\n")
        print("| pass | GB/s |")
        print("|---|---:|")
        names = {"copy": "copy, numpy, 1 thread (read + written bytes)", "read_sum_1t": "read: arr.sum(), 1 thread",
                 "read_max_1t": "read: arr.max(), 1 thread",
                 "read_gemv_1t": "read: arr @ v, BLAS 1 thread",
                 "read_gemv_all": f"read: arr @ v, BLAS {args.threads} threads"}
        for k, name in names.items():
            if k in bw:
                print(f"| {name} | {bw[k]:.1f} |")
        scan_mb = args.n * args.dim * 4 / MB
        on_all = f", {bw_all:.1f} GB/s on {args.threads}" if args.threads > 1 else ""
        print(f"\nflat scans through FaissIndex.search, {scan_mb:.0f} MB read per call, median of the calls; floor = "
              f"bytes / read bandwidth ({bw_1t:.1f} GB/s on 1 thread{on_all})\n")
        all_cols = args.threads > 1
        print("| nq | calls | ms / call | ms / query | floor ms (1 thread) | ratio | "
              + ("floor ms (all) | ratio | " if all_cols else "") + "scan GB/s | GFLOP/s | CPU s / wall s |")
        print("|---:|---:|---:|---:|---:|---:|" + ("---:|---:|" if all_cols else "") + "---:|---:|---:|")
        for s in out["flat_scans"]:
            print(f"| {s['nq']} | {s['calls']} | {s['ms_per_call']:.2f} | {s['ms_per_query']:.3f} | "
                  f"{s['floor_ms_1t']:.2f} | {s['ratio_1t']:.2f} | "
                  + (f"{s['floor_ms_all']:.2f} | {s['ratio_all']:.2f} | " if all_cols else "")
                  + f"{s['gb_per_s']:.1f} | {s['gflops']:.1f} | {s['cpu_per_wall']:.2f} |")
        llc = out["machine"]["llc_bytes"]
        if llc and args.n * args.dim * 4 < 4 * llc:
            print(f"\nnote: the {scan_mb:.0f} MB scanned is under 4x the {llc / MB:.0f} MB last-level cache: the scans "
                  f"run (partly) from cache and the bandwidth floor does not bind; use a larger --n")
    print(f"\ntotal {out['total_s']:.1f} s; this process's peak RSS {out['process_peak_rss_mb']:.0f} MB")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=1) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
