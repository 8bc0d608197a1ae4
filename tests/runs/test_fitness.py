"""Racing and the representative subset (runs.fitness) on synthetic landscapes with known per-example scores."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from evomerge.errors import ConfigError
from evomerge.eval.result import EvalResult, TaskScore
from evomerge.eval.tasks import Example, Task
from evomerge.runs.config import RacingConfig, SubsetConfig
from evomerge.runs.fitness import FitnessLayer, anchor_pool, full_pool, slice_selections
from evomerge.runs.loop import evolve, resume
from evomerge.runs.store import RunStore
from evomerge.zoo.random_models import FamilySpec, build_family

from .fake_problem import make_config


class TableBackend:
    """Scores candidate `recipe` (a key of `table`) on the selected examples: table[recipe][task][i]."""

    batch_size = 1

    def __init__(self, table: Any, crash_at: int | None = None) -> None:
        self.table, self.crash_at, self.calls = table, crash_at, 0
        self.selection: dict[str, list[int]] | None = None
        self.examples_scored = 0

    def select_examples(self, selection: dict[str, Sequence[int]] | None) -> None:
        self.selection = None if selection is None else {k: list(v) for k, v in selection.items()}

    def evaluate_batch(self, recipes: Sequence[Any], seeds: Sequence[int]) -> list[EvalResult]:
        return [self._one(recipe) for recipe in recipes]

    def _one(self, recipe: Any) -> EvalResult:
        self.calls += 1
        if self.calls == self.crash_at:
            raise Crash
        scores = self.table(recipe) if callable(self.table) else self.table[recipe]
        tasks = {}
        for name, row in scores.items():
            indices = range(len(row)) if self.selection is None else self.selection.get(name, [])
            per_example = [float(row[i]) for i in indices]
            if per_example:
                mean = sum(per_example) / len(per_example)
                tasks[name] = TaskScore(name, "exact_match", mean, per_example, len(per_example))
        self.examples_scored += sum(len(t.per_example) for t in tasks.values())
        score = sum(t.score for t in tasks.values()) / len(tasks)
        return EvalResult(score, tasks, cost={"examples": float(sum(t.n_examples for t in tasks.values()))})

    def close(self) -> None:
        return None


class Crash(BaseException):
    """Escapes every `except Exception`, like a kill would."""


def tasks_of(sizes: dict[str, int]) -> list[Task]:
    return [
        Task(name, "exact_match", [Example(prompt=str(i), answer="x") for i in range(n)])
        for name, n in sizes.items()
    ]


def layer(backend: Any, tasks: list[Task], history: list[float], **racing: Any) -> FitnessLayer:
    return FitnessLayer(
        backend,
        tasks,
        history=lambda: [],
        recent_scores=lambda: history,
        seed=0,
        racing=RacingConfig(**racing),
        window=len(history) or 8,
    )


# --- racing ---------------------------------------------------------------------------------------------
def landscape(rng: np.random.Generator, candidates: int, examples: int) -> dict[int, dict[str, np.ndarray]]:
    """Candidate i answers each example right with probability p_i ~ U(0.1, 0.9), fixed per example."""
    p = rng.uniform(0.1, 0.9, size=candidates)
    right = rng.uniform(size=(candidates, examples)) < p[:, None]  # (C, N)
    return {i: {"t": right[i].astype(float)} for i in range(candidates)}


def test_racing_never_drops_the_candidate_the_full_evaluation_ranks_best() -> None:
    rng = np.random.default_rng(0)
    tasks = tasks_of({"t": 200})
    scored = full = 0
    for _ in range(60):
        table = landscape(rng, 16, 200)
        truth = {i: float(s["t"].mean()) for i, s in table.items()}
        backend = TableBackend(table)
        # history: the generation's own full scores, so the threshold is their median
        results = layer(backend, tasks, list(truth.values()), confidence=0.99).evaluate_batch(
            list(table), [0] * 16
        )
        best = max(truth, key=truth.__getitem__)
        assert results[best].cost["examples"] == 200  # never stopped early
        assert results[best].score == pytest.approx(truth[best])
        scored, full = scored + backend.examples_scored, full + 16 * 200
    assert scored < 0.8 * full  # the race does stop candidates (the test can fail)


@pytest.mark.parametrize("confidence", [0.8, 0.9])
def test_a_candidate_above_the_threshold_is_stopped_at_most_as_often_as_the_bound_says(
    confidence: float,
) -> None:
    rng = np.random.default_rng(1)
    tasks = tasks_of({"t": 120, "u": 80})
    above = stopped = 0
    for _ in range(40):
        table = {i: {"t": s["t"][:120], "u": s["t"][120:]} for i, s in landscape(rng, 16, 200).items()}
        truth = [(s["t"].mean() + s["u"].mean()) / 2 for s in table.values()]
        race = layer(TableBackend(table), tasks, truth, confidence=confidence)
        threshold = race.threshold()
        assert threshold is not None
        for value, result in zip(truth, race.evaluate_batch(list(table), [0] * 16), strict=True):
            if value >= threshold:
                above += 1
                stopped += result.cost["examples"] < 200
    slices = len(RacingConfig().slices)
    assert stopped / above <= (1 - confidence) * (slices - 1)


def test_a_stopped_candidate_is_told_its_estimate_with_the_examples_it_was_scored_on() -> None:
    tasks = tasks_of({"t": 64})
    table = {"good": {"t": np.ones(64)}, "bad": {"t": np.zeros(64)}}
    good, bad = layer(TableBackend(table), tasks, [0.5] * 8).evaluate_batch(["good", "bad"], [0, 0])
    assert good.cost["examples"] == 64 and good.score == 1.0
    assert bad.cost["examples"] == 8 and bad.score == 0.0 and bad.cost["pool_examples"] == 64
    first = slice_selections(full_pool(tasks), RacingConfig().slices, seed=0)[0]["t"]
    assert bad.tasks["t"].examples == sorted(first) and bad.tasks["t"].per_example == [0.0] * 8


def test_without_history_there_is_no_race_and_the_backend_result_is_returned_whole() -> None:
    tasks = tasks_of({"t": 10})
    table = {"a": {"t": np.linspace(0, 1, 10)}}
    backend = TableBackend(table)
    (result,) = layer(backend, tasks, []).evaluate_batch(["a"], [0])
    assert result.tasks["t"].examples is None and result.tasks["t"].per_example == list(np.linspace(0, 1, 10))


def test_slices_cover_the_pool_once_in_a_seeded_order() -> None:
    pool = full_pool(tasks_of({"t": 50, "u": 7}))
    selections = slice_selections(pool, [0.1, 0.5, 1.0], seed=4)
    for name, n in (("t", 50), ("u", 7)):
        seen = [i for s in selections for i in s[name]]
        assert sorted(seen) == list(range(n))
    assert selections == slice_selections(pool, [0.1, 0.5, 1.0], seed=4)
    assert selections != slice_selections(pool, [0.1, 0.5, 1.0], seed=5)


def test_racing_slices_must_grow_to_the_whole_set() -> None:
    with pytest.raises(ValueError, match="grow strictly"):
        RacingConfig(slices=[0.5, 0.25, 1.0])
    with pytest.raises(ValueError, match=r"exactly 1\.0"):
        RacingConfig(slices=[0.25, 0.5])


# --- representative subset -------------------------------------------------------------------------------
def test_anchors_predict_the_full_score_when_examples_fall_in_groups() -> None:
    """Examples in 4 groups whose members every model scores alike: 4 anchors, weighted by their group's
    size, give every model's full score exactly, a model never seen in calibration included."""
    rng = np.random.default_rng(2)
    group_of = rng.integers(0, 4, size=100)
    tasks = tasks_of({"t": 100})

    def model(pattern: np.ndarray) -> EvalResult:
        per_example = [float(pattern[g]) for g in group_of]
        return EvalResult(
            float(np.mean(per_example)), {"t": TaskScore("t", "exact_match", 0, per_example, 100)}
        )

    calibration = [model(rng.integers(0, 2, size=4)) for _ in range(12)]
    pool = anchor_pool(tasks, calibration, size=4, seed=0)
    assert len(pool.indices["t"]) == 4 and pool.weights["t"].sum() == pytest.approx(1.0)
    for pattern in ([1, 0, 0, 1], [0, 1, 1, 1], [1, 1, 0, 0]):
        full = model(np.asarray(pattern))
        estimate = sum(
            w * full.tasks["t"].per_example[i]
            for i, w in zip(pool.indices["t"], pool.weights["t"], strict=True)
        )
        assert estimate == pytest.approx(full.score)


