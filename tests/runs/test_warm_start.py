"""The best-known warm start: a run never ends below the sources and default merges it reports (on dev).

The landscape is the issue's case: a plateau around each source (small steps change nothing, as with
accuracy near one specialist) and the optimum at the uniform merge. Started at the best source without
restarts (the old demo's settings), CMA-ES stalls on the plateau; the new default finds the optimum.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from evomerge.backends.base import FunctionBackend
from evomerge.eval.result import EvalResult
from evomerge.runs.config import EvolveConfig
from evomerge.runs.loop import evolve, warm_start_points
from evomerge.runs.outputs import ResultRow, shortfall_line, shortfalls
from evomerge.runs.store import RunStore
from evomerge.zoo.random_models import FamilySpec, build_family

from .fake_problem import write_task

PLATEAU, PEAK = 0.45, 0.8


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return build_family(tmp_path_factory.mktemp("warm") / "family", FamilySpec())


def config(
    root: Path, family: dict[str, Path], optimizer: dict[str, Any], evaluations: int = 60
) -> EvolveConfig:
    task = write_task(root / "tasks" / "dev.jsonl")
    return EvolveConfig.from_dict(
        {
            "base_model": str(family["base"]),
            "models": [str(family["ft0"]), str(family["ft1"])],
            "merge_method": "task_arithmetic",
            "search": {"granularity": "model", "parameters": {"weight": [0.0, 1.0]}},
            "optimizer": {"name": "cma-es", "population_size": 4, **optimizer},
            "budget": {"max_evaluations": evaluations},
            "fitness": [{"name": "toy", "dev": str(task), "test": str(task)}],
            "out": str(root / "run"),
        }
    )


def effective_weights(recipe: Any) -> np.ndarray:
    """Task-arithmetic weights of any recipe of the two sources (linear: normalised; others: as written)."""
    weights = np.array([float(m.parameters["weight"]) for m in recipe.models])
    if recipe.merge_method == "linear":
        weights = weights / weights.sum()
    if len(weights) == 1:  # a source alone
        return np.array([1.0, 0.0]) if recipe.models[0].model.endswith("ft0") else np.array([0.0, 1.0])
    return weights


def plateau_landscape(recipe: Any, seed: int) -> EvalResult:
    weights = effective_weights(recipe)
    if recipe.merge_method in ("ties", "dare_ties"):
        weights = weights * 0.4  # sparsified: far from both plateaus and from the peak
    peak = np.linalg.norm(weights - 0.5)
    near_source = min(np.linalg.norm(weights - np.array(s)) for s in ([1.0, 0.0], [0.0, 1.0]))
    if peak < 0.2:
        return EvalResult(PEAK - peak)
    return EvalResult(PLATEAU if near_source < 0.3 else 0.0)


def test_best_source_without_restarts_stalls_on_the_plateau(tmp_path: Path, family: dict[str, Path]) -> None:
    old = config(tmp_path, family, {"start": "best-source", "restarts": "none", "sigma0": 0.02})
    summary = evolve(old, backend=FunctionBackend(plateau_landscape))
    assert summary.best is not None and summary.best.score == PLATEAU


def test_the_default_finds_the_optimum_and_never_ends_below_a_baseline(
    tmp_path: Path, family: dict[str, Path]
) -> None:
    new = config(tmp_path, family, {"sigma0": 0.02})  # start: best-known, restarts: ipop by default
    assert new.optimizer.start == "best-known"
    summary = evolve(new, backend=FunctionBackend(plateau_landscape))
    assert summary.best is not None and summary.best.score == pytest.approx(PEAK)
    with RunStore.in_dir(summary.run_dir) as store:
        warm = [e for e in store.evaluations() if e.generation == -1]
    assert all(summary.best.score >= e.score for e in warm)


def test_restarts_leave_a_plateau_even_without_the_centre(tmp_path: Path, family: dict[str, Path]) -> None:
    """best-source start (no centre evaluated), the default step size: IPOP restarts on stagnation find
    the peak in every seed, where one CMA-ES run stays on the plateau in some."""

    def best(restarts: str, seed: int) -> float:
        optimizer = {"start": "best-source", "restarts": restarts, "seed": seed}  # default plateau criterion
        run = config(tmp_path / f"{restarts}{seed}", family, optimizer, 120)
        summary = evolve(run, backend=FunctionBackend(plateau_landscape))
        assert summary.best is not None
        return summary.best.score

    assert all(best("ipop", seed) > PLATEAU for seed in range(3))
    assert any(best("none", seed) == PLATEAU for seed in range(3))


def test_the_warm_start_evaluates_sources_defaults_and_centre(
    tmp_path: Path, family: dict[str, Path]
) -> None:
    run = config(tmp_path, family, {})
    points = warm_start_points(run, run.search_space())
    labels = [p.label for p in points]
    assert labels == [
        "source ft0",
        "source ft1",
        "default linear average",
        "default task arithmetic (weight 1)",
        "default ties (weight 1, density 0.5)",
        "default dare_ties (weight 1, density 0.5)",
        "centre of the search space",
    ]
    in_space = {p.label: p.genome.tolist() for p in points if p.genome.size}
    # sources alone are task arithmetic with weights (1, 0) and (0, 1); weight 1 for both is in [0, 1];
    # the linear average, TIES and DARE-TIES are other methods: evaluated, but they seed nothing.
    assert in_space == {
        "source ft0": [1.0, 0.0],
        "source ft1": [0.0, 1.0],
        "default task arithmetic (weight 1)": [1.0, 1.0],
        "centre of the search space": [0.5, 0.5],
    }


def test_a_baseline_outside_the_space_can_be_the_runs_best(tmp_path: Path, family: dict[str, Path]) -> None:
    def linear_wins(recipe: Any, seed: int) -> float:
        return 1.0 if recipe.merge_method == "linear" and len(recipe.models) == 2 else 0.1

    summary = evolve(config(tmp_path, family, {}, 12), backend=FunctionBackend(linear_wins))
    assert summary.best is not None and summary.best.label == "default linear average"
    assert summary.best.genome.size == 0


def row(name: str, kind: str, score: float) -> ResultRow:
    return ResultRow(name, kind, score)


def test_shortfalls_name_what_beat_the_runs_best_on_test() -> None:
    rows = [
        row("evolved", "evolved", 0.45),
        row("high", "source", 0.453),
        row("low", "source", 0.30),
        row("task arithmetic (weight 1)", "baseline", 0.728),
        row("base", "base", 0.9),  # the base is context, not a baseline the run promises to beat
    ]
    assert [r.name for r in shortfalls(rows)] == ["task arithmetic (weight 1)", "high"]
    line = shortfall_line(rows)
    assert line is not None and "0.450" in line and "task arithmetic (weight 1) 0.728" in line
    assert shortfall_line([row("evolved", "evolved", 0.9), *rows[1:4]]) is None
