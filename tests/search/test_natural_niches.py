"""Natural niches: fitness sharing, attraction, split-point SLERP and replacement on hand-computed cases;
the optimiser's archive, seeds, scratch start, fallbacks and pickled continuation."""

from __future__ import annotations

import math
import pickle
from pathlib import Path

import numpy as np
import pytest

from evomerge.errors import ConfigError
from evomerge.eval.result import EvalResult, TaskScore
from evomerge.search.natural_niches import (
    NaturalNiches,
    NaturalNichesSettings,
    attraction,
    example_scores,
    shared_fitness,
    slerp,
    split_slerp,
    worst_to_replace,
)
from evomerge.search.registry import parse_settings

EPS = 1e-12
ONES = np.ones(3)
# Member 0 solves examples 0 and 1, member 1 only example 0, member 2 only example 2: z = [2, 1, 1].
S = np.array([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])


def result(per_example: list[float], task: str = "t") -> EvalResult:
    score = float(np.mean(per_example))
    return EvalResult(score, {task: TaskScore(task, "accuracy", score, list(per_example), len(per_example))})


# --- the equations ------------------------------------------------------------------------------------
def test_shared_fitness_by_hand() -> None:
    # f_i = sum_j c_j s_ij / (z_j^alpha + eps)
    np.testing.assert_allclose(shared_fitness(S, ONES, 1.0, EPS), [1 / 2 + 1, 1 / 2, 1])
    np.testing.assert_allclose(shared_fitness(S, ONES, 2.0, EPS), [1 / 4 + 1, 1 / 4, 1])
    np.testing.assert_allclose(shared_fitness(S, np.array([2.0, 1, 1]), 1.0, EPS), [2, 1, 1])
    np.testing.assert_allclose(shared_fitness(S, ONES, 0.0, EPS), S.sum(axis=1))  # no sharing: totals


def test_an_example_nobody_solves_adds_nothing() -> None:
    scores = np.array([[1.0, 0.0], [1.0, 0.0]])
    np.testing.assert_allclose(shared_fitness(scores, np.ones(2), 1.0, 1e-8), [0.5, 0.5], rtol=1e-6)


def test_attraction_by_hand() -> None:
    # g(A, B) = sum_j c_j / (z_j + eps) max(s_Bj - s_Aj, 0)
    np.testing.assert_allclose(attraction(S, ONES, 1, EPS), [1.0, 0.0, 1.0])  # A solves example 0 only
    np.testing.assert_allclose(attraction(S, ONES, 0, EPS), [0.0, 0.0, 1.0])  # member 1 adds nothing to 0
    np.testing.assert_allclose(attraction(S, np.array([1.0, 3, 1]), 2, EPS), [1 / 2 + 3, 1 / 2, 0.0])


def test_slerp_on_tiny_vectors() -> None:
    a, b = np.array([1.0, 0.0]), np.array([0.0, 1.0])
    np.testing.assert_allclose(slerp(0.5, a, b), [math.sqrt(0.5), math.sqrt(0.5)])
    np.testing.assert_allclose(slerp(0.25, a, b), [math.cos(math.pi / 8), math.sin(math.pi / 8)])
    np.testing.assert_allclose(slerp(0.0, a, b), a)
    np.testing.assert_allclose(slerp(1.0, a, b), b)
    np.testing.assert_allclose(slerp(0.5, a, 2 * a), [1.5, 0.0])  # parallel: linear
    np.testing.assert_allclose(slerp(0.5, a, np.zeros(2)), [0.5, 0.0])  # a zero vector: linear


def test_the_split_point_child_mixes_each_side_the_other_way() -> None:
    a, b = np.array([1.0, 0.0, 0.0, 2.0]), np.array([0.0, 1.0, 2.0, 0.0])
    c, s = math.cos(math.pi / 8), math.sin(math.pi / 8)
    # before the split: slerp(0.25) from a to b; after it: slerp(0.75)
    np.testing.assert_allclose(split_slerp(a, b, 0.25, 2), [c, s, 2 * c, 2 * s])
    np.testing.assert_allclose(split_slerp(a, b, 0.0, 2), [1.0, 0.0, 2.0, 0.0])  # a's head, b's tail
    np.testing.assert_allclose(split_slerp(a, b, 0.25, 0), slerp(0.75, a, b))  # no head: one SLERP


