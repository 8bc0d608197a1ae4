"""Where candidates are evaluated. The evolve loop only sees `Backend.evaluate_batch`.

A backend turns merge recipes (one per candidate, each with the seed its random masks draw from) into
EvalResults, in order. It never raises for a bad candidate: an exception or NaN becomes
`EvalResult.failed`, so one broken merge never stops a run. `batch_size` tells the loop how many
candidates to hand over at once (1 in-process, the number of workers for a parallel backend); the loop
commits each batch to the run store before asking for the next.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol, runtime_checkable

from evomerge.eval.result import EvalResult


@runtime_checkable
class Backend(Protocol):
    batch_size: int

    def evaluate_batch(self, recipes: Sequence[Any], seeds: Sequence[int]) -> list[EvalResult]: ...

    def close(self) -> None: ...


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
