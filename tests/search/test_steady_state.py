"""Optimisers told one result at a time (`schedule: steady-state`): which, and what one-at-a-time means."""

from __future__ import annotations

import numpy as np
import pytest

from evomerge.eval.result import EvalResult
from evomerge.search.base import SteadyState
from evomerge.search.registry import (
    make_optimizer,
    optimizer_entry,
    optimizer_names,
    parse_settings,
    steady_state_optimizers,
)

LOWER, UPPER = np.zeros(3), np.ones(3)


# Fields an optimiser needs beyond name and population_size.
NEEDS: dict[str, dict[str, object]] = {"nsga2": {"objectives": ["a", "b"]}, "map-elites": {"measures": ["a"]}}


def build(name: str, **fields: object) -> object:
    data = {"name": name, "population_size": 4, **NEEDS.get(name, {}), **fields}
    return make_optimizer(parse_settings(data), LOWER, UPPER, seed=1)


def test_the_steady_state_optimisers_are_random_and_natural_niches() -> None:
    assert steady_state_optimizers() == ["natural-niches", "random"]


@pytest.mark.parametrize("name", optimizer_names())
def test_settings_say_steady_state_exactly_when_the_optimiser_takes_it(name: str) -> None:
    optimizer = build(name)
    assert isinstance(optimizer, SteadyState) == optimizer_entry(name).settings.steady_state


def test_random_asks_one_at_a_time_what_it_asks_a_generation_at_a_time() -> None:
    whole, single = build("random"), build("random")
    generation = whole.ask()  # type: ignore[attr-defined]  # (4, 3)
    assert np.array_equal(np.stack([single.ask_one() for _ in range(4)]), generation)  # type: ignore[attr-defined]


def test_natural_niches_breeds_from_each_result_told() -> None:
    optimizer = build("natural-niches", archive_size=2, start="center")
    first, second = optimizer.ask_one(), optimizer.ask_one()  # type: ignore[attr-defined]  # both out at once
    optimizer.tell_one(second, EvalResult(score=0.5))  # type: ignore[attr-defined]  # in any order
    optimizer.tell_one(first, EvalResult(score=0.25))  # type: ignore[attr-defined]
    assert [elite.score for elite in optimizer.elites()] == [0.5, 0.25]  # type: ignore[attr-defined]
    child = optimizer.ask_one()  # type: ignore[attr-defined]  # bred from the archive now
    assert child.shape == (3,) and np.all((child >= 0) & (child <= 1))
    optimizer.tell_one(child, EvalResult.failed("broken"))  # type: ignore[attr-defined]
    assert len(optimizer.elites()) == 2  # type: ignore[attr-defined]  # a failed result never enters
