"""The ask/tell optimisers: they optimise, they pickle mid-run, they validate what they are told."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from evomerge.errors import ConfigError
from evomerge.search.optimizers import (
    CMAESOptimizer,
    OptimizerSettings,
    RandomSearch,
    get_optimizer,
    load_state,
    make_optimizer,
    optimizer_names,
    save_state,
)

DIM = 5
LOWER, UPPER = np.zeros(DIM), np.ones(DIM)
OPTIMUM = np.array([0.2, 0.7, 0.4, 0.9, 0.3])


def shifted_quadratic(genomes: np.ndarray) -> np.ndarray:
    """Higher is better: 0 at OPTIMUM."""
    return -np.sum((genomes - OPTIMUM) ** 2, axis=1)


def run(optimizer, generations: int) -> None:  # type: ignore[no-untyped-def]
    for _ in range(generations):
        genomes = optimizer.ask()
        optimizer.tell(genomes, shifted_quadratic(genomes))


def test_cma_es_solves_a_shifted_quadratic() -> None:
    optimizer = CMAESOptimizer(LOWER, UPPER, OptimizerSettings(population_size=8, sigma0=0.3, seed=1))
    run(optimizer, 60)
    genome, score = optimizer.best  # type: ignore[misc]
    assert score > -1e-6
    np.testing.assert_allclose(genome, OPTIMUM, atol=1e-3)


def test_random_search_is_worse_than_cma_at_the_same_budget() -> None:
    settings = OptimizerSettings(population_size=8, sigma0=0.3, seed=1)
    cma, rand = CMAESOptimizer(LOWER, UPPER, settings), RandomSearch(LOWER, UPPER, settings)
    run(cma, 30)
    run(rand, 30)
    assert cma.best[1] > rand.best[1]  # type: ignore[index]


@pytest.mark.parametrize("name", ["cma-es", "random"])
def test_pickled_mid_run_continues_identically(name: str) -> None:
    optimizer = make_optimizer(OptimizerSettings(name=name, population_size=6, seed=3), LOWER, UPPER)
    run(optimizer, 5)
    copy = load_state(save_state(optimizer))
    for _ in range(4):
        a, b = optimizer.ask(), copy.ask()
        np.testing.assert_array_equal(a, b)
        optimizer.tell(a, shifted_quadratic(a))
        copy.tell(b, shifted_quadratic(b))
    assert pickle.dumps(optimizer.best) == pickle.dumps(copy.best)


@pytest.mark.parametrize("name", ["cma-es", "random"])
def test_asks_stay_in_bounds_and_seed_decides(name: str) -> None:
    lower, upper = np.full(DIM, -2.0), np.full(DIM, 3.0)
    first = make_optimizer(OptimizerSettings(name=name, population_size=10, sigma0=2.0, seed=7), lower, upper)
    second = make_optimizer(
        OptimizerSettings(name=name, population_size=10, sigma0=2.0, seed=7), lower, upper
    )
    other = make_optimizer(OptimizerSettings(name=name, population_size=10, sigma0=2.0, seed=8), lower, upper)
    genomes = first.ask()
    assert genomes.shape == (10, DIM)
    assert np.all(genomes >= lower) and np.all(genomes <= upper)
    np.testing.assert_array_equal(genomes, second.ask())
    assert not np.array_equal(genomes, other.ask())


def test_nan_scores_rank_worst_and_never_become_best() -> None:
    optimizer = CMAESOptimizer(LOWER, UPPER, OptimizerSettings(population_size=4, seed=0))
    genomes = optimizer.ask()
    optimizer.tell(genomes, np.array([np.nan, 0.5, -np.inf, 0.1]))
    assert optimizer.best is not None and optimizer.best[1] == 0.5
    np.testing.assert_array_equal(optimizer.best[0], genomes[1])


def test_tell_rejects_a_partial_generation() -> None:
    optimizer = RandomSearch(LOWER, UPPER, OptimizerSettings(population_size=4))
    genomes = optimizer.ask()
    with pytest.raises(ValueError, match="expected genomes"):
        optimizer.tell(genomes[:3], np.zeros(3))


def test_ipop_restart_doubles_the_population() -> None:
    optimizer = CMAESOptimizer(
        LOWER, UPPER, OptimizerSettings(population_size=4, sigma0=0.3, restarts="ipop")
    )
    for _ in range(400):
        genomes = optimizer.ask()
        optimizer.tell(genomes, np.zeros(len(genomes)))  # a flat landscape converges (stalls) quickly
        if optimizer.restarts_done:
            break
    assert optimizer.restarts_done == 1 and optimizer.population_size == 8
    assert optimizer.ask().shape == (8, DIM)


def test_registry_names_and_errors() -> None:
    assert {"cma-es", "random"} <= set(optimizer_names())
    with pytest.raises(ConfigError, match=r"unknown optimizer 'nsga3'.*cma-es"):
        get_optimizer("nsga3")
    with pytest.raises(ConfigError, match="sigma0"):
        CMAESOptimizer(LOWER, UPPER, OptimizerSettings(sigma0=0.0))
    with pytest.raises(ConfigError, match="population_size"):
        CMAESOptimizer(LOWER, UPPER, OptimizerSettings(population_size=3))