def test_replacement_rule() -> None:
    archive = np.array([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    assert worst_to_replace(archive, np.array([0.0, 0.0, 1.0]), ONES, 1.0, EPS) == 1  # the worst member goes
    assert worst_to_replace(archive, np.zeros(3), ONES, 1.0, EPS) is None  # the child is the worst: dropped
    assert worst_to_replace(archive, np.array([1.0, 0.0, 0.0]), ONES, 1.0, EPS) == 1  # a tie: the member goes


def test_sharing_protects_a_unique_skill_that_plain_totals_would_drop() -> None:
    archive = np.array([[1.0, 1, 1, 0, 0], [0.0, 0, 0, 1, 1]])  # a generalist and a unique specialist
    copy = np.array([1.0, 1, 1, 0, 0])  # the generalist again
    assert worst_to_replace(archive, copy, np.ones(5), 0.0, EPS) == 1  # totals: the specialist goes
    assert worst_to_replace(archive, copy, np.ones(5), 1.0, EPS) == 0  # sharing: a generalist goes


def test_example_scores_concatenate_tasks_by_name_and_fall_back_to_the_score() -> None:
    two = EvalResult(
        0.5,
        {
            "b": TaskScore("b", "accuracy", 1.0, [1.0], 1),
            "a": TaskScore("a", "accuracy", 0.5, [0.0, 1.0], 2),
        },
    )
    values, capacity = example_scores(two)
    np.testing.assert_array_equal(values, [0.0, 1.0, 1.0])
    np.testing.assert_array_equal(capacity, [1.0, 1.0, 1.0])
    np.testing.assert_array_equal(example_scores(two, "task")[1], [0.5, 0.5, 1.0])
    values, capacity = example_scores(EvalResult(-0.25))
    np.testing.assert_array_equal(values, [-0.25])
    np.testing.assert_array_equal(capacity, [1.0])


# --- the optimiser ------------------------------------------------------------------------------------
def settings(**fields: object) -> NaturalNichesSettings:
    return NaturalNichesSettings.model_validate({"population_size": 4, **fields})


def test_seeds_fill_the_archive_and_failed_ones_stay_out() -> None:
    seeds = [
        (np.full(3, 0.1), result([1, 0, 0])),
        (np.full(3, 0.2), EvalResult.failed("boom")),
        (np.full(3, 0.3), result([0, 1, 1])),
    ]
    optimizer = NaturalNiches(np.zeros(3), np.ones(3), settings(), seed=0, seeds=seeds)
    elites = optimizer.elites()
    assert [e.niche for e in elites] == ["archive slot 0", "archive slot 1"]
    assert [e.genome[0] for e in elites] == [0.1, 0.3]  # exactly the told genomes (for the run store)
    assert elites[0].measures["shared_fitness"] == pytest.approx(1.0)


def test_a_full_archive_replaces_its_worst_member_with_a_better_child() -> None:
    seeds = [(np.full(2, 0.1), result([1, 1, 0])), (np.full(2, 0.2), result([1, 0, 0]))]
    optimizer = NaturalNiches(np.zeros(2), np.ones(2), settings(archive_size=2), seed=0, seeds=seeds)
    children = optimizer.ask()
    told = [result([0, 0, 1]), result([0, 0, 0]), EvalResult.failed("x"), result([0, 0, 0])]
    optimizer.tell(children, told)
    members = optimizer.elites()
    assert [m.genome[0] for m in members] == [0.1, children[0][0]]  # [1, 0, 0] made way for [0, 0, 1]


def test_attraction_picks_the_member_strong_where_the_first_parent_is_weak() -> None:
    seeds = [
        (np.full(2, 0.1), result([1, 1, 0, 0])),
        (np.full(2, 0.2), result([1, 0, 0, 0])),  # adds nothing to member 0
        (np.full(2, 0.3), result([0, 0, 1, 1])),  # complements member 0
    ]
    optimizer = NaturalNiches(np.zeros(2), np.ones(2), settings(), seed=0, seeds=seeds)
    scores, capacity = optimizer._scores(), optimizer._capacity()
    fitness = shared_fitness(scores, capacity, 1.0, 1e-8)
    partners = {optimizer._draw_partner(0, scores, capacity, fitness) for _ in range(50)}
    assert partners == {2}


def test_children_stay_in_the_box_as_float32() -> None:
    lower, upper = np.full(6, -0.3), np.full(6, 0.7)
    seeds = [(np.full(6, -0.3), result([1, 0])), (np.full(6, 0.7), result([0, 1]))]
    optimizer = NaturalNiches(lower, upper, settings(mutation_sigma=1.0), seed=1, seeds=seeds)
    children = optimizer.ask()
    assert np.all(children >= lower) and np.all(children <= upper)
    np.testing.assert_array_equal(children.astype(np.float32).astype(np.float64), children)


def test_from_scratch_the_first_ask_is_random_models_around_the_centre() -> None:
    optimizer = NaturalNiches(np.full(50, -1.0), np.full(50, 1.0), settings(init_sigma=0.01), seed=0)
    first = optimizer.ask()
    assert first.shape == (4, 50) and 0 < np.abs(first).max() < 0.1
    optimizer.tell(first, [result([1, 0]), result([0, 1]), result([0, 0]), result([1, 1])])
    assert len(optimizer.elites()) == 4
    assert not np.array_equal(optimizer.ask(), first)  # then children of the archive


def test_without_per_example_scores_the_score_is_one_example() -> None:
    optimizer = NaturalNiches(np.zeros(2), np.ones(2), settings(archive_size=2), seed=0)
    genomes = optimizer.ask()
    optimizer.tell(genomes, [EvalResult(-3.0), EvalResult(-1.0), EvalResult(-2.0), EvalResult(-0.5)])
    assert sorted(e.score for e in optimizer.elites()) == [-1.0, -0.5]  # the two best survive


def test_results_over_other_examples_are_refused() -> None:
    optimizer = NaturalNiches(
        np.zeros(2), np.ones(2), settings(), seed=0, seeds=[(np.zeros(2), result([1, 0]))]
    )
    children = optimizer.ask()
    with pytest.raises(ValueError, match="every evaluation of a run must score the same examples"):
        optimizer.tell(children, [result([1, 0, 1])] * 4)


def test_a_pickled_archive_continues_identically() -> None:
    rng = np.random.default_rng(0)
    seeds = [(rng.uniform(size=5), result(list(rng.integers(0, 2, size=8).astype(float)))) for _ in range(3)]
    optimizer = NaturalNiches(np.zeros(5), np.ones(5), settings(archive_size=4), seed=3, seeds=seeds)

    def evaluate(genomes: np.ndarray) -> list[EvalResult]:
        return [result(list((np.sin(np.arange(8) + 10 * g.sum()) > 0).astype(float))) for g in genomes]

    for _ in range(3):
        genomes = optimizer.ask()
        optimizer.tell(genomes, evaluate(genomes))
    copy = pickle.loads(pickle.dumps(optimizer))
    for _ in range(3):
        a, b = optimizer.ask(), copy.ask()
        np.testing.assert_array_equal(a, b)
        optimizer.tell(a, evaluate(a))
        copy.tell(b, evaluate(b))
    assert [e.genome.tolist() for e in optimizer.elites()] == [e.genome.tolist() for e in copy.elites()]


@pytest.mark.parametrize("ablation", [{"use_attraction": False}, {"use_split_point": False}])
def test_the_ablations_breed_children_too(ablation: dict[str, bool]) -> None:
    seeds = [(np.full(4, 0.2), result([1, 0])), (np.full(4, 0.8), result([0, 1]))]
    optimizer = NaturalNiches(
        np.zeros(4), np.ones(4), settings(mutation_sigma=0, **ablation), seed=0, seeds=seeds
    )
    children = optimizer.ask()
    assert children.shape == (4, 4) and np.all((children >= 0.2 - 1e-6) & (children <= 0.8 + 1e-6))


def test_settings_are_validated_with_the_field_named() -> None:
    assert parse_settings({"name": "natural-niches"}).archive_size == 10  # type: ignore[attr-defined]
    with pytest.raises(ConfigError, match=r"optimizer\.archive_size"):
        parse_settings({"name": "natural-niches", "archive_size": 1})
    with pytest.raises(ConfigError, match=r"optimizer\.alpha"):
        parse_settings({"name": "natural-niches", "alpha": -1})


# --- end to end on the digits zoo -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def digits_zoo(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    from evomerge.zoo import build

    return build("digits", tmp_path_factory.mktemp("zoo") / "digits", size="tiny", seed=0)


def digits_config(zoo, out: Path, evaluations: int, **optimizer: object):  # type: ignore[no-untyped-def]
    from evomerge.runs.config import EvolveConfig

    task = zoo.tasks["digits"]
    return EvolveConfig.from_dict(
        {
            "base_model": str(zoo.base),
            "models": [str(zoo.models["low"]), str(zoo.models["high"])],
            "search": {"space": "weights"},
            "optimizer": {"name": "natural-niches", "population_size": 4, "archive_size": 6, **optimizer},
            "budget": {"max_evaluations": evaluations},
            "fitness": [
                {"name": "digits", "dev": str(task.dev), "test": str(task.test), "metric": "accuracy"}
            ],
            "evaluation": {"device": "cpu"},
            "out": str(out),
            "seed": 1,
        }
    )


def stored(run_dir: Path) -> list[tuple[int, int, str, float]]:
    from evomerge.runs.store import RunStore, genome_text

    with RunStore.in_dir(run_dir) as store:
        return [(e.generation, e.index, genome_text(e.genome), e.score) for e in store.evaluations()]


def test_evolve_whole_digits_models_resume_and_export(digits_zoo, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from evomerge.eval.evaluator import Evaluator
    from evomerge.eval.tasks import load_task
    from evomerge.runs.loop import evolve, load_run_config, resume
    from evomerge.runs.outputs import run_elites
    from evomerge.zoo.digits import MLPClassifier

    straight = evolve(digits_config(digits_zoo, tmp_path / "straight", 31))
    evolve(digits_config(digits_zoo, tmp_path / "killed", 17))  # 7 warm start + 2.5 generations of 4
    resumed = resume(tmp_path / "killed", max_evaluations=31)
    assert stored(straight.run_dir) == stored(resumed.run_dir)  # the archive came back from the checkpoint

    rows = stored(straight.run_dir)
    sources = [score for generation, index, _, score in rows if generation == -1 and index < 2]
    assert straight.best is not None and straight.best.score >= max(sources)
    elites = [e for e in run_elites(straight.run_dir) if e.niche.startswith("archive slot")]
    assert 2 <= len(elites) <= 6  # the archive, found in the store by genome

    best = straight.best
    space = load_run_config(straight.run_dir).search_space()
    model = MLPClassifier.from_pretrained(space.export(best.recipe, tmp_path / "best", seed=best.seed))
    task = load_task(digits_zoo.tasks["digits"].dev, metric="accuracy", name="digits")
    assert Evaluator([task]).evaluate(model).score == pytest.approx(best.score)


def test_a_whole_model_run_writes_every_output(digits_zoo, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """The results table, the best model with its card, report.html and export work for bred models."""
    from evomerge.runs.finalize import finalize
    from evomerge.runs.loop import evolve
    from evomerge.runs.outputs import BEST_MERGEKIT, export_elite, read_results, run_elites

    summary = evolve(digits_config(digits_zoo, tmp_path / "run", 19))
    written = finalize(summary.run_dir)
    rows = read_results(summary.run_dir)
    assert rows is not None and rows[0].kind == "evolved" and rows[0].error is None
    assert {"digits:low", "digits:high"} <= set(rows[0].groups)  # the task's lines carry their half
    card = (written["model"] / "README.md").read_text()
    best = summary.best
    assert best is not None
    if best.genome.size:  # a bred whole model: no merge recipe to write, the card says why
        assert "recipe" not in written and not (summary.run_dir / BEST_MERGEKIT).exists()
        assert "no merge recipe rebuilds it" in card and "f32:" not in card
    assert "evomerge export" in written["report"].read_text() or best.genome.size == 0
    bred = next(e for e in run_elites(summary.run_dir) if e.evaluation.genome.size)
    exported = export_elite(summary.run_dir, bred.id, tmp_path / "exported")
    assert (exported / "model.safetensors").is_file() and "natural-niches" in (
        exported / "README.md"
    ).read_text()


def test_cma_es_over_a_whole_model_is_refused_before_any_evaluation(digits_zoo, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from evomerge.errors import ConfigError
    from evomerge.runs.loop import evolve

    config = digits_config(digits_zoo, tmp_path / "run", 10)
    cma = config.model_copy(update={"optimizer": parse_cma()})
    with pytest.raises(ConfigError, match=r"cma-es keeps a \d+ x \d+ covariance.*natural-niches"):
        evolve(cma)
    assert not (tmp_path / "run").exists()


def parse_cma():  # type: ignore[no-untyped-def]
    from evomerge.search.registry import parse_settings

    return parse_settings({"name": "cma-es"})
