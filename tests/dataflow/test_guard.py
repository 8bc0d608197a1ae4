"""The ps+dfs guard: the paired sign test, the verdict, the held-out examples, and the store's choice."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from evomerge.dataflow.guard import HELD_OUT, guard_cost, held_out_tasks, judge, sign_test
from evomerge.eval.result import EvalResult, TaskScore
from evomerge.runs.config import FitnessTask
from evomerge.runs.store import Evaluation, RunStore


def scored(*per_example: float) -> EvalResult:
    values = list(per_example)
    return EvalResult(
        sum(values) / len(values),
        {"t": TaskScore("t", "exact_match", sum(values) / len(values), values, len(values))},
    )


def test_the_sign_test_is_the_exact_binomial_tail_over_the_examples_that_differ() -> None:
    assert sign_test([0.0, 0.0]) == (0, 0, 1.0)
    assert sign_test([1.0, 0.0, 0.0]) == (1, 0, 0.5)
    wins, losses, p = sign_test([1, 1, 1, -1, 0, 1, 1])
    assert (wins, losses) == (5, 1) and math.isclose(p, (math.comb(6, 5) + 1) / 64)
    assert sign_test([1.0] * 8)[2] == pytest.approx(1 / 256)


def test_the_guard_refuses_a_path_whose_gain_is_within_the_noise() -> None:
    reference = scored(*([1.0] * 20 + [0.0] * 20))
    # Two examples better and one worse: a higher mean (0.525 vs 0.5), but p = 0.5.
    candidate = scored(*([1.0] * 19 + [0.0] + [1.0, 1.0] + [0.0] * 18))
    verdict = judge(("w0", reference), ("g3c1", candidate), alpha=0.05, examples=HELD_OUT)
    assert verdict.candidate_score > verdict.reference_score
    assert (verdict.wins, verdict.losses) == (2, 1) and not verdict.accepted and verdict.chosen == "w0"
    assert "refused" in verdict.describe()


def test_the_guard_keeps_a_path_that_wins_clearly() -> None:
    reference = scored(*([1.0] * 10 + [0.0] * 30))
    candidate = scored(*([1.0] * 19 + [0.0] * 21))  # nine more examples right, none lost
    verdict = judge(("w0", reference), ("g3c1", candidate), alpha=0.05, examples=HELD_OUT)
    assert verdict.accepted and verdict.chosen == "g3c1" and verdict.p_value == pytest.approx(2**-9)
    assert type(verdict).from_dict(verdict.to_dict()) == verdict


def test_the_guard_needs_both_scored_on_the_same_examples() -> None:
    with pytest.raises(ValueError, match="same, non-empty examples"):
        judge(("w0", scored(1.0, 0.0)), ("g0c0", scored(1.0)), alpha=0.05, examples=HELD_OUT)


def test_held_out_examples_are_the_dev_lines_after_the_limit(tmp_path: Path) -> None:
    dev = tmp_path / "dev.jsonl"
    dev.write_text("".join(f'{{"prompt": "{i}+0=", "answer": "{i}"}}\n' for i in range(10)))
    task = FitnessTask(name="t", dev=dev, limit=4)
    (held,) = held_out_tasks([task], None)  # as many as the search used
    assert [e.prompt for e in held.examples] == [f"{i}+0=" for i in range(4, 8)]
    (held,) = held_out_tasks([task], 100)  # capped by what the file holds
    assert len(held.examples) == 6 and guard_cost([task], [held]) == 3  # 12 examples = 3 candidates of 4
    assert held_out_tasks([FitnessTask(name="t", dev=dev)], None) == []  # no limit: nothing held out
    assert held_out_tasks([FitnessTask(name="t", dev=dev, limit=10)], None) == []  # nothing left over
    assert guard_cost([task], []) == 0


def test_a_chosen_evaluation_is_the_runs_best_until_the_choice_is_cleared(tmp_path: Path) -> None:
    with RunStore.in_dir(tmp_path) as store:
        store.init_run({}, 0)
        for index, score in enumerate((0.5, 0.7)):
            store.add_evaluation(Evaluation(0, index, np.zeros(2) + index, "r", 0, scored(score), 0.0))
        best = store.best()
        assert best is not None and best.index == 1
        store.choose((0, 0), {"why": "guard"})
        best = store.best()
        assert best is not None and best.index == 0 and store.chosen() == ((0, 0), {"why": "guard"})
        on_dev = store.best_on_dev()
        assert on_dev is not None and on_dev.index == 1
        store.choose(None)
        best = store.best()
        assert best is not None and best.index == 1 and store.chosen() is None