def test_stratified_anchors_give_every_group_its_share_of_the_score() -> None:
    """Groups of 60, 30 and 10 examples, 10 anchors: 6, 3 and 1 anchors, each group's anchors inside it and
    weighted together by its share; so a model right on one group only is estimated exactly."""
    group = ["a"] * 60 + ["b"] * 30 + ["c"] * 10
    tasks = [
        Task("t", "exact_match", [Example(prompt=str(i), answer="x", group=g) for i, g in enumerate(group)])
    ]
    rng = np.random.default_rng(0)
    calibration = [
        EvalResult(0.5, {"t": TaskScore("t", "exact_match", 0.5, rng.integers(0, 2, 100).tolist(), 100)})
        for _ in range(6)
    ]
    pool = anchor_pool(tasks, calibration, size=10, seed=0)
    picked = [group[i] for i in pool.indices["t"]]
    assert [picked.count(g) for g in "abc"] == [6, 3, 1]
    for g, share in zip("abc", (0.6, 0.3, 0.1), strict=True):
        mass = sum(w for i, w in zip(pool.indices["t"], pool.weights["t"], strict=True) if group[i] == g)
        assert mass == pytest.approx(share)
    unstratified = anchor_pool(tasks, calibration, size=10, seed=0, stratify=False)
    assert [group[i] for i in unstratified.indices["t"]].count("c") != 1 or unstratified != pool


