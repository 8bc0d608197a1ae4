"""The ask/tell optimisers: they optimise, pickle mid-run, validate what they are told, and keep elites.

Registry-parametrised where the contract is shared: every registered optimiser must pickle mid-run into
an identical continuation, stay in bounds, be decided by its seed, and rank failed results worst.
"""

from __future__ import annotations

import pickle
from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest

from evomerge.errors import ConfigError
from evomerge.eval.result import EvalResult, TaskScore
from evomerge.search.base import Elite, Optimizer, scores_of
from evomerge.search.optimizers import (
    CMAESOptimizer,
    CMAESSettings,
    RandomSearch,
    RandomSettings,
    load_state,
    save_state,
)
from evomerge.search.registry import make_optimizer, optimizer_entry, optimizer_names, parse_settings

DIM = 5
LOWER, UPPER = np.zeros(DIM), np.ones(DIM)
OPTIMUM = np.array([0.2, 0.7, 0.4, 0.9, 0.3])


# Fields an optimiser needs beyond name and population_size (objectives of a multi-objective one).
CONTRACT_FIELDS: dict[str, dict[str, Any]] = {"nsga2": {"objectives": ["left", "right"]}}


def scored(score: float) -> EvalResult:
    """A result whose two tasks both score `score` (so a multi-objective optimiser ranks like the score)."""
    tasks = {name: TaskScore(name, "toy", float(score)) for name in ("left", "right")}
    return EvalResult(score=float(score), tasks=tasks)


def results(scores: Sequence[float]) -> list[EvalResult]:
    return [scored(s) for s in scores]


def shifted_quadratic(genomes: np.ndarray) -> list[EvalResult]:
    """Higher is better: 0 at OPTIMUM."""
    return results(-np.sum((genomes - OPTIMUM) ** 2, axis=1))


def run(optimizer: Optimizer, generations: int) -> None:
    for _ in range(generations):
        genomes = optimizer.ask()
        optimizer.tell(genomes, shifted_quadratic(genomes))


def settings(name: str, **fields: Any) -> Any:
    return parse_settings({"name": name, **CONTRACT_FIELDS.get(name, {}), **fields})


def best_of(optimizer: Optimizer) -> Elite:
    return max(optimizer.elites(), key=lambda elite: elite.score)


def test_cma_es_solves_a_shifted_quadratic() -> None:
    optimizer = CMAESOptimizer(LOWER, UPPER, CMAESSettings(population_size=8, sigma0=0.3), seed=1)
    run(optimizer, 60)
    best = best_of(optimizer)
    assert best.score > -1e-6
    np.testing.assert_allclose(best.genome, OPTIMUM, atol=1e-3)


def test_random_search_is_worse_than_cma_at_the_same_budget() -> None:
    cma = CMAESOptimizer(LOWER, UPPER, CMAESSettings(population_size=8, sigma0=0.3), seed=1)
    rand = RandomSearch(LOWER, UPPER, RandomSettings(population_size=8), seed=1)
    run(cma, 30)
    run(rand, 30)
    assert best_of(cma).score > best_of(rand).score


@pytest.mark.parametrize("name", optimizer_names())
def test_pickled_mid_run_continues_identically(name: str) -> None:
    optimizer = make_optimizer(settings(name, population_size=6), LOWER, UPPER, seed=3)
    run(optimizer, 5)
    copy = load_state(save_state(optimizer))
    for _ in range(4):
        a, b = optimizer.ask(), copy.ask()
        np.testing.assert_array_equal(a, b)
        optimizer.tell(a, shifted_quadratic(a))
        copy.tell(b, shifted_quadratic(b))
    assert [e.genome.tolist() for e in optimizer.elites()] == [e.genome.tolist() for e in copy.elites()]


@pytest.mark.parametrize("name", optimizer_names())
def test_asks_stay_in_bounds_and_seed_decides(name: str) -> None:
    lower, upper = np.full(DIM, -2.0), np.full(DIM, 3.0)
    first = make_optimizer(settings(name, population_size=10), lower, upper, seed=7)
    second = make_optimizer(settings(name, population_size=10), lower, upper, seed=7)
    other = make_optimizer(settings(name, population_size=10), lower, upper, seed=8)
    genomes = first.ask()
    assert genomes.shape == (10, DIM)
    assert np.all(genomes >= lower) and np.all(genomes <= upper)
    np.testing.assert_array_equal(genomes, second.ask())
    assert not np.array_equal(genomes, other.ask())


