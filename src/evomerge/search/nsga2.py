"""`nsga2`: NSGA-II (Deb et al. 2002) through pymoo, for a Pareto front over several objectives.

Each objective is a fitness task's score, the overall `score`, or a behaviour measure the evaluation
reports (`behaviour:<key>`); all are maximised (only this adapter negates them for pymoo, which minimises).
A failed evaluation is infeasible to pymoo (one inequality constraint), so NSGA-II ranks it below every
feasible genome, and it never joins the front. `hypervolume` scores a front for the benchmarks and report.

pymoo draws every random number from `algorithm.random_state`, a numpy Generator it hands to sampling,
selection, crossover, mutation and survival; it is reseeded from the optimiser's own generator before
each ask, so the pickled optimiser alone decides what a restored run asks next.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
from pydantic import Field, field_validator, model_validator

from evomerge.errors import ConfigError
from evomerge.eval.result import EvalResult
from evomerge.search.base import (
    BoxOptimizer,
    Elite,
    OptimizerSettings,
    Seeds,
    check_told,
    finite_or_worst,
    require_extra,
)

BEHAVIOUR_PREFIX = "behaviour:"
BUILTIN_MEASURES = ("sparsity",)  # what the local backend measures when asked (behaviour:sparsity)
SCORE = "score"  # the evaluation's overall (weighted) score, when no fitness task has this name
FRONT = "front 0"


class NSGA2Settings(OptimizerSettings):
    """`nsga2`: NSGA-II over `objectives` (fitness task names, `score`, or `behaviour:<key>`)."""

    name: Literal["nsga2"] = "nsga2"
    objectives: list[str] = Field(default_factory=list, validate_default=True)
    # SBX and polynomial mutation at pymoo's distribution indices: a larger index keeps a child nearer its
    # parents. Each gene mutates with probability min(0.5, 1/dim).
    crossover_eta: float = Field(default=15.0, gt=0)
    crossover_rate: float = Field(default=0.9, ge=0, le=1)
    mutation_eta: float = Field(default=20.0, gt=0)

    @field_validator("objectives")
    @classmethod
    def _at_least_two(cls, value: list[str]) -> list[str]:
        if len(value) < 2 or len(set(value)) != len(value):
            raise ValueError(
                f"nsga2 needs at least 2 distinct objectives, got {value}; list them, e.g. "
                "objectives: [task_a, task_b] (fitness task names, 'score', or behaviour:<key>)"
            )
        if BEHAVIOUR_PREFIX in value:
            raise ValueError(f"'{BEHAVIOUR_PREFIX}' needs a key after the colon (behaviour:<key>)")
        return value

    @model_validator(mode="after")
    def _pymoo_installed(self) -> NSGA2Settings:
        require_extra("pymoo", "'nsga2'")
        return self

    def measures_needed(self) -> tuple[str, ...]:
        """The built-in measures among the `behaviour:<key>` objectives (the backend computes them)."""
        keys = [
            name.removeprefix(BEHAVIOUR_PREFIX)
            for name in self.objectives
            if name.startswith(BEHAVIOUR_PREFIX)
        ]
        return tuple(key for key in keys if key in BUILTIN_MEASURES)

    def check_tasks(self, task_names: Sequence[str]) -> None:
        """Refuse objectives that are neither fitness tasks, `score`, nor `behaviour:<key>`."""
        unknown = [
            name
            for name in self.objectives
            if name not in task_names and name != SCORE and not name.startswith(BEHAVIOUR_PREFIX)
        ]
        if unknown:
            raise ConfigError(
                f"optimizer.objectives: {unknown} name no fitness task (the tasks are {list(task_names)}); "
                f"use a task's name, '{SCORE}', or {BEHAVIOUR_PREFIX}<key> for a measure the evaluation reports."
            )


def objective_values(result: EvalResult, objectives: Sequence[str]) -> np.ndarray:
    """The result's value on each objective (higher is better); NaN throughout for a failed one. (M,)"""
    if not result.ok:
        return np.full(len(objectives), np.nan)
    return np.array([_objective(result, name) for name in objectives], dtype=float)


