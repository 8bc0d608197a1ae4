"""Fewer example evaluations per candidate: racing and a representative subset, as a layer over any backend.

`FitnessLayer` wraps a Backend whose evaluator can score a subset of the dev examples
(`select_examples(selection)`, see backends.local) and hands the loop EvalResults as usual; the loop,
the optimisers and the other backends do not change.

- **Pool**: the examples fitness is scored on, each with its weight in the score. The whole dev set (each
  task's examples weighted equally, the tasks by their `weight`), or, with `subset`, k anchor examples,
  split over the tasks by size and (`stratify`) over each task's example groups, each weighted by the
  share of its stratum it stands for. The anchors are a seeded uniform draw (`anchors: random`), or
  tinyBenchmarks' anchor points (Polo et al. 2024; `anchors: cluster`): cluster the examples by the scores
  the whole-dev evaluations got on them (k-means), keep the example nearest each centre, weight it by its
  cluster's size. They are chosen once `calibration` evaluations are stored, and again after every
  `refresh` further evaluations (from the store's first evaluations up to that point, so a resumed run
  picks the same ones).
- **Paired estimate** (`estimate: paired`): a candidate is told the incumbent's whole-dev score plus its
  mean difference to the incumbent on the anchors (the incumbent, the best whole-dev result stored, has
  every per-example score). The incumbent is a control variate: the anchors' luck cancels in the
  difference, and estimates on different anchors share the whole-dev scale.
- **Promotion** (`promote`): a candidate whose estimate beats the incumbent by `margin` standard errors is
  scored on the rest of the dev set and stored with its whole-dev result (it may become the incumbent);
  one that beats it by less is stored just below the incumbent (within 1e-6, in the order of the
  estimates). So the run's best is always a whole-dev score.
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

Resume stays exact: the threshold, the incumbent and the subset are read from the run store (the
evaluations committed before the batch), which a resumed run finds unchanged. (A backend
that evaluates batches of several candidates and is killed half-way through committing one sees a
different history for the rest of that batch on resume; the local backend evaluates one at a time.)
"""

from __future__ import annotations

import dataclasses
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


def anchor_pool(
    tasks: Sequence[Task],
    scores: Sequence[EvalResult],
    size: int,
    seed: int,
    *,
    stratify: bool = True,
    choose: str = "cluster",
) -> Pool:
    """`size` anchor examples (split over the tasks by their number of examples, at least one each)
    chosen from the per-example `scores` of whole-dev evaluations; see the module doc. With `stratify`, a
    task's anchors are split over its examples' groups (the `group` field) the same way, and each group
    is clustered on its own, so every group's share of the score is estimated from its own anchors.
    `choose="random"`: a seeded uniform draw in each stratum instead, each anchor weighted equally in it
    (no scores needed)."""
    full = full_pool(tasks)
    rng = np.random.default_rng(np.random.SeedSequence([seed, 14, 1]))
    counts = _split(size, [len(t.examples) for t in tasks])
    indices, weights = {}, {}
    for task, k in zip(tasks, counts, strict=True):
        matrix = _score_matrix(task, scores) if choose == "cluster" else None  # (n_t, models)
        strata = _strata(task) if stratify else [np.arange(len(task.examples))]
        chosen, shares = [], []
        for members, k_group in zip(strata, _split(k, [len(m) for m in strata]), strict=True):
            if matrix is None:
                picked = np.sort(rng.choice(len(members), size=k_group, replace=False))
                within = np.full(k_group, 1.0 / k_group)
            else:
                picked, within = _anchors(matrix[members], k_group, seed)
            chosen.append(members[picked])
            shares.append(within * len(members) / len(task.examples))
        order = np.argsort(np.concatenate(chosen))
        indices[task.name] = np.concatenate(chosen)[order]
        weights[task.name] = np.concatenate(shares)[order] * full.weights[task.name].sum()
    return Pool(indices, weights)


def _strata(task: Task) -> list[np.ndarray]:
    """The example indices of each group of `task` (examples without a group together), groups by name."""
    groups: dict[str, list[int]] = {}
    for i, example in enumerate(task.examples):
        groups.setdefault("" if example.group is None else f"={example.group}", []).append(i)
    return [np.asarray(groups[name]) for name in sorted(groups)]


_BELOW = 1e-6  # how far below the incumbent an unpromoted candidate above it is stored, at most


