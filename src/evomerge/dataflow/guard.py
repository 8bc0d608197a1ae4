"""The ps+dfs guard: a path over the parameter-space merge becomes the run's result only if it wins by
more than the noise.

The path search picks its best among dozens of candidates by their dev score, so its best beats the
parameter-space merge (`ps-best`, the path search's warm start) on dev by luck alone as often as not: a
gain of one or two dev examples is the maximum of many noisy draws, not an improvement (on the lm zoo
such gains did not hold on test). The guard therefore scores both on **dev examples neither phase
searched on** (each fitness task's dev examples after its `limit`, up to `guard_examples`) and keeps the
path only when a one-sided paired sign test over those examples says it is better with p < `guard_alpha`:
each example where one of the two scores higher counts as a win or a loss, ties drop out, and p is the
chance of at least that many wins out of the decided examples if either were as likely to win.

When no dev example is left over (no `limit`, or the file holds no more), the test runs on the
per-example dev scores the search itself stored: still a paired test, but on the examples the path was
picked on, so it favours the path (the verdict says which examples it used).

Pure: the verdict is a function of two per-example score lists; the loop (runs/loop.py) scores them and
records the verdict in the run store (`RunStore.choose`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from evomerge.eval.result import EvalResult

HELD_OUT, SEARCHED = "held-out dev", "the search's own dev examples"


@dataclass(frozen=True)
class GuardVerdict:
    """Whether the path search's best (`candidate`) replaces the reference (ps-best alone), and why."""

    reference: str  # evaluation ids (`w0`, `g3c5`)
    candidate: str
    examples: str  # HELD_OUT or SEARCHED
    n: int  # examples compared
    wins: int  # examples where the candidate scored higher
    losses: int
    p_value: float
    alpha: float
    reference_score: float  # mean over the compared examples
    candidate_score: float

    @property
    def accepted(self) -> bool:
        return self.wins > self.losses and self.p_value < self.alpha

    @property
    def chosen(self) -> str:
        return self.candidate if self.accepted else self.reference

    def describe(self) -> str:
        verdict = "kept" if self.accepted else "refused"
        return (
            f"guard: the path search's best {self.candidate} {verdict} against ps-best alone "
            f"({self.reference}) on {self.n} {self.examples} examples: {self.candidate_score:.3f} vs "
            f"{self.reference_score:.3f}, {self.wins} wins / {self.losses} losses, one-sided sign test "
            f"p = {self.p_value:.3g} (needs < {self.alpha:g})"
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"accepted": self.accepted, "chosen": self.chosen}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GuardVerdict:
        return cls(**{k: v for k, v in data.items() if k not in ("accepted", "chosen")})


def sign_test(differences: Sequence[float]) -> tuple[int, int, float]:
    """(wins, losses, one-sided p): the chance of at least `wins` positive differences among the non-zero
    ones if each were positive with probability 1/2 (exact binomial tail; p = 1 when none differ)."""
    wins = sum(1 for d in differences if d > 0)
    losses = sum(1 for d in differences if d < 0)
    n = wins + losses
    if n == 0:
        return 0, 0, 1.0
    tail = sum(math.comb(n, k) for k in range(wins, n + 1))
    return wins, losses, tail / 2**n


def per_example(result: EvalResult) -> list[float]:
    """Every task's per-example scores in one list, task by task (the order both results share)."""
    return [score for name in sorted(result.tasks) for score in result.tasks[name].per_example]


def judge(
    reference: tuple[str, EvalResult],
    candidate: tuple[str, EvalResult],
    *,
    alpha: float,
    examples: str,
) -> GuardVerdict:
    """The verdict on `candidate` against `reference` (id, result on the same examples)."""
    ref, cand = per_example(reference[1]), per_example(candidate[1])
    if len(ref) != len(cand) or not ref:
        raise ValueError(
            f"guard: {reference[0]} and {candidate[0]} were scored on {len(ref)} and {len(cand)} examples; "
            "a paired test needs the same, non-empty examples."
        )
    wins, losses, p_value = sign_test([c - r for r, c in zip(ref, cand, strict=True)])
    return GuardVerdict(
        reference[0],
        candidate[0],
        examples,
        len(ref),
        wins,
        losses,
        p_value,
        alpha,
        sum(ref) / len(ref),
        sum(cand) / len(cand),
    )


def held_out_tasks(fitness: Sequence[Any], guard_examples: int | None) -> list[Any]:
    """Per fitness task, its dev examples after the first `limit` (the ones the search scored), at most
    `guard_examples` of them (None: as many as the search used); [] when any task has none left over
    (then the guard falls back to the searched examples), or for a task the loop does not read from a
    file (lm-eval)."""
    from evomerge.eval.tasks import Task, load_task

    tasks: list[Task] = []
    for task in fitness:
        if task.lm_eval is not None or task.dev is None or task.limit is None:
            return []
        whole = load_task(Path(task.dev), metric=task.metric, name=task.task_name, weight=task.weight)
        count = task.limit if guard_examples is None else guard_examples
        rest = whole.examples[task.limit : task.limit + count]
        if not rest:
            return []
        tasks.append(
            Task(whole.name, whole.metric, rest, path=whole.path, weight=whole.weight, extra=whole.extra)
        )
    return tasks


def guard_cost(fitness: Sequence[Any], tasks: Sequence[Any]) -> int:
    """Evaluations the guard's two scorings on `tasks` are worth, counted in candidates' dev examples
    (what the path search's budget gives up for them)."""
    if not tasks:
        return 0
    searched = sum(int(task.limit) for task in fitness)
    held = sum(len(task.examples) for task in tasks)
    return math.ceil(2 * held / max(1, searched))


__all__ = ["GuardVerdict", "guard_cost", "held_out_tasks", "judge", "sign_test"]