def _objective(result: EvalResult, name: str) -> float:
    if name in result.tasks:
        return float(result.tasks[name].score)
    if name.startswith(BEHAVIOUR_PREFIX):
        key = name.removeprefix(BEHAVIOUR_PREFIX)
        if key not in result.behaviour:
            raise ConfigError(
                f"optimizer.objectives: {name!r}, but the evaluation reports no behaviour {key!r} "
                f"(it reports {sorted(result.behaviour) or 'none'}); name one it reports."
            )
        return float(result.behaviour[key])
    if name == SCORE:
        return float(result.score)
    raise ConfigError(
        f"optimizer.objectives: {name!r}, but the evaluation has no such task (it has "
        f"{sorted(result.tasks) or 'none'}); name a fitness task, '{SCORE}', or {BEHAVIOUR_PREFIX}<key>."
    )


def dominates(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether `a` Pareto-dominates `b` (maximising): no worse anywhere, better somewhere."""
    return bool(np.all(a >= b) and np.any(a > b))


def hypervolume(points: np.ndarray, reference: np.ndarray) -> float:
    """The volume that `points` dominate above `reference`, maximising every objective.

    points (N, M), reference (M,). Points not strictly above the reference in every objective add
    nothing; the reference is typically the worst acceptable value of each objective.
    """
    points, reference = np.asarray(points, dtype=float), np.asarray(reference, dtype=float)
    if reference.ndim != 1 or points.ndim != 2 or points.shape[1] != reference.shape[0]:
        raise ValueError(
            f"hypervolume: expected points (N, M) and reference (M,), got {points.shape} and "
            f"{reference.shape}; pass one row per point and one reference value per objective."
        )
    inside = points[np.all(np.isfinite(points), axis=1) & np.all(points > reference, axis=1)]
    if len(inside) == 0:
        return 0.0
    require_extra("pymoo", "'nsga2'")
    from pymoo.indicators.hv import HV

    return float(HV(ref_point=-reference)(-inside))  # pymoo measures the volume a minimised front dominates


class NSGA2Optimizer(BoxOptimizer):
    """NSGA-II through pymoo's ask/tell interface, over the box [lower, upper].

    The warm start's seeds (already evaluated) open the first population, which uniform samples fill up
    to `population_size`; only genomes not yet evaluated are asked. `elites()` is the first
    non-dominated front of everything told so far, seeds included (one genome per point of it, the first
    told), each with its objective values as `measures`.
    """

    def __init__(
        self,
        lower: np.ndarray,
        upper: np.ndarray,
        settings: NSGA2Settings,
        *,
        seed: int,
        seeds: Seeds = (),
    ) -> None:
        super().__init__(lower, upper, settings, seed)
        self.objectives = list(settings.objectives)
        self._front: list[Elite] = []
        self._pending: Any = None  # the pymoo Population of the last ask, until it is told
        self._fresh = np.zeros(0, dtype=int)  # which of its individuals were asked (not evaluated yet)
        self._algorithm = self._setup(seeds)

    def elites(self) -> list[Elite]:
        return list(self._front)

    def stats(self) -> dict[str, float]:
        """The front's size and hypervolume above the origin (every built-in metric is in [0, 1])."""
        if not self._front:
            return {}
        points = np.array([[e.measures[name] for name in self.objectives] for e in self._front])  # (F, M)
        return {
            "front_size": float(len(self._front)),
            "hypervolume": hypervolume(points, np.zeros(len(self.objectives))),
        }

    def ask(self) -> np.ndarray:
        # pymoo's generator pickles with it, but reseeding it from ours keeps every random choice in
        # `self.rng`: the optimiser's seed decides them all, and one generator is what a checkpoint records.
        self._algorithm.random_state = np.random.default_rng(int(self.rng.integers(2**63 - 1)))
        self._pending = self._next_infills()
        self._fresh = np.array([i for i, ind in enumerate(self._pending) if not ind.evaluated], dtype=int)
        return np.array(self._pending.get("X")[self._fresh], dtype=float)  # (B, D)

    def tell(self, genomes: np.ndarray, results: Sequence[EvalResult]) -> None:
        if self._pending is None:
            raise ValueError("tell: nothing was asked since the last tell; ask() first.")
        genomes = check_told(genomes, results, len(self._fresh), self.dim)
        self._evaluated(self._pending[self._fresh], results)  # first: it refuses a missing objective
        for genome, result in zip(genomes, results, strict=True):
            self._note(genome, result)
        self._algorithm.tell(infills=self._pending)
        self._pending, self._fresh = None, np.zeros(0, dtype=int)

    # --- pymoo ------------------------------------------------------------------------------------------
    def _setup(self, seeds: Seeds) -> Any:
        require_extra("pymoo", "'nsga2'")
        from pymoo.algorithms.moo.nsga2 import NSGA2
        from pymoo.core.problem import Problem
        from pymoo.core.termination import NoTermination
        from pymoo.operators.crossover.sbx import SBX
        from pymoo.operators.mutation.pm import PM

        # One inequality constraint marks failed evaluations (G > 0: infeasible); the box is pymoo's too.
        problem = Problem(
            n_var=self.dim, n_obj=len(self.objectives), n_ieq_constr=1, xl=self.lower, xu=self.upper
        )
        algorithm = NSGA2(
            pop_size=self.population_size,
            sampling=self._initial_population(seeds),
            crossover=SBX(eta=self.settings.crossover_eta, prob=self.settings.crossover_rate),
            mutation=PM(eta=self.settings.mutation_eta),
            eliminate_duplicates=True,  # never ask a genome the population already holds
            seed=0,  # replaced before every ask (see ask)
        )
        # NSGA2.__init__ sets its own convergence-based termination; the evolve loop's budget decides.
        algorithm.setup(problem, termination=NoTermination())
        return algorithm

    def _initial_population(self, seeds: Seeds) -> Any:
        """The seeds (told, with their values) followed by uniform samples up to `population_size`."""
        from pymoo.core.population import Population

        genomes = [np.asarray(genome, dtype=float) for genome, _ in seeds]
        for genome, (_, result) in zip(genomes, seeds, strict=True):
            self._note(genome, result)
        fill = self.rng.uniform(
            self.lower, self.upper, size=(max(0, self.population_size - len(genomes)), self.dim)
        )
        population = Population.new(X=np.vstack([*genomes, fill]) if genomes else fill)
        if genomes:
            self._evaluated(population[: len(genomes)], [result for _, result in seeds])
        return population

    def _next_infills(self) -> Any:
        """pymoo's next individuals to evaluate (some may be evaluated seeds in the first population)."""
        from pymoo.core.population import Population

        infills = self._algorithm.ask()
        while infills is not None and len(infills) and all(ind.evaluated for ind in infills):
            self._algorithm.tell(infills=infills)  # the seeds alone filled the first population: breed
            infills = self._algorithm.ask()
        if infills is None or len(infills) == 0:
            # Mating found no genome the population does not hold yet (it collapsed onto a few points).
            return Population.new(
                X=self.rng.uniform(self.lower, self.upper, size=(self.population_size, self.dim))
            )
        return infills

    def _evaluated(self, population: Any, results: Sequence[EvalResult]) -> None:
        """Store each result on its pymoo individual: negated objectives (F) and failure (G)."""
        values = np.array([objective_values(r, self.objectives) for r in results])  # (B, M), NaN: failed
        failed = ~np.all(np.isfinite(values), axis=1)
        worst_filled = np.column_stack([finite_or_worst(column) for column in values.T])  # (B, M)
        population.set("F", -worst_filled, "G", np.where(failed, 1.0, -1.0)[:, None])
        for individual in population:
            individual.evaluated.update(("F", "G", "H"))

    # --- the front --------------------------------------------------------------------------------------
    def _note(self, genome: np.ndarray, result: EvalResult) -> None:
        """Add a told genome to the front unless a member is at least as good everywhere (ties keep the
        first told, as SingleObjective does, so a plateau does not flood the front); drop those it dominates."""
        values = objective_values(result, self.objectives)
        if not np.all(np.isfinite(values)):
            return
        members = [np.array([e.measures[name] for name in self.objectives]) for e in self._front]
        if any(np.all(m >= values) for m in members) or any(
            np.array_equal(e.genome, genome) for e in self._front
        ):
            return
        self._front = [e for e, m in zip(self._front, members, strict=True) if not dominates(values, m)]
        measures = dict(zip(self.objectives, values.tolist(), strict=True))
        self._front.append(Elite(np.array(genome, dtype=float), result, FRONT, measures))
