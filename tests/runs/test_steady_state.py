"""The loop with a pool of workers, in-process: results committed as they finish, steady-state, resume.

`ShuffledPool` stands in for the Ray backend (a Pool whose running candidates finish in a seeded random
order), so these run in the default suite; tests/backends/test_ray.py runs the same paths on Ray.
"""

from __future__ import annotations

import random
from collections.abc import Hashable, Sequence
from pathlib import Path
from typing import Any

import pytest

from evomerge.backends.base import Pool
from evomerge.errors import ConfigError
from evomerge.eval.result import EvalResult
from evomerge.runs.loop import Progress, evolve, resume
from evomerge.runs.store import RunStore
from evomerge.zoo.random_models import FamilySpec, build_family

from .fake_problem import make_config, quadratic_backend

STEADY = {"name": "ray", "workers": 3, "schedule": "steady-state"}


class ShuffledPool:
    """A Pool of `workers` slots over an in-process backend; a random running candidate finishes next."""

    def __init__(self, backend: Any, workers: int = 3, seed: int = 0) -> None:
        self.backend, self.workers, self.rng = backend, workers, random.Random(seed)
        self.batch_size = workers
        self.queue: list[tuple[Hashable, Any, int]] = []
        self.running: list[tuple[Hashable, Any, int]] = []

    def submit(self, key: Hashable, candidate: Any, seed: int) -> None:
        self.queue.append((key, candidate, seed))
        self._fill()

    def _fill(self) -> None:
        while self.queue and len(self.running) < self.workers:
            self.running.append(self.queue.pop(0))

    def idle_workers(self) -> int:
        return max(0, self.workers - len(self.running) - len(self.queue))

    def next_result(self) -> tuple[Hashable, EvalResult]:
        key, candidate, seed = self.running.pop(self.rng.randrange(len(self.running)))
        self._fill()
        return key, self.backend.evaluate_batch([candidate], [seed])[0]

    def cancel(self) -> None:
        self.queue.clear()
        self.running.clear()

    def evaluate_batch(self, recipes: Sequence[Any], seeds: Sequence[int]) -> list[EvalResult]:
        return list(self.backend.evaluate_batch(recipes, seeds))

    def close(self) -> None:
        return None


class DriverKilled(Exception):
    pass


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return build_family(tmp_path_factory.mktemp("steady") / "family", FamilySpec())


def rows(run_dir: Path) -> list[tuple[int, int, list[float], float]]:
    with RunStore.in_dir(run_dir) as store:
        return [(e.generation, e.index, e.genome.tolist(), e.result.score) for e in store.evaluations()]


def pool(config: Any, seed: int = 0) -> ShuffledPool:
    return ShuffledPool(quadratic_backend(config.search_space()), seed=seed)


def test_the_pool_is_a_pool() -> None:
    assert isinstance(ShuffledPool(None), Pool)


def test_a_pool_finishing_out_of_order_gives_the_synchronous_results(tmp_path: Path, family: dict) -> None:
    config = make_config(tmp_path, family, budget={"max_evaluations": 14})
    in_order = evolve(
        config.model_copy(update={"out": tmp_path / "a"}), backend=quadratic_backend(config.search_space())
    )
    shuffled = evolve(config.model_copy(update={"out": tmp_path / "b"}), backend=pool(config))
    assert rows(shuffled.run_dir) == rows(in_order.run_dir)


def test_steady_state_random_asks_the_synchronous_genomes(tmp_path: Path, family: dict) -> None:
    optimizer = {"name": "random", "population_size": 4, "start": "center"}
    config = make_config(tmp_path, family, optimizer=optimizer, budget={"max_evaluations": 10})
    synchronous = evolve(config.model_copy(update={"out": tmp_path / "sync"}), backend=pool(config))
    steady_config = make_config(
        tmp_path, family, optimizer=optimizer, budget={"max_evaluations": 10}, backend=STEADY
    )
    steady = evolve(steady_config.model_copy(update={"out": tmp_path / "steady"}), backend=pool(config))
    assert rows(steady.run_dir) == rows(synchronous.run_dir) and steady.evaluations == 10


@pytest.mark.parametrize("kill_after", [1, 5, 9])
@pytest.mark.parametrize("name", ["random", "natural-niches"])
def test_steady_state_killed_at_any_result_resumes_without_loss_or_repeat(
    tmp_path: Path, family: dict, name: str, kill_after: int
) -> None:
    optimizer = {"name": name, "population_size": 4, "start": "best-known"}  # the warm start: 1 evaluation
    config = make_config(
        tmp_path, family, optimizer=optimizer, budget={"max_evaluations": 14}, backend=STEADY
    )
    evaluated: list[Any] = []
    backend = pool(config, seed=kill_after)
    original = backend.backend.function
    backend.backend.function = lambda recipe, seed: evaluated.append(seed) or original(recipe, seed)

    def crash(progress: Progress) -> None:
        if progress.evaluations == kill_after:
            raise DriverKilled

    with pytest.raises(DriverKilled):
        evolve(config, backend=backend, progress=crash)
    before = rows(config.out)
    summary = resume(config.out, backend=backend)
    after = rows(summary.run_dir)
    assert len(after) == 14 and len({row[:2] for row in after}) == 14
    assert all(row in after for row in before)
    # This pool evaluates a candidate when it finishes it: a kill interrupts none, so none runs twice.
    assert len(evaluated) == len(set(evaluated)) == 14


def test_steady_state_needs_a_pool(tmp_path: Path, family: dict) -> None:
    optimizer = {"name": "random", "population_size": 4}
    config = make_config(tmp_path, family, optimizer=optimizer, backend=STEADY)
    with pytest.raises(ConfigError, match="needs a pool of workers"):
        evolve(config, backend=quadratic_backend(config.search_space()))