def subset_layer(backend: Any, history: list[EvalResult], **subset: Any) -> FitnessLayer:
    return FitnessLayer(
        backend,
        tasks_of({"t": 200}),
        history=lambda: history,
        recent_scores=lambda: [r.score for r in history],
        seed=0,
        **{"subset_size": 20, "calibration": 1, "choose": "random", **subset},
    )


def whole(per_example: np.ndarray) -> EvalResult:
    values = per_example.astype(float).tolist()
    return EvalResult(
        float(np.mean(values)), {"t": TaskScore("t", "exact_match", float(np.mean(values)), values, 200)}
    )


def test_the_paired_estimate_cancels_the_anchors_luck_against_the_reference() -> None:
    """Candidates that differ from the reference on a few examples: the paired estimate (reference's
    whole-dev score + mean difference on the anchors) is much closer to their whole-dev scores than the
    anchors' mean, and exact for a candidate equal to the reference on every anchor."""
    rng = np.random.default_rng(4)
    reference = rng.uniform(size=200) < 0.6
    table = {0: {"t": reference.astype(float)}}
    for c in range(1, 40):
        flipped = reference.copy()
        flipped[rng.choice(200, size=6, replace=False)] ^= True
        table[c] = {"t": flipped.astype(float)}
    errors: dict[str, list[float]] = {"anchors": [], "paired": []}
    for estimate in errors:
        fitness = subset_layer(TableBackend(table), [whole(reference)], estimate=estimate)
        for c in range(1, 40):
            got = fitness.evaluate_batch([c], [0])[0].score
            errors[estimate].append(abs(got - float(np.mean(table[c]["t"]))))
    assert np.mean(errors["paired"]) < 0.6 * np.mean(errors["anchors"])
    anchors = fitness.pool().indices["t"]
    same = reference.copy()
    outside = np.setdiff1d(np.arange(200), anchors)[:5]
    same[outside] ^= True  # differs only off the anchors: the estimate is the reference's score
    fitness.inner.table[99] = {"t": same.astype(float)}
    assert fitness.evaluate_batch([99], [0])[0].score == pytest.approx(float(np.mean(reference)))


