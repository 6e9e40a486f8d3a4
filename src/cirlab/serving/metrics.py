"""Request counts, latencies, batch sizes and queue depth in Prometheus's text format (``GET /metrics``)."""

from __future__ import annotations

import threading
from collections import Counter
from typing import Callable

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


class Histogram:
    def __init__(self, buckets: tuple[float, ...]):
        self.buckets, self.counts, self.sum, self.count = buckets, [0] * len(buckets), 0.0, 0

    def observe(self, value: float) -> None:
        for i, edge in enumerate(self.buckets):
            if value <= edge:
                self.counts[i] += 1
        self.sum += value
        self.count += 1

    def lines(self, name: str, labels: str = "") -> list[str]:
        sep = "," if labels else ""
        out = [f'{name}_bucket{{{labels}{sep}le="{edge:g}"}} {n}' for edge, n in zip(self.buckets, self.counts)]
        out.append(f'{name}_bucket{{{labels}{sep}le="+Inf"}} {self.count}')
        suffix = f"{{{labels}}}" if labels else ""
        return out + [f"{name}_sum{suffix} {self.sum:.6f}", f"{name}_count{suffix} {self.count}"]


class Metrics:
    def __init__(self, queue_depth: Callable[[], int]):
        self.lock = threading.Lock()
        self.requests: Counter[tuple[str, str, int]] = Counter()
        self.latency: dict[str, Histogram] = {}
        self.batches = Histogram(BATCH_BUCKETS)
        self.queue_depth = queue_depth

    def request(self, method: str, route: str, status: int, seconds: float) -> None:
        with self.lock:
            self.requests[(method, route, status)] += 1
            self.latency.setdefault(route, Histogram(LATENCY_BUCKETS)).observe(seconds)

    def batch(self, size: int) -> None:
        with self.lock:
            self.batches.observe(size)

    def render(self) -> str:
        with self.lock:
            lines = ["# HELP cirlab_requests_total HTTP requests by method, route and status.",
                     "# TYPE cirlab_requests_total counter"]
            lines += [f'cirlab_requests_total{{method="{m}",route="{r}",status="{s}"}} {n}'
                      for (m, r, s), n in sorted(self.requests.items())]
            lines += ["# HELP cirlab_request_seconds Request latency by route.",
                      "# TYPE cirlab_request_seconds histogram"]
            for route, h in sorted(self.latency.items()):
                lines += h.lines("cirlab_request_seconds", f'route="{route}"')
            lines += ["# HELP cirlab_batch_size Queries encoded per model call.", "# TYPE cirlab_batch_size histogram"]
            lines += self.batches.lines("cirlab_batch_size")
            lines += ["# HELP cirlab_queue_depth Queries waiting for the model.", "# TYPE cirlab_queue_depth gauge",
                      f"cirlab_queue_depth {self.queue_depth()}"]
        return "\n".join(lines) + "\n"
