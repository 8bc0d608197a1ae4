"""`map-elites`: the archive fills on a toy two-task problem, the quality task cycles (CycleQD), elites are
exactly the genomes told, settings naming unknown tasks are refused, and a pickle continues identically.

The toy problem: genomes in [0, 1]^2; task `a` peaks at A, task `b` at B, each 1 - |x - peak|^2 / 2, so
every score lies in [0, 1] like the built-in metrics and the two tasks trade off along the segment A-B.
"""

from __future__ import annotations

import pickle
from typing import Any

import numpy as np
import pytest

from evomerge.errors import ConfigError
from evomerge.eval.result import EvalResult, TaskScore
from evomerge.search.map_elites import MapElites, MapElitesSettings
from evomerge.search.registry import make_optimizer, parse_settings

LOWER, UPPER = np.zeros(2), np.ones(2)
PEAKS = {"a": np.array([0.2, 0.8]), "b": np.array([0.8, 0.2]), "c": np.array([0.5, 0.5])}


def scored(tasks: dict[str, float], score: float | None = None) -> EvalResult:
    """A result with these task scores (score: their mean unless given)."""
    total = float(np.mean(list(tasks.values()))) if score is None else score
    return EvalResult(total, tasks={t: TaskScore(t, "exact_match", s, [s], 1) for t, s in tasks.items()})


def toy(genomes: np.ndarray, tasks: tuple[str, ...] = ("a", "b")) -> list[EvalResult]:
    return [
        scored({t: float(1 - np.sum((g - PEAKS[t]) ** 2) / 2) for t in tasks}) for g in np.atleast_2d(genomes)
    ]


def optimizer(seed: int = 0, tasks: tuple[str, ...] = ("a", "b"), **fields: Any) -> MapElites:
    settings = MapElitesSettings(population_size=8, **fields)
    start = np.full((1, 2), 0.5)
    return MapElites(LOWER, UPPER, settings, seed=seed, seeds=[(start[0], toy(start, tasks)[0])])


def run(search: MapElites, generations: int, tasks: tuple[str, ...] = ("a", "b")) -> None:
    for _ in range(generations):
        genomes = search.ask()
        search.tell(genomes, toy(genomes, tasks))


# --- searching ----------------------------------------------------------------------------------------
def test_the_archive_fills_and_the_qd_score_never_falls() -> None:
    search = optimizer()
    coverage, qd = [search.coverage()], [search.qd_score()]
    for _ in range(40):
        run(search, 1)
        coverage.append(search.coverage())
        qd.append(search.qd_score())
    assert np.all(np.diff(coverage) >= 0) and np.all(np.diff(qd) >= 0)  # elitist: nothing is ever lost
    # Each archive has 10 cells over the other task's score; scores below 0.36 are out of the box's reach.
    assert coverage[0] == 0.1 and coverage[-1] >= 0.6
    assert qd[-1] > 5 * qd[0]


def test_the_best_elite_of_each_task_reaches_its_optimum() -> None:
    search = optimizer()
    run(search, 60)
    for task, peak in (("a", PEAKS["a"]), ("b", PEAKS["b"])):
        best = max(search.elites(), key=lambda elite: elite.result.tasks[task].score)
        assert best.result.tasks[task].score > 0.999
        np.testing.assert_allclose(best.genome, peak, atol=0.05)


def test_explicit_measures_keep_one_archive_whose_quality_is_the_score() -> None:
    search = optimizer(measures=["a", "b"], resolution=[4, 5])
    run(search, 20)
    elites = search.elites()
    assert search.quality_task is None and len(search.archives) == 1
    assert all(e.niche.startswith("cell (") and set(e.measures) == {"a", "b"} for e in elites)
    assert search.coverage() == len(elites) / 20
    assert search.qd_score() == pytest.approx(sum(e.result.score for e in elites))
    best = max(elites, key=lambda elite: elite.score)
    np.testing.assert_allclose(best.genome, (PEAKS["a"] + PEAKS["b"]) / 2, atol=0.1)  # the mean's optimum


def test_a_named_quality_task_is_the_objective() -> None:
    search = optimizer(measures=["b"], quality="a")
    run(search, 30)
    assert search.quality_task == "a"
    assert search.qd_score() == pytest.approx(sum(e.result.tasks["a"].score for e in search.elites()))


# --- CycleQD ------------------------------------------------------------------------------------------
def test_the_quality_task_cycles_generation_by_generation() -> None:
    tasks = ("a", "b", "c")
    search = optimizer(tasks=tasks)
    qualities = []
    for _ in range(7):
        qualities.append(search.quality_task)
        run(search, 1, tasks)
    assert qualities == ["a", "b", "c", "a", "b", "c", "a"]
    assert [archive.quality for archive in search.archives] == ["a", "b", "c"]
    niches = {e.niche.split(",")[0] for e in search.elites()}
    assert niches == {"quality a", "quality b", "quality c"}
    for elite in search.elites():
        quality = elite.niche.split(",")[0].removeprefix("quality ")
        assert set(elite.measures) == set(tasks) - {quality}  # the other tasks are the measures


