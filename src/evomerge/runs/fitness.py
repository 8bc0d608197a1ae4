"""Fewer example evaluations per candidate: racing and a representative subset, as a layer over any backend.

`FitnessLayer` wraps a Backend whose evaluator can score a subset of the dev examples
(`select_examples(selection)`, see backends.local) and hands the loop EvalResults as usual; the loop,
the optimisers and the other backends do not change.

- **Pool**: the examples fitness is scored on, each with its weight in the score. The whole dev set (each
  task's examples weighted equally, the tasks by their `weight`), or, with `subset`, k anchor examples
  chosen once from the per-example scores of the first evaluations (the warm start and the first
  generation by default), each weighted by the share of its task's examples it stands for. The anchors
  follow tinyBenchmarks' anchor points (Polo et al. 2024): cluster the examples by the scores the
  calibration models got on them (k-means), keep the example nearest each centre, weight it by its
  cluster's size.
- **Racing**: the pool is scored in slices of a fixed, seeded order (every candidate sees the same
  examples, so their estimates compare fairly). After each slice, a candidate stops when even the upper
  confidence bound of its score is below the `against` quantile (the median by default) of the last
  `window` scores the run stored. The bound is Hoeffding's for sampling without replacement (Serfling
  1974): per-example scores lie in [0, 1], and the score is a weighted mean c.s of n of the N pool
  examples, so P(full score - estimate >= t) <= exp(-2 t^2 / (rho sum c_i^2)), rho = 1 - (n - 1) / N.
  Hence a candidate whose full score reaches the threshold is stopped with probability at most
  (1 - confidence) per slice, (1 - confidence) * (slices - 1) over a race (tests/runs/test_fitness.py
  checks this on a synthetic landscape). A stopped candidate's result is the estimate on the examples
  it was scored on: `tasks[name].per_example` with `tasks[name].examples` (the indices) and
  `cost["examples"]`, so the store keeps every per-example score and a report can say what each score is.

Resume stays exact: the threshold is read from the run store (the scores committed before the batch) and
the subset from the store's first evaluations, both of which a resumed run finds unchanged. (A backend
that evaluates batches of several candidates and is killed half-way through committing one sees a
different history for the rest of that batch on resume; the local backend evaluates one at a time.)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from evomerge.errors import ConfigError
from evomerge.eval.result import EvalResult, TaskScore
from evomerge.eval.tasks import Task

Selection = dict[str, list[int]]  # task name -> example indices into its (limited) dev examples


@dataclass(frozen=True)
class Pool:
    """Per task, the example indices fitness scores and their weights; all weights together sum to 1."""

    indices: dict[str, np.ndarray]  # task -> (n_t,) int
    weights: dict[str, np.ndarray]  # task -> (n_t,) float

    @property
    def size(self) -> int:
        return sum(len(i) for i in self.indices.values())


def full_pool(tasks: Sequence[Task]) -> Pool:
    """Every example of every task, a task's examples weighted equally, the tasks by `weight`."""
    total = sum(task.weight for task in tasks)
    indices = {t.name: np.arange(len(t.examples)) for t in tasks}
    weights = {t.name: np.full(len(t.examples), t.weight / total / max(1, len(t.examples))) for t in tasks}
    return Pool(indices, weights)


def anchor_pool(tasks: Sequence[Task], scores: Sequence[EvalResult], size: int, seed: int) -> Pool:
    """`size` anchor examples (split over the tasks by their number of examples, at least one each)
    chosen from the per-example `scores` of whole-dev evaluations; see the module doc."""
    full = full_pool(tasks)
    counts = _split(size, [len(t.examples) for t in tasks])
    indices, weights = {}, {}
    for task, k in zip(tasks, counts, strict=True):
        matrix = _score_matrix(task, scores)  # (n_t, models)
        chosen, shares = _anchors(matrix, k, seed)
        indices[task.name] = chosen
        weights[task.name] = shares * full.weights[task.name].sum()
    return Pool(indices, weights)


def _split(size: int, lengths: list[int]) -> list[int]:
    total = sum(lengths)
    return [min(n, max(1, round(size * n / total))) for n in lengths]


def _score_matrix(task: Task, results: Sequence[EvalResult]) -> np.ndarray:
    columns = [
        r.tasks[task.name].per_example
        for r in results
        if r.ok and task.name in r.tasks and r.tasks[task.name].examples is None
    ]
    if len(columns) < 2:
        raise ConfigError(
            f"subset: only {len(columns)} whole-dev evaluation(s) of task {task.name!r} to choose its "
            "subset from; raise subset.calibration (at least 2 successful evaluations are needed)"
        )
    return np.asarray(columns, dtype=np.float64).T  # (n_t, models)


