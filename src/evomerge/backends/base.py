"""Where candidates are evaluated. The evolve loop only sees `Backend.evaluate_batch`.

A backend turns merge recipes (one per candidate, each with the seed its random masks draw from) into
EvalResults, in order. It never raises for a bad candidate: an exception or NaN becomes
`EvalResult.failed`, so one broken merge never stops a run. `batch_size` tells the loop how many
candidates to hand over at once (1 in-process); the loop commits each batch to the run store before
asking for the next.

A `Pool` (the Ray backend) is a backend of several workers that also takes candidates one at a time:
`submit` queues one, `next_result` returns whichever finishes first. The loop then hands over a whole
generation, commits each result as it arrives (a killed driver loses no finished evaluation), and with
`schedule: steady-state` gives a worker its next candidate as soon as it is free.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable, Sequence
from typing import Any, Literal, Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict

from evomerge.eval.result import EvalResult

Schedule = Literal["synchronous", "steady-state"]


class BackendSettings(BaseModel):
    """What every backend's settings block (`backend:` in a run config) holds; each backend subclasses it
    with its own fields (backends.registry names them)."""

    model_config = ConfigDict(extra="forbid")

    name: str
    # `synchronous`: the optimiser is told each whole generation (the same results as in-process);
    # `steady-state`: a free worker gets the next candidate at once (a Pool, and an optimiser that takes
    # results one at a time, only; see docs/ray.md).
    schedule: Schedule = "synchronous"


@runtime_checkable
class Backend(Protocol):
    batch_size: int

    def evaluate_batch(self, recipes: Sequence[Any], seeds: Sequence[int]) -> list[EvalResult]: ...

    def close(self) -> None: ...


@runtime_checkable
class Pool(Protocol):
    """A backend of workers that take candidates one at a time (see the module doc)."""

    def submit(self, key: Hashable, candidate: Any, seed: int) -> None:
        """Queue one candidate; it starts as soon as a worker is free."""
        ...

    def next_result(self) -> tuple[Hashable, EvalResult]:
        """(key, result) of the next candidate to finish, each submitted key exactly once (a candidate
        whose worker died is run again on another worker)."""
        ...

    def idle_workers(self) -> int:
        """Workers alive with nothing queued for them: how many more candidates would start at once."""
        ...

    def cancel(self) -> None:
        """Forget every candidate submitted and not returned yet (a run stopped with an error)."""
        ...


class FunctionBackend:
    """Scores each recipe with a plain function `(recipe, seed) -> float | EvalResult`.

    For tests, cheap synthetic fitness landscapes and custom fitness code. Exceptions and NaN become
    failed results, exactly as in the real backends.
    """

    batch_size = 1

    def __init__(self, function: Callable[[Any, int], float | EvalResult]) -> None:
        self.function = function

    def evaluate_batch(self, recipes: Sequence[Any], seeds: Sequence[int]) -> list[EvalResult]:
        return [self._one(recipe, seed) for recipe, seed in zip(recipes, seeds, strict=True)]

    def _one(self, recipe: Any, seed: int) -> EvalResult:
        start = time.perf_counter()
        try:
            value = self.function(recipe, seed)
        except Exception as error:  # a failing candidate is a result, not a crash
            return EvalResult.failed(
                f"{type(error).__name__}: {error}", cost={"wall_s": time.perf_counter() - start}
            )
        result = value if isinstance(value, EvalResult) else EvalResult(score=float(value))
        return checked(result, cost={"wall_s": time.perf_counter() - start})

    def close(self) -> None:
        return None


def checked(result: EvalResult, *, cost: dict[str, float]) -> EvalResult:
    """`result` with `cost` merged in; a non-finite score becomes a failed result."""
    merged = {**result.cost, **cost}
    if result.error is None and not _finite(result.score):
        return EvalResult.failed(f"non-finite score {result.score}", cost=merged)
    result.cost = merged
    return result


def _finite(value: float) -> bool:
    return value == value and value not in (float("inf"), float("-inf"))