@pytest.mark.parametrize("name", optimizer_names())
def test_failed_results_rank_worst_and_never_become_elites(name: str) -> None:
    optimizer = make_optimizer(settings(name, population_size=4), LOWER, UPPER, seed=0)
    genomes = optimizer.ask()
    told = [EvalResult.failed("boom"), scored(0.5), EvalResult(float("-inf")), scored(0.1)]
    optimizer.tell(genomes, told)
    best = best_of(optimizer)
    assert best.score == 0.5
    np.testing.assert_array_equal(best.genome, genomes[1])


def test_scores_of_marks_failures_nan() -> None:
    scores = scores_of([EvalResult(0.3), EvalResult.failed("x", score=0.9)])
    assert scores[0] == 0.3 and np.isnan(scores[1])


def test_tell_rejects_a_partial_generation() -> None:
    optimizer = RandomSearch(LOWER, UPPER, RandomSettings(population_size=4), seed=0)
    genomes = optimizer.ask()
    with pytest.raises(ValueError, match="expected genomes"):
        optimizer.tell(genomes[:3], results([0, 0, 0]))


def test_seeds_set_the_start_and_count_as_elites() -> None:
    seed_genome = np.full(DIM, 0.9)
    seeds = [(np.full(DIM, 0.1), EvalResult(0.2)), (seed_genome, EvalResult(0.7))]
    optimizer = CMAESOptimizer(LOWER, UPPER, CMAESSettings(sigma0=1e-6), seed=0, seeds=seeds)
    np.testing.assert_allclose(
        optimizer.ask().mean(axis=0), seed_genome, atol=1e-4
    )  # starts at the best seed
    assert best_of(optimizer).score == 0.7


@pytest.mark.parametrize("restarts", ["ipop", "bipop"])
def test_a_plateau_triggers_a_restart(restarts: str) -> None:
    config = CMAESSettings(population_size=4, sigma0=0.3, restarts=restarts, flat_generations=3)  # type: ignore[arg-type]
    optimizer = CMAESOptimizer(LOWER, UPPER, config, seed=0)
    for _ in range(3):  # the first sets the run's best, two more find exactly it again
        genomes = optimizer.ask()
        optimizer.tell(genomes, results(np.zeros(len(genomes))))
        assert optimizer.restarts_done == 0
    genomes = optimizer.ask()
    optimizer.tell(genomes, results(np.zeros(len(genomes))))  # the third generation on the plateau
    assert optimizer.restarts_done == 1 and optimizer.population_size == 8  # the first restart is large


def test_noise_without_a_new_best_restarts_only_after_the_stagnation_window() -> None:
    config = CMAESSettings(population_size=4, flat_generations=1, stagnation_generations=5)
    optimizer = CMAESOptimizer(LOWER, UPPER, config, seed=0)
    draws = np.random.default_rng(0)
    genomes = optimizer.ask()
    optimizer.tell(genomes, results([0.9, 0.1, 0.2, 0.3]))  # the run's best: 0.9
    for _ in range(4):  # scores that vary (not a plateau) but never beat 0.9
        genomes = optimizer.ask()
        optimizer.tell(genomes, results(draws.uniform(0.0, 0.8, size=len(genomes))))
        assert optimizer.restarts_done == 0
    genomes = optimizer.ask()
    optimizer.tell(genomes, results(draws.uniform(0.0, 0.8, size=len(genomes))))
    assert optimizer.restarts_done == 1


def test_bipop_alternates_with_small_populations() -> None:
    config = CMAESSettings(population_size=4, sigma0=0.3, restarts="bipop", flat_generations=2)
    optimizer = CMAESOptimizer(LOWER, UPPER, config, seed=0)
    sizes = []
    for _ in range(40):
        genomes = optimizer.ask()
        sizes.append(len(genomes))
        optimizer.tell(genomes, results(np.zeros(len(genomes))))
    assert max(sizes) >= 16 and optimizer.spent["small"] > 0
    assert optimizer.spent["small"] <= optimizer.spent["large"] + max(sizes)  # the budgets stay balanced


def test_no_restarts_when_asked_for_none() -> None:
    settings_ = CMAESSettings(restarts="none", stagnation_generations=1, flat_generations=1)
    optimizer = CMAESOptimizer(LOWER, UPPER, settings_, seed=0)
    for _ in range(5):
        genomes = optimizer.ask()
        optimizer.tell(genomes, results(np.zeros(len(genomes))))
    assert optimizer.restarts_done == 0


