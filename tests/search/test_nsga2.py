"""NSGA-II through pymoo: hypervolume, a known Pareto front, objectives, failures, seeds and determinism."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

pytest.importorskip("pymoo")

from evomerge.errors import ConfigError
from evomerge.eval.result import EvalResult, TaskScore
from evomerge.search.base import Seeds
from evomerge.search.nsga2 import NSGA2Optimizer, NSGA2Settings, dominates, hypervolume
from evomerge.search.optimizers import load_state, save_state
from evomerge.search.registry import parse_settings

DIM = 3
LOWER, UPPER = np.zeros(DIM), np.ones(DIM)
OBJECTIVES = ["left", "right"]


def scored(left: float, right: float, **behaviour: float) -> EvalResult:
    tasks = {"left": TaskScore("left", "toy", left), "right": TaskScore("right", "toy", right)}
    return EvalResult(score=(left + right) / 2, tasks=tasks, behaviour=dict(behaviour))


def bowed(genomes: np.ndarray) -> list[EvalResult]:
    """left = x0, right = 1 - x0^2 - |x_rest - 0.5|^2: the Pareto set is x_rest = 0.5, the front
    right = 1 - left^2 for left in [0, 1], whose hypervolume above (0, 0) is 2/3."""
    rest = np.sum((genomes[:, 1:] - 0.5) ** 2, axis=1)
    return [scored(x[0], 1 - x[0] ** 2 - r) for x, r in zip(genomes, rest, strict=True)]


def with_failures(genomes: np.ndarray) -> list[EvalResult]:
    """`bowed`, but every genome whose first gene is below 0.2 fails."""
    return [
        EvalResult.failed("boom") if x[0] < 0.2 else r for x, r in zip(genomes, bowed(genomes), strict=True)
    ]


def nsga2(population_size: int = 8, seed: int = 0, seeds: Seeds = ()) -> NSGA2Optimizer:
    settings = NSGA2Settings(objectives=OBJECTIVES, population_size=population_size)
    return NSGA2Optimizer(LOWER, UPPER, settings, seed=seed, seeds=seeds)


def front_values(optimizer: NSGA2Optimizer) -> np.ndarray:
    return np.array([[elite.measures[name] for name in OBJECTIVES] for elite in optimizer.elites()])


# --- hypervolume --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("points", "reference", "expected"),
    [
        ([[2, 3]], [0, 0], 6.0),
        ([[1, 3], [3, 1]], [0, 0], 5.0),  # two boxes of 3 overlapping in 1
        ([[1, 3], [3, 1], [1, 1]], [0, 0], 5.0),  # a dominated point adds nothing
        ([[3, 2], [2, 3]], [1, 1], 3.0),  # the reference moves the origin
        ([[1, 3], [-1, 5], [3, 0]], [0, 0], 3.0),  # points not above the reference add nothing
        ([[1, 2, 3]], [0, 0, 0], 6.0),
        ([[2, 1, 1], [1, 2, 1]], [0, 0, 0], 3.0),
    ],
)
def test_hypervolume_of_hand_computed_fronts(
    points: list[list[float]], reference: list[float], expected: float
) -> None:
    assert hypervolume(np.array(points, float), np.array(reference, float)) == pytest.approx(expected)


def test_hypervolume_of_nothing_is_zero_and_shapes_are_checked() -> None:
    assert hypervolume(np.zeros((0, 2)), np.zeros(2)) == 0.0
    with pytest.raises(ValueError, match=r"expected points \(N, M\) and reference \(M,\)"):
        hypervolume(np.zeros((3, 2)), np.zeros(3))


def random_front(evaluations: int) -> np.ndarray:
    """The first front of `evaluations` uniform samples of `bowed`: what NSGA-II must beat."""
    told = bowed(np.random.default_rng(0).uniform(size=(evaluations, DIM)))
    values = [np.array([r.tasks[n].score for n in OBJECTIVES]) for r in told]
    return np.array([v for v in values if not any(dominates(w, v) for w in values)])


# --- search -------------------------------------------------------------------------------------------
def test_nsga2_approaches_a_known_pareto_front() -> None:
    optimizer = nsga2(population_size=16)
    for _ in range(25):  # 400 evaluations
        genomes = optimizer.ask()
        optimizer.tell(genomes, bowed(genomes))
    front = front_values(optimizer)
    assert hypervolume(front, np.zeros(2)) > 0.97 * (2 / 3)
    assert hypervolume(front, np.zeros(2)) > hypervolume(random_front(400), np.zeros(2)) + 0.01
    assert np.max(np.abs(front[:, 1] - (1 - front[:, 0] ** 2))) < 0.1  # every member near the true front
    assert front[:, 0].min() < 0.1 and front[:, 0].max() > 0.9  # and spread along all of it


def test_elites_are_the_first_front_of_everything_told() -> None:
    optimizer, told = nsga2(), []
    for _ in range(6):
        genomes = optimizer.ask()
        results = with_failures(genomes)
        optimizer.tell(genomes, results)
        told += [
            (g, np.array([r.tasks[n].score for n in OBJECTIVES]))
            for g, r in zip(genomes, results, strict=True)
            if r.ok
        ]
    front = [(g, v) for g, v in told if not any(dominates(w, v) for _, w in told)]
    assert [elite.genome.tolist() for elite in optimizer.elites()] == [g.tolist() for g, _ in front]
    assert {elite.niche for elite in optimizer.elites()} == {"front 0"}


def test_a_plateau_keeps_one_genome_per_point_of_the_front() -> None:
    optimizer = nsga2(population_size=4)
    for _ in range(3):
        genomes = optimizer.ask()
        optimizer.tell(genomes, [scored(0.5, 0.5)] * len(genomes))
    assert len(optimizer.elites()) == 1  # the first told, as a single-objective optimiser keeps ties


def test_failed_results_never_join_the_front_even_when_alone() -> None:
    optimizer = nsga2(population_size=4)
    genomes = optimizer.ask()
    optimizer.tell(genomes, [EvalResult.failed("boom")] * 4)
    assert optimizer.elites() == []
    genomes = optimizer.ask()  # pymoo still breeds from an all-infeasible population
    told = [EvalResult.failed("boom"), scored(0.2, 0.9), EvalResult(float("nan")), scored(0.1, 0.1)]
    optimizer.tell(genomes, told)
    assert [elite.measures for elite in optimizer.elites()] == [{"left": 0.2, "right": 0.9}]


def test_seeds_open_the_first_population_and_are_not_asked_again() -> None:
    seeds = [(np.full(DIM, 0.5), scored(0.5, 0.75)), (np.full(DIM, 0.9), scored(0.9, 0.1))]
    optimizer = nsga2(population_size=6, seeds=seeds)
    assert len(optimizer.elites()) == 2  # told seeds count, each on the front
    first = optimizer.ask()
    assert first.shape == (4, DIM)  # only the uniform rest of the first population
    assert not any(np.array_equal(genome, seed) for genome in first for seed, _ in seeds)
    optimizer.tell(first, bowed(first))
    assert optimizer.ask().shape == (6, DIM)


def test_seeds_that_fill_the_population_are_bred_at_once() -> None:
    seeds = [(np.full(DIM, 0.1 * (i + 1)), scored(0.1 * i, 1 - 0.1 * i)) for i in range(6)]
    genomes = nsga2(population_size=4, seeds=seeds).ask()
    assert genomes.shape == (4, DIM)


def test_a_restored_pickle_asks_the_same_genomes_through_failures_and_seeds() -> None:
    seeds = [(np.full(DIM, 0.5), scored(0.5, 0.75))]
    optimizer = nsga2(population_size=6, seed=3, seeds=seeds)
    for _ in range(4):
        genomes = optimizer.ask()
        optimizer.tell(genomes, with_failures(genomes))
    copy = load_state(save_state(optimizer))
    for _ in range(5):
        a, b = optimizer.ask(), copy.ask()
        np.testing.assert_array_equal(a, b)
        optimizer.tell(a, with_failures(a))
        copy.tell(b, with_failures(b))
    assert [e.genome.tolist() for e in optimizer.elites()] == [e.genome.tolist() for e in copy.elites()]


def test_the_seed_alone_decides_every_generation() -> None:
    """No pymoo operator may draw from fresh entropy: two runs with one seed agree throughout."""
    runs = [nsga2(seed=5), nsga2(seed=5)]
    for _ in range(8):
        asked = [optimizer.ask() for optimizer in runs]
        np.testing.assert_array_equal(asked[0], asked[1])
        for optimizer, genomes in zip(runs, asked, strict=True):
            optimizer.tell(genomes, with_failures(genomes))
    assert not np.array_equal(nsga2(seed=6).ask(), nsga2(seed=5).ask())


# --- objectives ---------------------------------------------------------------------------------------
def test_behaviour_and_score_objectives_are_read_from_the_result() -> None:
    settings = NSGA2Settings(objectives=["score", "behaviour:size"], population_size=4)
    optimizer = NSGA2Optimizer(LOWER, UPPER, settings, seed=0)
    genomes = optimizer.ask()
    told = [
        scored(0.1, 0.3, size=5.0),
        scored(0.4, 0.4, size=1.0),
        scored(0.2, 0.2, size=2.0),
        scored(0, 0, size=0),
    ]
    optimizer.tell(genomes, told)
    assert sorted(tuple(e.measures.values()) for e in optimizer.elites()) == [(0.2, 5.0), (0.4, 1.0)]


def test_a_behaviour_the_evaluation_does_not_report_is_a_located_error() -> None:
    settings = NSGA2Settings(objectives=["left", "behaviour:size"], population_size=4)
    optimizer = NSGA2Optimizer(LOWER, UPPER, settings, seed=0)
    genomes = optimizer.ask()
    with pytest.raises(ConfigError, match=r"optimizer\.objectives: 'behaviour:size'.*reports \['depth'\]"):
        optimizer.tell(genomes, [scored(0.1, 0.1, depth=1.0)] * 4)


@pytest.mark.parametrize(
    "objectives",
    [[], ["left"], ["left", "left"], ["left", "behaviour:"]],
    ids=["none", "one", "twice", "no key"],
)
def test_fewer_than_two_objectives_are_refused(objectives: list[str]) -> None:
    with pytest.raises(ConfigError, match=r"optimizer\.objectives: "):
        parse_settings({"name": "nsga2", "objectives": objectives})


def test_check_tasks_refuses_names_that_are_not_fitness_tasks() -> None:
    settings = NSGA2Settings(objectives=["left", "score", "behaviour:size"])
    settings.check_tasks(["left", "right"])  # tasks, the overall score, and any behaviour key pass
    with pytest.raises(ConfigError, match=r"optimizer\.objectives: \['lft'\] name no fitness task.*'left'"):
        NSGA2Settings(objectives=["lft", "right"]).check_tasks(["left", "right"])


def test_nsga2_without_pymoo_is_refused_with_the_extra_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "pymoo" else find_spec(name, *a)
    )
    with pytest.raises(
        ConfigError, match=r"optimizer: 'nsga2' needs pymoo.*pip install 'evomerge\[search\]'"
    ):
        parse_settings({"name": "nsga2", "objectives": OBJECTIVES})
