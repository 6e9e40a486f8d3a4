"""Dynamic batching: queries that arrive within a few milliseconds are encoded together.

One worker owns the model (a single thread: torch already uses every core for one batch). A
request waits in a bounded queue; when the worker is free it takes the first waiting request,
keeps collecting for ``wait_ms`` or until ``max_batch``, and runs them as one batch, so that
throughput grows with load while a lone request waits only ``wait_ms``.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Sequence


class QueueFull(Exception):
    """More requests are waiting than the queue holds (the server answers 429)."""


class Batcher:
    def __init__(self, run: Callable[[Sequence[Any]], Sequence[Any]], *, max_batch: int = 16, wait_ms: float = 5.0,
                 max_queue: int = 64, on_batch: Callable[[int], None] | None = None):
        self.run, self.max_batch, self.wait = run, max_batch, wait_ms / 1000
        self.max_queue, self.on_batch = max_queue, on_batch
        self.queue: asyncio.Queue | None = None
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cirlab-model")
        self.worker: asyncio.Task | None = None

    @property
    def depth(self) -> int:
        return self.queue.qsize() if self.queue is not None else 0

    def start(self) -> None:
        self.queue = asyncio.Queue(maxsize=self.max_queue)
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
        """The result for ``item``; raises :class:`QueueFull` at once when the queue is full and
        ``asyncio.TimeoutError`` after ``timeout`` seconds (the item is then dropped unrun)."""
        future = asyncio.get_running_loop().create_future()
        try:
            self.queue.put_nowait((item, future))
        except asyncio.QueueFull:
            raise QueueFull from None
        return await asyncio.wait_for(future, timeout)

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self.queue.get()]
            deadline = loop.time() + self.wait
            while len(batch) < self.max_batch:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(self.queue.get(), remaining))
                except asyncio.TimeoutError:
                    break
            batch = [(item, f) for item, f in batch if not f.done()]  # timed-out requests are not run
            if not batch:
                continue
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
