"""`ga`: a plain real-coded genetic algorithm, the baseline that natural niches (M2N2) is measured against.

One generation: tournament selection, crossover (BLX-alpha or uniform), Gaussian mutation clipped to the
box; the next population is the `elitism` best of the current one plus the best of the offspring. All
state, random generator included, lives in one picklable object, so a restored checkpoint asks exactly
the genomes the original would have asked.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
from pydantic import Field, ValidationInfo, field_validator

from evomerge.eval.result import EvalResult
from evomerge.search.base import OptimizerSettings, Seeds, SingleObjective, finite_or_worst, scores_of


class GASettings(OptimizerSettings):
    """`ga`: a generational, elitist real-coded GA (see GAOptimizer)."""

    name: Literal["ga"] = "ga"
    tournament_size: int = Field(default=2, ge=2)  # binary tournaments: mild pressure, keeps diversity
    crossover: Literal["blend", "uniform"] = "blend"
    # BLX-alpha (Eshelman & Schaffer 1993) at the usual alpha 0.5: a child may land as far outside its
    # parents as between them, so crossover alone does not shrink the population's spread.
    blend_alpha: float = Field(default=0.5, ge=0)
    crossover_rate: float = Field(default=0.9, ge=0, le=1)
    mutation_sigma: float = Field(default=0.1, gt=0)  # step size in gene units (genes live in [0, 1])
    mutation_rate: float | None = Field(default=None, ge=0, le=1)  # per gene; None: 1/dim
    elitism: int = Field(default=1, ge=0)  # best parents carried into the next population unchanged

    @field_validator("elitism")
    @classmethod
    def _elitism_below_population(cls, value: int, info: ValidationInfo) -> int:
        population = info.data.get("population_size")
        if population is not None and value >= population:
            raise ValueError(
                f"{value} must be below population_size {population} (otherwise no offspring ever "
                "enters the population); lower elitism or raise population_size."
            )
        return value


class GAOptimizer(SingleObjective):
    """A generational real-coded GA with elitism over the box [lower, upper].

    The warm start's seeds (already evaluated) open the first population; the first ask fills it up to
    `population_size` with uniform samples (nothing when the seeds alone fill it). Each later ask breeds
    `population_size` offspring; after they are told, the population becomes the `elitism` best parents
    plus the best `population_size - elitism` offspring. Failed results rank below every finite one.
    """

    def __init__(
        self, lower: np.ndarray, upper: np.ndarray, settings: GASettings, *, seed: int, seeds: Seeds = ()
    ) -> None:
        super().__init__(lower, upper, settings, seed)
        self.mutation_rate = settings.mutation_rate if settings.mutation_rate is not None else 1 / self.dim
        self.genomes = np.zeros((0, self.dim))  # the current population, (P, D)
        self.scores = np.zeros(0)  # their scores, NaN where the evaluation failed, (P,)
        self.filled = False  # whether the first population is complete (then asks breed)
        self._asked = 0
        for genome, result in seeds:
            self._track(np.asarray(genome, float)[None, :], [result])
            self.genomes = np.vstack([self.genomes, np.asarray(genome, float)[None, :]])
            self.scores = np.append(self.scores, scores_of([result]))
        self.filled = len(self.scores) >= self.population_size

    def ask(self) -> np.ndarray:
        if not self.filled:
            missing = self.population_size - len(self.scores)
            genomes = self.rng.uniform(self.lower, self.upper, size=(missing, self.dim))  # (B, D)
        else:
            genomes = self._breed(self.population_size)
        self._asked = len(genomes)
        return genomes

    def tell(self, genomes: np.ndarray, results: Sequence[EvalResult]) -> None:
        genomes = self._check_told(genomes, results, self._asked)
        self._track(genomes, results)
        scores = scores_of(results)
        if not self.filled:
            self.genomes = np.vstack([self.genomes, genomes])
            self.scores = np.concatenate([self.scores, scores])
            self.filled = True
            return
        self._replace(genomes, scores)

    # --- one generation ---------------------------------------------------------------------------------
    def _breed(self, count: int) -> np.ndarray:
        """`count` children: pairs of tournament winners, crossed over, then mutated. (count, D)"""
        pairs = (count + 1) // 2
        mothers, fathers = self._select(pairs), self._select(pairs)  # each (pairs, D)
        crossed = self.rng.uniform(size=pairs) < self.settings.crossover_rate
        first, second = self._crossover(mothers, fathers)
        first = np.where(crossed[:, None], first, mothers)
        second = np.where(crossed[:, None], second, fathers)
        children = np.concatenate([first, second])[:count]  # (count, D)
        return self._mutate(children)

    def _select(self, count: int) -> np.ndarray:
        """Winners of `count` tournaments of `tournament_size` entrants drawn with replacement. (count, D)"""
        ranking = finite_or_worst(self.scores)
        entrants = self.rng.integers(len(ranking), size=(count, self.settings.tournament_size))
        winners = entrants[np.arange(count), np.argmax(ranking[entrants], axis=1)]
        return self.genomes[winners]

    def _crossover(self, a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if self.settings.crossover == "uniform":
            take_a = self.rng.uniform(size=a.shape) < 0.5
            return np.where(take_a, a, b), np.where(take_a, b, a)
        # BLX-alpha: each gene uniform in [min - alpha d, max + alpha d], d = |a - b|.
        low, high = np.minimum(a, b), np.maximum(a, b)
        reach = self.settings.blend_alpha * (high - low)
        children = self.rng.uniform(low - reach, high + reach, size=(2, *a.shape))
        return np.clip(children[0], self.lower, self.upper), np.clip(children[1], self.lower, self.upper)

    def _mutate(self, children: np.ndarray) -> np.ndarray:
        mutated = self.rng.uniform(size=children.shape) < self.mutation_rate
        steps = self.rng.normal(0.0, self.settings.mutation_sigma, size=children.shape)
        return np.clip(children + mutated * steps, self.lower, self.upper)

    def _replace(self, offspring: np.ndarray, scores: np.ndarray) -> None:
        """The `elitism` best parents plus the best offspring, `population_size` in all."""
        keep = self.settings.elitism
        parents = np.argsort(-finite_or_worst(self.scores), kind="stable")[:keep]
        children = np.argsort(-finite_or_worst(scores), kind="stable")[: self.population_size - keep]
        self.genomes = np.vstack([self.genomes[parents], offspring[children]])
        self.scores = np.concatenate([self.scores[parents], scores[children]])
