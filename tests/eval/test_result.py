"""EvalResult: what the run store writes reads back, including results stored before a field existed."""

from __future__ import annotations

import json

from evomerge.eval.result import EvalResult, TaskScore


def test_round_trip_through_json_keeps_groups() -> None:
    task = TaskScore("multi", "exact_match", 0.5, [1.0, 0.0], 2, groups={"add": 1.0, "reverse": 0.0})
    result = EvalResult(score=0.5, tasks={"multi": task}, behaviour={"b": 1.0}, cost={"wall_s": 0.1})
    assert EvalResult.from_dict(json.loads(json.dumps(result.to_dict()))) == result


def test_a_dict_written_before_groups_still_loads() -> None:
    old = {
        "score": 0.25,
        "tasks": {
            "add": {
                "task": "add",
                "metric": "exact_match",
                "score": 0.25,
                "per_example": [0.0, 0.5],
                "n_examples": 2,
            }
        },
        "behaviour": {},
        "cost": {},
        "error": None,
    }
    loaded = EvalResult.from_dict(old)
    assert loaded.tasks["add"].groups == {} and loaded.tasks["add"].per_example == [0.0, 0.5]
    assert loaded.score == 0.25 and loaded.ok
