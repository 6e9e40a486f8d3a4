"""Dynamic batching: queries that arrive within a few milliseconds are encoded together.

One worker owns the model (a single thread: torch already uses every core for one batch). A
request waits in a bounded queue (requests that timed out leave it at once); when the worker is free it takes the first waiting request,
keeps collecting for ``wait_ms`` or until ``max_batch``, and runs them as one batch, so that
throughput grows with load while a lone request waits only ``wait_ms``.
"""

from __future__ import annotations

import asyncio
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Sequence


class QueueFull(Exception):
    """More requests are waiting than the queue holds (the server answers 429)."""


class Batcher:
    def __init__(self, run: Callable[[Sequence[Any]], Sequence[Any]], *, max_batch: int = 16, wait_ms: float = 5.0,
                 max_queue: int = 64, on_batch: Callable[[int], None] | None = None):
        self.run, self.max_batch, self.wait = run, max_batch, wait_ms / 1000
        self.max_queue, self.on_batch = max_queue, on_batch
        self.pending: deque[tuple[Any, asyncio.Future]] = deque()
        self.arrived: asyncio.Event | None = None
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cirlab-model")
        self.worker: asyncio.Task | None = None

    @property
    def depth(self) -> int:
        """Requests waiting for the model (one that timed out no longer counts, nor holds a place)."""
        return sum(not f.done() for _, f in self.pending)

    def start(self) -> None:
        self.arrived = asyncio.Event()
        self.worker = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        if self.worker is not None:
            self.worker.cancel()
            try:
                await self.worker
            except asyncio.CancelledError:
                pass
        self.executor.shutdown(wait=True)

    async def submit(self, item: Any, timeout: float) -> Any:
        """The result for ``item``; raises :class:`QueueFull` at once when ``max_queue`` requests
        wait already, and ``asyncio.TimeoutError`` after ``timeout`` seconds (the item is then
        dropped unrun)."""
        if self.depth >= self.max_queue:
            raise QueueFull
        future = asyncio.get_running_loop().create_future()
        self.pending.append((item, future))
        self.arrived.set()
        return await asyncio.wait_for(future, timeout)

    def _take(self, batch: list) -> None:
        while self.pending and len(batch) < self.max_batch:
            item, future = self.pending.popleft()
            if not future.done():  # timed-out requests are not run
                batch.append((item, future))

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch: list[tuple[Any, asyncio.Future]] = []
            while not batch:
                await self.arrived.wait()
                self.arrived.clear()
                self._take(batch)
            deadline = loop.time() + self.wait
            while len(batch) < self.max_batch and loop.time() < deadline:
                try:
                    await asyncio.wait_for(self.arrived.wait(), deadline - loop.time())
                except asyncio.TimeoutError:
                    break
                self.arrived.clear()
                self._take(batch)
            if self.pending:
                self.arrived.set()  # what did not fit starts the next batch
            if self.on_batch is not None:
                self.on_batch(len(batch))
            try:
                results = await loop.run_in_executor(self.executor, self.run, [item for item, _ in batch])
            except Exception as e:  # one bad batch fails its requests, not the server
                for _, f in batch:
                    if not f.done():
                        f.set_exception(e)
                continue
            for (_, f), result in zip(batch, results):
                if not f.done():
                    f.set_exception(result) if isinstance(result, Exception) else f.set_result(result)
