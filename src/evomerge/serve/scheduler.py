"""The batching scheduler: requests that arrive together go through the model together.

Request handlers (on the asyncio event loop) put their jobs on a thread-safe queue and await a future. One
worker thread owns the engine (and so the model): it takes the first waiting request and everything queued
behind it, waits up to `max_wait_s` for more while the batch is smaller than the last one (up to
`max_batch_size` jobs), runs them as one batch and resolves every request's future on its event loop. `max_batch_size=1` serves one request at a time (the baseline of
benchmarks/serve.py). A batch that fails is run again one request at a time, so one bad request fails
alone and the worker lives on.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from evomerge.serve.engine import Engine, Generated, Job


@dataclass
class _Pending:
    jobs: Sequence[Job]
    future: asyncio.Future[list[Generated]]
    loop: asyncio.AbstractEventLoop


class BatchScheduler:
    """Batches submitted jobs into engine runs on one worker thread. `start()` before `submit`, `stop()` after."""

    def __init__(self, engine: Engine, *, max_batch_size: int = 32, max_wait_s: float = 0.005) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        self.engine = engine
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s if max_batch_size > 1 else 0.0
        self.batches_run = 0  # batches given to the engine, a failed batch's reruns included
        self.jobs_run = 0
        self._queue: queue.Queue[_Pending | None] = queue.Queue()
        self._last_size = 1  # jobs in the last batch: how many to wait for in the next
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name="evomerge-serve-worker", daemon=True)
            self._thread.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        """Let the worker finish its batch and exit (bounded wait)."""
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout_s)
            self._thread = None

    async def submit(self, jobs: Sequence[Job]) -> list[Generated]:
        """Run `jobs` (one request's, kept in one batch) and return their results in order."""
        if self._thread is None:
            raise RuntimeError("BatchScheduler.submit before start()")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[list[Generated]] = loop.create_future()
        self._queue.put(_Pending(jobs, future, loop))
        return await future

    def _work(self) -> None:
        while (batch := self._next_batch()) is not None:
            self._run(batch)

    def _next_batch(self) -> list[_Pending] | None:
        """The first waiting request, everything queued behind it, and what arrives within max_wait_s.

        Waiting only pays when requests come in crowds: the batch waits (at most max_wait_s) until it is as
        large as the last one, so a lone client never waits and 32 clients are gathered into one batch.
        """
        first = self._queue.get()
        if first is None:
            return None
        batch, size = [first], len(first.jobs)
        target = min(self.max_batch_size, self._last_size)
        deadline = time.monotonic() + self.max_wait_s
        while size < self.max_batch_size:
            wait = deadline - time.monotonic() if size < target else 0.0
            try:
                item = self._queue.get(timeout=wait) if wait > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if item is None:  # stop after this batch
                self._queue.put(None)
                break
            batch.append(item)
            size += len(item.jobs)
        self._last_size = size
        return batch

    def _run(self, batch: list[_Pending]) -> None:
        live = [pending for pending in batch if not pending.future.done()]  # a client that left: skip it
        if not live:
            return
        self.batches_run += 1
        try:
            results = self.engine.run([job for pending in live for job in pending.jobs])
        except Exception as error:
            if len(live) == 1:
                _resolve(live[0], error=error)
            else:  # find the culprit: every request alone
                for pending in live:
                    self._run([pending])
            return
        self.jobs_run += len(results)
        cursor = 0
        for pending in live:
            _resolve(pending, result=results[cursor : cursor + len(pending.jobs)])
            cursor += len(pending.jobs)


def _resolve(pending: _Pending, *, result: Any = None, error: BaseException | None = None) -> None:
    def settle() -> None:
        if pending.future.done():  # cancelled: the client went away
            return
        if error is not None:
            pending.future.set_exception(error)
        else:
            pending.future.set_result(result)

    with contextlib.suppress(RuntimeError):  # a closed event loop (the server shut down): nobody waits
        pending.loop.call_soon_threadsafe(settle)