def test_a_candidate_within_the_margin_is_not_promoted_and_stored_below_the_incumbent() -> None:
    rng = np.random.default_rng(5)
    reference = rng.uniform(size=200) < 0.5
    better = reference.copy()
    better[np.flatnonzero(~reference)[:30]] = True  # better than the reference
    table = {0: {"t": better.astype(float)}}
    strict = subset_layer(TableBackend(table), [whole(reference)], promote=True, margin=0.0)
    loose = subset_layer(TableBackend(table), [whole(reference)], promote=True, margin=50.0)
    anchors = strict.pool().indices["t"]
    assert np.any(better[anchors] != reference[anchors])  # the anchors tell the two apart
    promoted, held = strict.evaluate_batch([0], [0])[0], loose.evaluate_batch([0], [0])[0]
    assert promoted.tasks["t"].examples is None and promoted.score == pytest.approx(float(np.mean(better)))
    assert held.tasks["t"].examples is not None
    assert float(np.mean(reference)) - 1e-6 <= held.score < float(np.mean(reference))  # just below it


def test_clustered_anchors_need_two_calibration_evaluations() -> None:
    with pytest.raises(ValueError, match="anchors: cluster needs at least 2"):
        SubsetConfig(size=4, calibration=1, anchors="cluster")
    assert SubsetConfig(size=4, calibration=1).anchors == "random"


def test_a_subset_needs_two_whole_dev_evaluations() -> None:
    with pytest.raises(ConfigError, match=r"subset\.calibration"):
        anchor_pool(tasks_of({"t": 5}), [], size=2, seed=0)


# --- in the loop -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return build_family(tmp_path_factory.mktemp("fitness") / "family", FamilySpec())


RACING = {"window": 4, "slices": [0.1, 0.5, 1.0], "confidence": 0.9}


def raced_config(root: Path, family: dict[str, Path], **overrides: Any) -> Any:
    dev = root / "tasks" / "big.jsonl"
    dev.parent.mkdir(parents=True, exist_ok=True)
    dev.write_text("".join(json.dumps({"prompt": f"{i}", "answer": "x"}) + "\n" for i in range(200)))
    fitness = [{"name": "toy", "dev": str(dev), "test": str(dev)}]
    return make_config(root, family, **{"fitness": fitness, "budget": {"max_evaluations": 24}, **overrides})


def gene_table(space: Any) -> Any:
    """Per-example scores from the genome: example j is right when its fixed level is below the
    candidate's quality (1 - squared distance to a target)."""
    levels = np.random.default_rng(9).uniform(size=200)
    target = np.linspace(0.2, 0.8, space.dim)

    def table(recipe: Any) -> dict[str, np.ndarray]:
        quality = 1.0 - 8 * float(np.mean((space.encode(recipe) - target) ** 2))
        return {"toy": (levels < quality).astype(float)}

    return table


def stored(run_dir: Path) -> list[tuple[Any, ...]]:
    with RunStore.in_dir(run_dir) as store:
        return [(e.generation, e.index, e.genome.tolist(), e.result.to_dict()) for e in store.evaluations()]


def test_a_raced_run_stores_estimates_with_their_examples(tmp_path: Path, family: dict[str, Path]) -> None:
    config = raced_config(tmp_path, family, racing=RACING)
    evolve(config, backend=TableBackend(gene_table(config.search_space())))
    rows = stored(config.out)
    counts = [row[3]["cost"]["examples"] for row in rows]
    assert len(rows) == 24 and min(counts) < 200 and max(counts) == 200
    for *_, result in rows:
        task = result["tasks"]["toy"]
        if result["cost"]["examples"] < 200:
            assert len(task["examples"]) == len(task["per_example"]) == result["cost"]["examples"]


@pytest.mark.parametrize("crash_at", [3, 9, 17, 30])
def test_crash_anywhere_then_resume_equals_an_uninterrupted_raced_run(
    tmp_path: Path, family: dict[str, Path], crash_at: int
) -> None:
    rows = crash_then_resume(tmp_path, family, {"racing": RACING}, crash_at)
    assert min(row[3]["cost"]["examples"] for row in rows) < 200  # it did race


