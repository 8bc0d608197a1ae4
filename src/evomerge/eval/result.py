"""What an evaluation returns. Shared by the evaluators, the evolve loop, the run store and the backends."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

WORST_SCORE = 0.0  # every built-in metric is in [0, 1], higher is better; perplexity is reported as 1/ppl


@dataclass
class TaskScore:
    """One task's score: the mean of `per_example` under `metric` (higher is better).

    `groups` holds the same score over each group's examples alone, when the task file names groups
    (empty otherwise, and in results stored before groups existed, which `EvalResult.from_dict` still reads).
    """

    task: str
    metric: str
    score: float
    per_example: list[float] = field(default_factory=list)
    n_examples: int = 0
    groups: dict[str, float] = field(default_factory=dict)  # group -> score of its examples
    # Which dev examples `per_example` scores (indices into the task file's examples), when a fitness
    # layer scored a subset (racing, a representative subset); None: all of them, in file order.
    examples: list[int] | None = None


@dataclass
class EvalResult:
    """Fitness of one model: a weighted `score` over tasks, the tasks' own scores, measures and cost.

    A failed evaluation (exception, NaN) is an EvalResult with `error` set and the worst score, never a crash.
    """

    score: float
    tasks: dict[str, TaskScore] = field(default_factory=dict)
    behaviour: dict[str, float] = field(default_factory=dict)  # descriptors for quality diversity
    cost: dict[str, float] = field(default_factory=dict)  # e.g. {"wall_s": 1.2, "merge_s": 0.1}
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and math.isfinite(self.score)

    @classmethod
    def failed(
        cls, error: str, *, score: float = WORST_SCORE, cost: dict[str, float] | None = None
    ) -> EvalResult:
        return cls(score=score, error=error, cost=dict(cost or {}))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EvalResult:
        tasks = {name: TaskScore(**task) for name, task in data.get("tasks", {}).items()}
        return cls(
            score=data["score"],
            tasks=tasks,
            behaviour=dict(data.get("behaviour", {})),
            cost=dict(data.get("cost", {})),
            error=data.get("error"),
        )
