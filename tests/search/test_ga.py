"""The real-coded GA: it solves a toy problem, beats random search, starts from the seeds, keeps its elites."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest

from evomerge.errors import ConfigError
from evomerge.eval.result import EvalResult
from evomerge.search.base import Optimizer
from evomerge.search.ga import GAOptimizer, GASettings
from evomerge.search.optimizers import RandomSearch, RandomSettings
from evomerge.search.registry import parse_settings

DIM = 5
LOWER, UPPER = np.zeros(DIM), np.ones(DIM)
OPTIMUM = np.array([0.2, 0.7, 0.4, 0.9, 0.3])


def results(scores: Sequence[float]) -> list[EvalResult]:
    return [EvalResult(score=float(s)) for s in scores]


def sphere(genomes: np.ndarray) -> list[EvalResult]:
    """Higher is better: 0 at OPTIMUM, minus the squared distance elsewhere."""
    return results(-np.sum((genomes - OPTIMUM) ** 2, axis=1))


def run(optimizer: Optimizer, generations: int) -> float:
    for _ in range(generations):
        genomes = optimizer.ask()
        optimizer.tell(genomes, sphere(genomes))
    return max(elite.score for elite in optimizer.elites())


@pytest.mark.parametrize("crossover", ["blend", "uniform"])
def test_ga_solves_a_shifted_sphere(crossover: str) -> None:
    settings = GASettings(population_size=16, crossover=crossover)  # type: ignore[arg-type]
    optimizer = GAOptimizer(LOWER, UPPER, settings, seed=0)
    assert run(optimizer, 30) > -1e-3  # 480 evaluations
    np.testing.assert_allclose(optimizer.elites()[0].genome, OPTIMUM, atol=0.05)


@pytest.mark.parametrize("seed", range(5))
def test_ga_beats_random_search_at_the_same_budget(seed: int) -> None:
    ga = GAOptimizer(LOWER, UPPER, GASettings(population_size=8), seed=seed)
    rand = RandomSearch(LOWER, UPPER, RandomSettings(population_size=8), seed=seed)
    assert run(ga, 20) > run(rand, 20)


def test_seeds_open_the_first_population_and_are_not_asked_again() -> None:
    seeds = [(np.full(DIM, 0.3), EvalResult(0.2)), (np.full(DIM, 0.6), EvalResult(0.7))]
    optimizer = GAOptimizer(LOWER, UPPER, GASettings(population_size=6), seed=0, seeds=seeds)
    assert optimizer.elites()[0].score == 0.7  # told seeds count as elites
    fill = optimizer.ask()
    assert fill.shape == (4, DIM)  # only the uniform rest of the first population is evaluated
    optimizer.tell(fill, results([0.0] * 4))
    np.testing.assert_array_equal(optimizer.genomes[:2], [seed for seed, _ in seeds])
    assert optimizer.ask().shape == (6, DIM)  # from now on, whole generations of offspring


def test_seeds_that_fill_the_population_are_bred_at_once() -> None:
    seeds = [(np.full(DIM, 0.8) + 0.01 * i, EvalResult(0.1 * i)) for i in range(5)]
    settings = GASettings(population_size=4, mutation_sigma=1e-3)
    genomes = GAOptimizer(LOWER, UPPER, settings, seed=0, seeds=seeds).ask()
    assert genomes.shape == (4, DIM)
    assert np.all(np.abs(genomes - 0.82) < 0.05)  # children of the seeds, not uniform samples


@pytest.mark.parametrize("elitism", [0, 1])
def test_elitism_carries_the_best_parent_past_failed_offspring(elitism: int) -> None:
    optimizer = GAOptimizer(LOWER, UPPER, GASettings(population_size=4, elitism=elitism), seed=0)
    first = optimizer.ask()
    optimizer.tell(first, results([0.1, 0.9, 0.3, 0.2]))
    offspring = optimizer.ask()
    optimizer.tell(offspring, [EvalResult.failed("boom")] * 4)
    kept = any(np.array_equal(genome, first[1]) for genome in optimizer.genomes)
    assert kept == (elitism == 1)
    np.testing.assert_array_equal(optimizer.elites()[0].genome, first[1])  # the run's best stays its best


def test_uniform_crossover_children_take_each_gene_from_a_parent() -> None:
    parents = [(np.zeros(DIM), EvalResult(0.5)), (np.ones(DIM), EvalResult(0.5))]
    settings = GASettings(
        population_size=2, elitism=0, crossover="uniform", crossover_rate=1.0, mutation_rate=0
    )
    children = np.vstack(
        [GAOptimizer(LOWER, UPPER, settings, seed=s, seeds=parents).ask() for s in range(10)]
    )
    assert set(np.unique(children)) <= {0.0, 1.0}
    assert np.any((children.sum(axis=1) > 0) & (children.sum(axis=1) < DIM))  # some mix both parents


def test_blend_crossover_samples_around_the_parents() -> None:
    low, high = np.full(DIM, 0.4), np.full(DIM, 0.6)
    parents = [(low, EvalResult(0.5)), (high, EvalResult(0.5))]
    settings = GASettings(population_size=2, elitism=0, crossover_rate=1.0, mutation_rate=0, blend_alpha=0.5)
    children = np.vstack(
        [GAOptimizer(LOWER, UPPER, settings, seed=s, seeds=parents).ask() for s in range(20)]
    )
    assert np.all(children >= 0.3) and np.all(children <= 0.7)  # [min - alpha d, max + alpha d]
    assert children.min() < 0.4 and children.max() > 0.6  # and beyond the parents


def test_ga_settings_are_validated_with_located_messages() -> None:
    with pytest.raises(ConfigError, match=r"optimizer\.elitism: 4 must be below population_size 4"):
        parse_settings({"name": "ga", "population_size": 4, "elitism": 4})
    with pytest.raises(ConfigError, match=r"optimizer\.tournament_size"):
        parse_settings({"name": "ga", "tournament_size": 1})
    with pytest.raises(ConfigError, match=r"optimizer\.crossover"):
        parse_settings({"name": "ga", "crossover": "sbx"})
    settings = parse_settings({"name": "ga"})
    assert isinstance(settings, GASettings) and settings.crossover == "blend"


def test_tell_rejects_what_was_not_asked() -> None:
    optimizer = GAOptimizer(LOWER, UPPER, GASettings(population_size=4), seed=0)
    genomes = optimizer.ask()
    with pytest.raises(ValueError, match="expected genomes"):
        optimizer.tell(genomes[:3], results([0, 0, 0]))