def test_each_generation_breeds_from_the_quality_tasks_archive() -> None:
    """Two genomes share a cell of archive `a` (their `b` scores are alike), so `a` keeps only the better
    at `a`; archive `b` keeps both. A tiny Gaussian step shows which archive each generation bred from."""
    good_a, weak_a = np.array([0.1, 0.1]), np.array([0.9, 0.9])
    seeds = [(good_a, scored({"a": 0.9, "b": 0.55})), (weak_a, scored({"a": 0.5, "b": 0.51}))]
    settings = MapElitesSettings(population_size=16, emitter="gaussian", sigma=1e-6)
    search = MapElites(LOWER, UPPER, settings, seed=0, seeds=seeds)
    first = search.ask()
    np.testing.assert_allclose(first, np.repeat(good_a[None], 16, axis=0), atol=1e-4)
    search.tell(first, [EvalResult.failed("skipped")] * 16)  # the archives stay as they were
    second = search.ask()
    near_weak = np.all(np.abs(second - weak_a) < 1e-4, axis=1)
    assert search.quality_task == "b" and near_weak.any()


def test_every_ok_result_enters_every_archive_it_has_scores_for() -> None:
    search = optimizer()
    genomes = search.ask()
    told = toy(genomes)
    told[0] = EvalResult.failed("boom")
    told[1] = scored({"a": 0.99})  # no `b`: archive a cannot place it, archive b cannot score it
    search.tell(genomes, told)
    archived = {id(elite.result) for elite in search.elites()}
    assert id(told[0]) not in archived and id(told[1]) not in archived
    for elite in search.elites():
        for task, value in elite.measures.items():
            assert value == elite.result.tasks[task].score


def test_elites_are_exactly_the_genomes_told() -> None:
    search = optimizer()
    told: dict[bytes, EvalResult] = {}
    for _ in range(10):
        genomes = search.ask()
        results = toy(genomes)
        search.tell(genomes, results)
        told.update({g.tobytes(): r for g, r in zip(genomes, results, strict=True)})
    for elite in search.elites():
        if elite.genome.tobytes() in told:  # all but the warm-start seed
            assert told[elite.genome.tobytes()] is elite.result
        else:
            np.testing.assert_array_equal(elite.genome, np.full(2, 0.5))


def test_seeds_enter_the_archives_before_the_first_ask() -> None:
    settings = MapElitesSettings(population_size=4, emitter="gaussian", sigma=1e-6)
    seed_genome = np.array([0.3, 0.6])
    search = MapElites(LOWER, UPPER, settings, seed=0, seeds=[(seed_genome, toy(seed_genome)[0])])
    assert [e.niche for e in search.elites()] == ["quality a, cell (7)", "quality b, cell (9)"]
    np.testing.assert_allclose(search.ask(), np.repeat(seed_genome[None], 4, axis=0), atol=1e-4)


def test_without_task_scores_one_cell_keeps_the_best_score() -> None:
    search = make_optimizer(parse_settings({"name": "map-elites", "population_size": 4}), LOWER, UPPER)
    genomes = search.ask()
    search.tell(
        genomes, [EvalResult(0.1), EvalResult(0.7), EvalResult.failed("x", score=9.0), EvalResult(0.3)]
    )
    (elite,) = search.elites()
    assert elite.score == 0.7 and elite.niche == "cell (0)" and elite.measures == {}
    np.testing.assert_array_equal(elite.genome, genomes[1])


