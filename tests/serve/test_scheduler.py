"""The batching scheduler: requests that arrive together share one engine run, failures stay alone."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import pytest

from evomerge.serve.engine import Generated, Job
from evomerge.serve.scheduler import BatchScheduler


class FakeEngine:
    """Records the size of every batch; a job whose prompt holds -1 makes its batch raise."""

    def __init__(self) -> None:
        self.batches: list[int] = []

    def run(self, jobs: Sequence[Job]) -> list[Generated]:
        self.batches.append(len(jobs))
        if any(-1 in job.prompt_ids for job in jobs):
            raise RuntimeError("poisoned job")
        return [Generated([], str(job.prompt_ids), "length") for job in jobs]


def run(scheduler: BatchScheduler, requests: list[list[Job]]) -> list[Any]:
    async def main() -> list[Any]:
        tasks = [scheduler.submit(jobs) for jobs in requests]
        return await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), timeout=30)

    scheduler.start()
    try:
        return asyncio.run(main())
    finally:
        scheduler.stop()


def test_requests_that_arrive_together_share_a_batch() -> None:
    engine = FakeEngine()
    scheduler = BatchScheduler(engine, max_batch_size=32, max_wait_s=0.2)  # type: ignore[arg-type]
    results = run(scheduler, [[Job([index])] for index in range(10)])
    assert [r[0].text for r in results] == [str([index]) for index in range(10)]
    assert sum(engine.batches) == 10 and len(engine.batches) < 10


def test_batches_hold_at_most_max_batch_size_jobs_and_a_request_stays_whole() -> None:
    engine = FakeEngine()
    scheduler = BatchScheduler(engine, max_batch_size=3, max_wait_s=0.2)  # type: ignore[arg-type]
    results = run(scheduler, [[Job([i]), Job([i])] for i in range(6)])
    assert all(len(r) == 2 for r in results)
    assert max(engine.batches) <= 4 and all(size % 2 == 0 for size in engine.batches)


def test_batch_size_one_runs_one_request_at_a_time() -> None:
    engine = FakeEngine()
    run(BatchScheduler(engine, max_batch_size=1, max_wait_s=0.2), [[Job([i])] for i in range(5)])  # type: ignore[arg-type]
    assert engine.batches == [1] * 5


def test_a_failing_request_fails_alone() -> None:
    engine = FakeEngine()
    scheduler = BatchScheduler(engine, max_batch_size=32, max_wait_s=0.2)  # type: ignore[arg-type]
    results = run(scheduler, [[Job([1])], [Job([-1])], [Job([3])]])
    assert isinstance(results[1], RuntimeError)
    assert results[0][0].text == "[1]" and results[2][0].text == "[3]"


def test_submit_before_start_is_an_error() -> None:
    scheduler = BatchScheduler(FakeEngine())  # type: ignore[arg-type]
    with pytest.raises(RuntimeError, match="start"):
        asyncio.run(scheduler.submit([Job([1])]))
    with pytest.raises(ValueError, match="max_batch_size"):
        BatchScheduler(FakeEngine(), max_batch_size=0)  # type: ignore[arg-type]