def test_restarts_escape_a_plateau_that_stalls_a_single_run() -> None:
    """A plateau around the start with a narrow peak elsewhere: one run with a small step never leaves it."""
    lower, upper, peak = np.zeros(2), np.ones(2), np.array([0.8, 0.75])

    def landscape(genomes: np.ndarray) -> list[EvalResult]:
        distance = np.linalg.norm(genomes - peak, axis=1)
        return results(np.where(distance < 0.3, 1.0 - distance, 0.0))

    def search(restarts: str) -> float:
        config = CMAESSettings(
            population_size=6,
            sigma0=0.02,
            restarts=restarts,
            stagnation_generations=3,
            restart_from="random",  # type: ignore[arg-type]
        )
        optimizer = CMAESOptimizer(lower, upper, config, seed=0, seeds=[(np.full(2, 0.1), EvalResult(0.0))])
        spent = 0
        while spent < 600:
            genomes = optimizer.ask()
            optimizer.tell(genomes, landscape(genomes))
            spent += len(genomes)
        return best_of(optimizer).score

    assert search("none") == 0.0
    assert search("ipop") > 0.9


def test_registry_names_and_errors() -> None:
    assert {"cma-es", "random"} <= set(optimizer_names())
    with pytest.raises(ConfigError, match=r"unknown optimizer 'nsga3'.*cma-es"):
        optimizer_entry("nsga3")
    with pytest.raises(ConfigError, match=r"optimizer\.sigma0"):
        parse_settings({"name": "cma-es", "sigma0": 0.0})
    with pytest.raises(ConfigError, match=r"optimizer\.population_size.*greater than or equal to 4"):
        parse_settings({"name": "cma-es", "population_size": 3})
    with pytest.raises(ConfigError, match=r"'random' has no setting 'sigma0'; it is a setting of cma-es"):
        parse_settings({"name": "random", "sigma0": 0.3})


def test_settings_pickle_with_the_optimiser() -> None:
    optimizer = make_optimizer(settings("cma-es"), LOWER, UPPER, seed=0)
    restored = pickle.loads(pickle.dumps(optimizer))
    assert restored.settings == optimizer.settings  # type: ignore[attr-defined]


def test_a_restart_starts_from_the_best_so_far_when_asked() -> None:
    incumbent = np.array([0.9, 0.1, 0.5, 0.3, 0.7])
    config = CMAESSettings(population_size=4, sigma0=1e-6, flat_generations=1, restart_from="best")
    optimizer = CMAESOptimizer(LOWER, UPPER, config, seed=0, seeds=[(incumbent, EvalResult(1.0))])
    for _ in range(2):
        genomes = optimizer.ask()
        optimizer.tell(genomes, results(np.zeros(len(genomes))))  # nothing beats the seed
    assert optimizer.restarts_done >= 1
    np.testing.assert_allclose(optimizer.ask().mean(axis=0), incumbent, atol=1e-4)
    random_config = config.model_copy(update={"restart_from": "random"})
    other = CMAESOptimizer(LOWER, UPPER, random_config, seed=0, seeds=[(incumbent, EvalResult(1.0))])
    for _ in range(2):
        genomes = other.ask()
        other.tell(genomes, results(np.zeros(len(genomes))))
    assert np.abs(other.ask().mean(axis=0) - incumbent).max() > 0.01


def test_a_checkpoint_records_library_versions_and_warns_when_they_changed(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import evomerge.search.optimizers as optimizers

    optimizer = make_optimizer(settings("cma-es", population_size=6), LOWER, UPPER, seed=3)
    blob = save_state(optimizer)
    saved = pickle.loads(blob)
    assert saved["libraries"]["numpy"] == np.__version__
    with caplog.at_level("WARNING"):
        load_state(save_state(optimizer))
    assert not caplog.records  # same versions: silent
    monkeypatch.setattr(optimizers, "library_versions", lambda: {**saved["libraries"], "numpy": "0.0.1"})
    with caplog.at_level("WARNING"):
        copy = load_state(blob, "run.sqlite's checkpoint")
    assert isinstance(copy, type(optimizer))
    message = caplog.records[-1].getMessage()
    assert "run.sqlite's checkpoint" in message and "numpy" in message and "0.0.1" in message


def test_a_checkpoint_from_before_versions_were_recorded_still_loads() -> None:
    optimizer = make_optimizer(settings("cma-es", population_size=6), LOWER, UPPER, seed=3)
    old = pickle.dumps(optimizer)  # what save_state wrote before
    np.testing.assert_array_equal(load_state(old).ask(), optimizer.ask())


def test_a_checkpoint_that_no_longer_unpickles_names_the_libraries() -> None:
    blob = pickle.dumps(Unpicklable())  # loading it fails as a pickle of a renamed pymoo class would
    with pytest.raises(ConfigError, match=r"run\.sqlite's checkpoint cannot be restored.*numpy"):
        load_state(blob, "run.sqlite's checkpoint")


class Unpicklable:
    def __reduce__(self) -> tuple[object, tuple[()]]:
        return (_gone, ())


def _gone() -> None:
    raise AttributeError("module 'pymoo.core' has no attribute 'Gone'")