# --- settings -----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"resolution": 0}, r"optimizer\.resolution: each measure needs at least 1 cell"),
        ({"measures": ["a", "b"], "resolution": [5, 0]}, r"optimizer\.resolution: each measure"),
        (
            {"measures": ["a", "b"], "resolution": [5]},
            r"optimizer\.resolution: expected one value per measure, 2 \(a, b\), got 1",
        ),
        ({"measures": ["a"], "measure_ranges": [[1, 0]]}, r"optimizer\.measure_ranges: .*low < high"),
        ({"measures": ["a", "a"]}, r"optimizer\.measures: each task may be one measure only"),
        ({"quality": "a"}, r"optimizer\.quality: a fixed quality task needs explicit measures"),
        ({"sigma": 0}, r"optimizer\.sigma"),
    ],
)
def test_bad_settings_are_refused_with_the_field_named(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_settings({"name": "map-elites", **fields})


@pytest.mark.parametrize(
    ("fields", "tasks", "message"),
    [
        ({"measures": ["a", "typo"]}, ["a", "b"], r"optimizer\.measures: unknown task 'typo'; .* a, b"),
        ({"measures": ["a"], "quality": "typo"}, ["a", "b"], r"optimizer\.quality: unknown task 'typo'"),
        (
            {},
            ["a"],
            r"optimizer\.measures: .*at least 2 fitness tasks.*name `measures`.*or add fitness tasks",
        ),
        (
            {"resolution": [4, 4]},
            ["a", "b"],
            r"optimizer\.resolution: expected one value per measure, 1 \(the other tasks in each archive\), got 2",
        ),
    ],
)
def test_check_tasks_refuses_what_the_fitness_tasks_cannot_give(
    fields: dict[str, Any], tasks: list[str], message: str
) -> None:
    settings = parse_settings({"name": "map-elites", **fields})
    with pytest.raises(ConfigError, match=message):
        settings.check_tasks(tasks)


def test_valid_settings_pass_check_tasks() -> None:
    parse_settings({"name": "map-elites"}).check_tasks(["a", "b", "c"])
    parse_settings({"name": "map-elites", "resolution": [3, 4]}).check_tasks(["a", "b", "c"])
    parse_settings({"name": "map-elites", "measures": ["b"], "quality": "a"}).check_tasks(["a", "b"])


# --- checkpoints --------------------------------------------------------------------------------------
@pytest.mark.parametrize("emitter", ["iso-line", "gaussian"])
def test_a_pickle_taken_mid_run_continues_identically(emitter: str) -> None:
    search = optimizer(seed=5, emitter=emitter)
    run(search, 5)
    copy = pickle.loads(pickle.dumps(search))
    for _ in range(6):
        a, b = search.ask(), copy.ask()
        np.testing.assert_array_equal(a, b)
        search.tell(a, toy(a))
        copy.tell(b, toy(b))
    assert search.qd_score() == copy.qd_score()
    mine, theirs = search.elites(), copy.elites()
    assert [(e.niche, e.genome.tobytes(), e.measures) for e in mine] == [
        (e.niche, e.genome.tobytes(), e.measures) for e in theirs
    ]


def test_the_told_store_only_keeps_archived_genomes() -> None:
    search = optimizer()
    run(search, 30)
    assert len(search._told) == len({e.genome.tobytes() for e in search.elites()})


# --- CycleQD's SVD mutation of whole models --------------------------------------------------------------
class TinyTensors:
    """A stand-in weights space: a (4, 3) matrix and a (3,) bias, around a fixed origin."""

    dim = 15

    def tensor_slots(self) -> list[tuple[int, tuple[int, ...]]]:
        return [(0, (4, 3)), (12, (3,))]

    def origin(self) -> np.ndarray:
        return np.linspace(-0.5, 0.5, 15)


def test_svd_mutation_grows_each_matrix_along_its_top_direction_and_leaves_biases() -> None:
    settings = MapElitesSettings(measures=["b"], quality="a", mutation="svd", svd_rank=1, svd_scale=0.5)
    space = TinyTensors()
    lower, upper = np.full(15, -5.0), np.full(15, 5.0)
    rng = np.random.default_rng(0)
    scores = rng.uniform(size=(6, 2))
    seeds = [
        (genome, EvalResult(0.5, tasks={"a": TaskScore("a", "m", a), "b": TaskScore("b", "m", b)}))
        for genome, (a, b) in zip(rng.normal(size=(6, 15)), scores, strict=True)
    ]
    plain = settings.model_copy(update={"mutation": "none"})
    before = MapElites(lower, upper, plain, seed=3, seeds=seeds).ask()  # the emitter's children
    after = MapElites(lower, upper, settings, seed=3, seeds=seeds, space=space).ask()  # type: ignore[arg-type]
    origin = space.origin()
    for child, mutated in zip(before, after, strict=True):
        np.testing.assert_array_equal(mutated[12:], child[12:])  # the bias is left alone
        u, s, vh = np.linalg.svd((child[:12] - origin[:12]).reshape(4, 3))  # the child's task vector
        top = np.outer(u[:, 0], vh[0])
        change = (mutated[:12] - child[:12]).reshape(4, 3)
        gain = float(np.sum(change * top)) / s[0]
        np.testing.assert_allclose(change, gain * s[0] * top, atol=1e-9)  # rank 1, along the top direction
        assert 0.0 <= gain < 0.5


def test_svd_mutation_needs_a_space_of_whole_tensors() -> None:
    from evomerge.errors import ConfigError

    settings = MapElitesSettings(mutation="svd")
    with pytest.raises(ConfigError, match=r"optimizer.mutation: 'svd' .*search.space: weights"):
        settings.check_space(object())  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"optimizer.mutation: 'svd'"):
        MapElites(np.zeros(3), np.ones(3), settings, seed=0)