def _capped(result: EvalResult, score: float) -> EvalResult:
    return dataclasses.replace(result, score=score)


def _whole(result: EvalResult) -> bool:
    """Whether `result` scored every dev example of every task it holds (not a subset or a race)."""
    return result.ok and all(task.examples is None for task in result.tasks.values())


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
        stratify: bool = True,
        promote: bool = False,
        refresh: int | None = None,
        choose: str = "cluster",
        estimate: str = "anchors",
        margin: float = 0.0,
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
        self.stratify, self.promote, self.refresh = stratify, promote, refresh
        self.choose, self.estimate, self.margin = choose, estimate, margin
        self.batch_size = inner.batch_size
        self._pool: Pool | None = None  # the subset, once chosen
        self._pool_key = -1  # which refresh the subset was chosen at
        total = sum(t.weight for t in self.tasks)
        self.task_weights = {t.name: t.weight / total for t in self.tasks}

    def pool(self) -> Pool:
        """The subset once `calibration` evaluations are stored, else every dev example. With `refresh`,
        the anchors are chosen again after every `refresh` further evaluations, from the whole-dev scores
        among the stored evaluations up to that point (the calibration and every promoted candidate)."""
        if self.subset_size is None:
            if self._pool is None:
                self._pool = full_pool(self.tasks)
            return self._pool
        if self._pool is not None and self.refresh is None:
            return self._pool
        stored = self.history()
        if len(stored) < self.calibration:
            return full_pool(self.tasks)
        key, upto = 0, self.calibration
        if self.refresh is not None:
            key = (len(stored) - self.calibration) // self.refresh
            upto = self.calibration + key * self.refresh
        if self._pool is None or key != self._pool_key:
            whole = [r for r in stored[:upto] if _whole(r)]
            seed = int(np.random.SeedSequence([self.seed, key]).generate_state(1)[0] & 0x7FFFFFFF)
            self._pool = anchor_pool(
                self.tasks, whole, self.subset_size, seed, stratify=self.stratify, choose=self.choose
            )
            self._pool_key = key
        return self._pool

    def reference(self) -> EvalResult | None:
        """The stored whole-dev result with the best score (the first of equals; None before any): the
        incumbent a candidate's estimate must beat to be promoted, and the paired estimate's reference."""
        best: EvalResult | None = None
        for result in self.history():
            if _whole(result) and (best is None or result.score > best.score):
                best = result
        return best

    def incumbent(self) -> float:
        reference = self.reference()
        return -math.inf if reference is None else reference.score

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
        whole = pool.size == sum(len(t.examples) for t in self.tasks)
        if whole and len(fractions) == 1:
            self.inner.select_examples(None)  # the whole dev set at once: the backend's own result
            return self.inner.evaluate_batch(recipes, seeds)
        try:
            results = self._race(recipes, seeds, pool, fractions, threshold)
            if self.estimate == "paired" and not whole:
                results = self._paired(pool, results)
            if self.promote and not whole:
                results = self._promoted(recipes, seeds, pool, results)
            return results
        finally:
            self.inner.select_examples(None)

    def _paired(self, pool: Pool, results: list[EvalResult]) -> list[EvalResult]:
        """`results`, each candidate that scored every anchor told the paired estimate instead of its
        anchors' weighted mean: the reference's whole-dev score plus the candidate's mean difference to the
        reference on the same anchors (per task, the task weights as in the score). The reference is a
        control variate: what the anchors' luck adds to both cancels, so the estimate's error is that of
        the difference, small when the candidate is close to the reference, and estimates made on
        different anchors (refresh) are on the same scale."""
        reference = self.reference()
        if reference is None:
            return results
        out = []
        for result in results:
            if not result.ok or result.cost.get("examples") != pool.size:
                out.append(result)
                continue
            tasks, score = {}, 0.0
            for name, task in result.tasks.items():
                weights = dict(zip(pool.indices[name].tolist(), pool.weights[name].tolist(), strict=True))
                w = np.asarray([weights[i] for i in task.examples or []])
                own = np.asarray(task.per_example)
                ref = np.asarray(reference.tasks[name].per_example)[task.examples or []]
                value = reference.tasks[name].score + float(w @ (own - ref) / w.sum())
                tasks[name] = dataclasses.replace(task, score=value)
                score += self.task_weights[name] * value
            out.append(EvalResult(score, tasks, dict(result.behaviour), dict(result.cost)))
        return out

    def _stderr(self, pool: Pool, result: EvalResult, reference: EvalResult | None) -> float:
        """The standard error of `result`'s estimate from the spread of what it averages over the anchors
        (the per-example scores, or with `estimate: paired` their differences to the reference's), with
        the finite-population factor (1 - n / N) of each task."""
        variance = 0.0
        for name, task in result.tasks.items():
            weights = dict(zip(pool.indices[name].tolist(), pool.weights[name].tolist(), strict=True))
            c = np.asarray([weights[i] for i in task.examples or []])
            c = c / c.sum()
            values = np.asarray(task.per_example)
            if self.estimate == "paired" and reference is not None:
                values = values - np.asarray(reference.tasks[name].per_example)[task.examples or []]
            spread = float(c @ (values - c @ values) ** 2)
            population = len(next(t for t in self.tasks if t.name == name).examples)
            variance += self.task_weights[name] ** 2 * float(c @ c) * spread * (1 - len(c) / population)
        return math.sqrt(max(variance, 0.0))

    def _promoted(
        self, recipes: Sequence[Any], seeds: Sequence[int], pool: Pool, results: list[EvalResult]
    ) -> list[EvalResult]:
        """`results`, where a candidate that scored every anchor and whose estimate beats the incumbent
        (the best whole-dev score so far, this batch's promotions included) is scored on the rest of the
        dev set too and replaced by its whole-dev result. So the run's best is always a whole-dev score,
        and no candidate is kept for luck on the anchors."""
        reference = self.reference()
        best, out = self.incumbent(), list(results)
        for i in sorted(range(len(results)), key=lambda i: -results[i].score):
            result = results[i]
            if not result.ok or result.score < best or result.cost.get("examples") != pool.size:
                continue
            stderr = self._stderr(pool, result, reference)
            if result.score <= best + self.margin * stderr:
                # Not clearly better: stored just below the incumbent, in the order of the estimates (an
                # unverified estimate never becomes the run's best, nor ties it: the optimiser would take
                # a tie for a plateau; and it still ranks above the candidates estimated below).
                out[i] = _capped(result, best - _BELOW / (1.0 + result.score - best))
                continue
            race = Race(full_pool(self.tasks), self.task_weights)
            for name, task in result.tasks.items():
                race.scores[name].update(zip(task.examples or [], task.per_example, strict=True))
            rest = {
                t.name: [j for j in range(len(t.examples)) if j not in race.scores[t.name]]
                for t in self.tasks
            }
            self.inner.select_examples(rest)
            extra = self.inner.evaluate_batch([recipes[i]], [seeds[i]])[0]
            cost = {k: result.cost.get(k, 0.0) + extra.cost.get(k, 0.0) for k in {*result.cost, *extra.cost}}
            cost["pool_examples"] = float(pool.size)
            if not extra.ok:
                out[i] = EvalResult.failed(extra.error or "failed", score=extra.score, cost=cost)
                continue
            race.add(rest, extra)
            cost["examples"] = float(sum(len(s) for s in race.scores.values()))
            tasks = {t.name: dataclasses.replace(race.task_score(t), examples=None) for t in self.tasks}
            out[i] = EvalResult(race.estimate(), tasks, dict(result.behaviour), cost)
            best = max(best, out[i].score)
        return out

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
    subset = config.subset
    calibration, refresh = 0, None
    if subset is not None:
        default = 1 if subset.anchors == "random" else warm_start_size + population
        calibration, refresh = subset.calibration or default, subset.refresh or population
    window = (config.racing.window if config.racing is not None else None) or population
    return FitnessLayer(
        backend,
        tasks,
        history=lambda: [e.result for e in store.evaluations()],
        recent_scores=lambda: [score for _, score in store.outcomes()],
        seed=config.seed,
        racing=config.racing,
        window=window,
        subset_size=subset.size if subset is not None else None,
        calibration=calibration,
        stratify=subset.stratify if subset is not None else True,
        promote=subset.promote if subset is not None else False,
        refresh=refresh,
        choose=subset.anchors if subset is not None else "random",
        estimate=subset.estimate if subset is not None else "anchors",
        margin=subset.margin if subset is not None else 0.0,
    )