def crash_then_resume(
    tmp_path: Path, family: dict[str, Path], settings: dict[str, Any], crash_at: int
) -> list[tuple[Any, ...]]:
    """A run crashed after `crash_at` evaluations then resumed, checked equal to an uninterrupted one;
    its stored rows."""
    config = raced_config(tmp_path / "crashed", family, **settings)
    table = gene_table(config.search_space())
    with pytest.raises(Crash):
        evolve(config, backend=TableBackend(table, crash_at=crash_at))
    resume(config.out, backend=TableBackend(table))
    straight = raced_config(tmp_path / "straight", family, **settings)
    evolve(straight, backend=TableBackend(table))
    assert stored(config.out) == stored(straight.out)
    return stored(config.out)


def test_a_subset_run_calibrates_on_the_whole_set_then_scores_the_anchors(
    tmp_path: Path, family: dict[str, Path]
) -> None:
    config = raced_config(tmp_path, family, subset={"size": 6, "calibration": 8, "promote": False})
    evolve(config, backend=TableBackend(gene_table(config.search_space())))
    counts = [row[3]["cost"]["examples"] for row in stored(config.out)]
    assert counts[:8] == [200] * 8 and all(c <= 6 for c in counts[8:])


@pytest.mark.parametrize(
    "subset", [{"margin": 0.0}, {"margin": 0.0, "estimate": "anchors", "anchors": "cluster"}, {}]
)
def test_a_promoting_subset_run_keeps_only_whole_dev_scores_as_its_best(
    tmp_path: Path, family: dict[str, Path], subset: dict[str, Any]
) -> None:
    """A candidate is scored on the whole dev set only when its estimate beats the best whole-dev score
    stored before it (by the margin), and one that is not is stored at most at that score; so the run's
    best is a whole-dev score."""
    subset = {"size": 6, "calibration": 8, **subset}
    config = raced_config(tmp_path, family, subset=subset, budget={"max_evaluations": 40})
    table = gene_table(config.search_space())
    evolve(config, backend=TableBackend(table))
    with RunStore.in_dir(config.out) as store:
        rows, best = store.evaluations(), store.best()
    assert best is not None and best.result.tasks["toy"].examples is None
    assert best.score == pytest.approx(float(np.mean(table(best.recipe)["toy"])))
    incumbent, promoted = max(r.score for r in rows[:8]), 0
    for row in rows[8:]:
        whole = row.result.tasks["toy"].examples is None
        if whole:
            promoted += 1
            assert row.result.cost["examples"] == 200
            assert row.score == pytest.approx(float(np.mean(table(row.recipe)["toy"])))
            incumbent = max(incumbent, row.score)
        else:
            assert row.score <= incumbent and row.result.cost["examples"] <= 6
    assert promoted < 32 and (promoted > 0 or subset.get("estimate") != "anchors")


@pytest.mark.parametrize("crash_at", [5, 13, 22, 37])
def test_crash_anywhere_then_resume_equals_an_uninterrupted_promoting_refreshed_subset_run(
    tmp_path: Path, family: dict[str, Path], crash_at: int
) -> None:
    subset = {"size": 6, "calibration": 8, "refresh": 8, "margin": 0.0, "estimate": "anchors"}
    rows = crash_then_resume(tmp_path, family, {"subset": subset, "racing": RACING}, crash_at)
    promoted = [row for row in rows[8:] if row[3]["tasks"]["toy"]["examples"] is None]
    assert promoted  # it did promote, and resumed with the same incumbent and anchors


def test_racing_refuses_perplexity_tasks(tmp_path: Path, family: dict[str, Path]) -> None:
    dev = tmp_path / "ppl.jsonl"
    dev.write_text('{"prompt": "a", "answer": "b"}\n')
    with pytest.raises(ConfigError, match="racing: tasks \\['ppl'\\] use perplexity"):
        make_config(
            tmp_path, family, racing={}, fitness=[{"name": "ppl", "dev": str(dev), "metric": "perplexity"}]
        )