def _anchors(matrix: np.ndarray, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(indices, shares): the example nearest each k-means centre and its cluster's share of examples."""
    from sklearn.cluster import KMeans

    k = min(k, len(np.unique(matrix, axis=0)))  # no more clusters than distinct score patterns
    labels = KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(matrix)
    chosen, shares = [], []
    for cluster in range(k):
        members = np.flatnonzero(labels == cluster)
        centre = matrix[members].mean(axis=0)
        chosen.append(members[np.argmin(((matrix[members] - centre) ** 2).sum(axis=1))])
        shares.append(len(members) / len(matrix))
    order = np.argsort(chosen)
    return np.asarray(chosen)[order], np.asarray(shares)[order]


# --- racing ---------------------------------------------------------------------------------------------
def slice_selections(pool: Pool, fractions: Sequence[float], seed: int) -> list[Selection]:
    """The examples each slice adds, per task: the pool in a seeded order, cut at each fraction."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, 14]))
    orders = {name: rng.permutation(indices) for name, indices in pool.indices.items()}
    selections, done = [], dict.fromkeys(orders, 0)
    for fraction in fractions:
        selection = {}
        for name, order in orders.items():
            upto = max(1, math.ceil(fraction * len(order)))
            selection[name] = [int(i) for i in order[done[name] : upto]]
            done[name] = max(done[name], upto)
        selections.append(selection)
    return selections


class Race:
    """One candidate's per-example scores so far, its estimate and its upper confidence bound."""

    def __init__(self, pool: Pool, task_weights: dict[str, float]) -> None:
        self.pool = pool
        self.task_weights = task_weights  # task -> weight of the task in the score (sums to 1)
        self.weight_of = {
            name: dict(zip(pool.indices[name].tolist(), pool.weights[name].tolist(), strict=True))
            for name in pool.indices
        }
        self.scores: dict[str, dict[int, float]] = {name: {} for name in pool.indices}

    def add(self, selection: Selection, result: EvalResult) -> None:
        for name, indices in selection.items():
            if indices:
                per_example = result.tasks[name].per_example
                self.scores[name].update(zip(indices, per_example, strict=True))

    def _coefficients(self) -> tuple[list[float], list[float]]:
        """(c_i, s_i) over the scored examples: the score is sum c_i s_i (the evaluator's weighted mean
        of task means, each task mean weighted by the pool's example weights)."""
        scored = {name: s for name, s in self.scores.items() if s}
        total = sum(self.task_weights[name] for name in scored)
        coefficients, values = [], []
        for name, scores in scored.items():
            weights = self.weight_of[name]
            mass = sum(weights[i] for i in scores)
            for i, value in scores.items():
                coefficients.append(self.task_weights[name] / total * weights[i] / mass)
                values.append(value)
        return coefficients, values

    def estimate(self) -> float:
        coefficients, values = self._coefficients()
        return float(np.dot(coefficients, values))

    def upper_bound(self, confidence: float) -> float:
        coefficients, _ = self._coefficients()
        n, size = len(coefficients), self.pool.size
        rho = 1.0 - (n - 1) / size  # Serfling's finite-population factor
        width = math.sqrt(math.log(1 / (1 - confidence)) / 2 * rho * float(np.sum(np.square(coefficients))))
        return self.estimate() + width

    def task_score(self, task: Task) -> TaskScore:
        from evomerge.eval.evaluator import group_means

        scores = self.scores[task.name]
        indices = sorted(scores)
        per_example = [scores[i] for i in indices]
        weights = self.weight_of[task.name]
        mass = sum(weights[i] for i in indices)
        mean = sum(weights[i] * scores[i] for i in indices) / mass
        groups = group_means(per_example, [task.examples[i].group for i in indices])
        return TaskScore(task.name, task.metric, mean, per_example, len(indices), groups, indices)


# --- the layer ------------------------------------------------------------------------------------------
class FitnessLayer:
    """A Backend that scores candidates on the pool (whole dev or a subset), in a race when asked."""

    def __init__(
        self,
        inner: Any,
        tasks: Sequence[Task],
        *,
        history: Callable[[], Sequence[EvalResult]],
        recent_scores: Callable[[], Sequence[float]],
        seed: int,
        racing: Any = None,  # runs.config.RacingConfig
        window: int = 8,
        subset_size: int | None = None,
        calibration: int = 0,
    ) -> None:
        if not callable(getattr(inner, "select_examples", None)):
            raise ConfigError(
                f"racing/subset: the {type(inner).__name__} backend cannot score a subset of the dev "
                "examples (it has no select_examples); use the local backend or remove the block"
            )
        self.inner, self.tasks, self.seed = inner, list(tasks), seed
        self.history, self.recent_scores = history, recent_scores
        self.racing, self.window = racing, window
        self.subset_size, self.calibration = subset_size, calibration
        self.batch_size = inner.batch_size
        self._pool: Pool | None = None  # the subset, once chosen
        total = sum(t.weight for t in self.tasks)
        self.task_weights = {t.name: t.weight / total for t in self.tasks}

    def pool(self) -> Pool:
        """The subset once `calibration` evaluations are stored, else every dev example."""
        if self._pool is not None:
            return self._pool
        if self.subset_size is None:
            self._pool = full_pool(self.tasks)
            return self._pool
        stored = self.history()
        if len(stored) < self.calibration:
            return full_pool(self.tasks)
        self._pool = anchor_pool(self.tasks, stored[: self.calibration], self.subset_size, self.seed)
        return self._pool

    def threshold(self) -> float | None:
        """The score a candidate must still be able to reach to be scored on; None: no race yet."""
        if self.racing is None or (self.subset_size is not None and self._pool is None):
            return None  # no race while the subset's calibration scores the whole dev set
        recent = [s for s in self.recent_scores() if math.isfinite(s)][-self.window :]
        if not recent or len(recent) < self.window:
            return None
        return float(np.quantile(recent, self.racing.against))

    def evaluate_batch(self, recipes: Sequence[Any], seeds: Sequence[int]) -> list[EvalResult]:
        pool, threshold = self.pool(), self.threshold()
        fractions = self.racing.slices if threshold is not None else [1.0]
        if pool.size == sum(len(t.examples) for t in self.tasks) and len(fractions) == 1:
            self.inner.select_examples(None)  # the whole dev set at once: the backend's own result
            return self.inner.evaluate_batch(recipes, seeds)
        try:
            return self._race(recipes, seeds, pool, fractions, threshold)
        finally:
            self.inner.select_examples(None)

    def _race(
        self,
        recipes: Sequence[Any],
        seeds: Sequence[int],
        pool: Pool,
        fractions: Sequence[float],
        threshold: float | None,
    ) -> list[EvalResult]:
        races = [Race(pool, self.task_weights) for _ in recipes]
        last: list[EvalResult | None] = [None] * len(recipes)
        costs: list[dict[str, float]] = [{} for _ in recipes]
        alive = list(range(len(recipes)))
        for selection in slice_selections(pool, fractions, self.seed):
            if not alive or not any(selection.values()):
                continue
            self.inner.select_examples(selection)
            results = self.inner.evaluate_batch([recipes[i] for i in alive], [seeds[i] for i in alive])
            for i, result in zip(alive, results, strict=True):
                last[i] = result
                for key, value in result.cost.items():
                    costs[i][key] = costs[i].get(key, 0.0) + value
                if result.ok:
                    races[i].add(selection, result)
            alive = [i for i in alive if last[i].ok and not self._stops(races[i], threshold)]  # type: ignore[union-attr]
        return [
            self._result(race, result, cost) for race, result, cost in zip(races, last, costs, strict=True)
        ]

    def _stops(self, race: Race, threshold: float | None) -> bool:
        if threshold is None:
            return False
        return race.upper_bound(self.racing.confidence) < threshold

    def _result(self, race: Race, last: EvalResult | None, cost: dict[str, float]) -> EvalResult:
        assert last is not None  # every candidate is scored on the first slice
        scored = sum(len(s) for s in race.scores.values())
        cost = {**cost, "examples": float(scored), "pool_examples": float(race.pool.size)}
        if not last.ok:
            return EvalResult.failed(last.error or "failed", score=last.score, cost=cost)
        tasks = {t.name: race.task_score(t) for t in self.tasks if race.scores[t.name]}
        return EvalResult(race.estimate(), tasks, dict(last.behaviour), cost)

    def close(self) -> None:
        self.inner.close()


def fitness_layer(
    config: Any, backend: Any, store: Any, *, tasks: Sequence[Task], warm_start_size: int
) -> Any:
    """`backend` itself, or a FitnessLayer over it when the config (runs.config.EvolveConfig) has a
    `racing` or `subset` block; `store` is the run's RunStore, `tasks` the dev tasks, `warm_start_size`
    the number of warm-start evaluations (the subset's calibration counts them)."""
    if config.racing is None and config.subset is None:
        return backend
    population = int(config.optimizer.population_size)
    calibration = 0
    if config.subset is not None:
        calibration = config.subset.calibration or warm_start_size + population
    window = (config.racing.window if config.racing is not None else None) or population
    return FitnessLayer(
        backend,
        tasks,
        history=lambda: [e.result for e in store.evaluations()],
        recent_scores=lambda: [score for _, score in store.outcomes()],
        seed=config.seed,
        racing=config.racing,
        window=window,
        subset_size=config.subset.size if config.subset is not None else None,
        calibration=calibration,
    )
