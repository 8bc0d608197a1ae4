"""The evolve loop with a synthetic fitness: budget, store, failures, resume after kill -9."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from evomerge.backends.base import FunctionBackend
from evomerge.errors import OutputExistsError
from evomerge.runs import loop
from evomerge.runs.loop import candidate_seed, evolve, resume
from evomerge.runs.store import RunStore
from evomerge.search.registry import optimizer_names
from evomerge.zoo.random_models import FamilySpec, build_family

from .fake_problem import make_config, optimizer_block, quadratic_backend

HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return build_family(tmp_path_factory.mktemp("loop") / "family", FamilySpec())


def stored(run_dir: Path) -> list[tuple[int, int, list[float], float | None, str | None]]:
    with RunStore.in_dir(run_dir) as store:
        return [
            (e.generation, e.index, e.genome.tolist(), e.result.score, e.result.error)
            for e in store.evaluations()
        ]


def test_runs_to_budget_and_improves(tmp_path: Path, family: dict[str, Path]) -> None:
    config = make_config(tmp_path, family, budget={"max_evaluations": 40})
    summary = evolve(config, backend=quadratic_backend(config.search_space()))
    assert summary.evaluations == 40 and summary.generations == 10 and summary.stopped_by == "max_evaluations"
    rows = stored(summary.run_dir)
    assert [(g, i) for g, i, *_ in rows] == [(g, i) for g in range(10) for i in range(4)]
    first, last = max(r[3] for r in rows[:4]), summary.best.score  # type: ignore[union-attr]
    assert last > first
    with RunStore.in_dir(summary.run_dir) as store:
        assert store.last_checkpoint().generation == 10  # type: ignore[union-attr]
        assert all(e.seed == candidate_seed(3, e.generation, e.index) for e in store.evaluations())


def test_patience_stops_a_run_whose_best_stopped_improving(tmp_path: Path, family: dict[str, Path]) -> None:
    config = make_config(tmp_path, family, budget={"max_evaluations": 40, "patience": 8})
    summary = evolve(config, backend=FunctionBackend(lambda recipe, seed: 0.5))  # a plateau from the start
    # The first evaluation stays the best (ties go to the first asked): 11 evaluations after it by the
    # end of generation 2, checked between generations.
    assert summary.stopped_by == "patience" and summary.evaluations == 12
    improving = make_config(tmp_path / "improving", family, budget={"max_evaluations": 40, "patience": 8})
    calls = iter(range(1000))
    summary = evolve(improving, backend=FunctionBackend(lambda recipe, seed: float(next(calls))))
    assert summary.stopped_by == "max_evaluations" and summary.evaluations == 40


def test_budget_can_end_inside_a_generation(tmp_path: Path, family: dict[str, Path]) -> None:
    config = make_config(tmp_path, family, budget={"max_evaluations": 6})
    summary = evolve(config, backend=quadratic_backend(config.search_space()))
    assert summary.evaluations == 6 and summary.generations == 1


def test_failed_and_nan_candidates_are_recorded_and_the_run_goes_on(
    tmp_path: Path, family: dict[str, Path]
) -> None:
    config = make_config(tmp_path, family, budget={"max_evaluations": 12})
    space = config.search_space()
    good = quadratic_backend(space, fail_index=3)
    calls = {"n": 0}

    def fitness(recipe, seed):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        return float("nan") if calls["n"] == 5 else good.function(recipe, seed)

    summary = evolve(config, backend=FunctionBackend(fitness))
    rows = stored(summary.run_dir)
    assert len(rows) == 12
    assert "candidate blew up" in (rows[2][4] or "")
    assert "non-finite" in (rows[4][4] or "")
    assert summary.best is not None and summary.best.result.ok


def test_wall_time_budget(tmp_path: Path, family: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    # A fake clock that advances 0.1 s per evaluation, so the test is exact however loaded the machine is.
    now = {"t": 1000.0}
    monkeypatch.setattr(loop, "_now", lambda: now["t"])
    config = make_config(tmp_path, family, budget={"max_wall_seconds": 0.5})
    good = quadratic_backend(config.search_space())

    def fitness(recipe, seed):  # type: ignore[no-untyped-def]
        now["t"] += 0.1
        return good.function(recipe, seed)

    summary = evolve(config, backend=FunctionBackend(fitness))
    assert summary.stopped_by == "max_wall_seconds"
    assert summary.evaluations == 5 and summary.generations == 1
    # The store keeps the 0.5 s spent (after every committed batch, not only per generation), so a
    # resume with the same budget evaluates nothing more.
    resumed = resume(summary.run_dir, backend=FunctionBackend(fitness))
    assert resumed.stopped_by == "max_wall_seconds" and resumed.evaluations == 5


def test_resume_continues_with_a_bigger_budget_like_one_long_run(
    tmp_path: Path, family: dict[str, Path]
) -> None:
    short = make_config(tmp_path / "a", family, budget={"max_evaluations": 10})
    evolve(short, backend=quadratic_backend(short.search_space()))
    resumed = resume(short.out, backend=quadratic_backend(short.search_space()), max_evaluations=24)
    long = make_config(tmp_path / "b", family, budget={"max_evaluations": 24})
    straight = evolve(long, backend=quadratic_backend(long.search_space()))
    assert stored(resumed.run_dir) == stored(straight.run_dir)


def test_out_dir_with_a_different_run_is_refused(tmp_path: Path, family: dict[str, Path]) -> None:
    config = make_config(tmp_path, family, budget={"max_evaluations": 4})
    evolve(config, backend=quadratic_backend(config.search_space()))
    other = make_config(tmp_path, family, budget={"max_evaluations": 4}, seed=99)
    with pytest.raises(OutputExistsError, match=r"different evolve run.*--force.*evomerge resume"):
        evolve(other, backend=quadratic_backend(other.search_space()))
    summary = evolve(other, backend=quadratic_backend(other.search_space()), force=True)
    assert summary.evaluations == 4
    with RunStore.in_dir(summary.run_dir) as store:
        assert store.run_config()["seed"] == 99  # type: ignore[index]


def test_a_run_whose_stored_config_no_longer_loads_is_replaced_only_with_force(
    tmp_path: Path, family: dict[str, Path]
) -> None:
    config = make_config(tmp_path, family, budget={"max_evaluations": 4})
    evolve(config, backend=quadratic_backend(config.search_space()))
    (config.out / "evolve.yaml").write_text("models: [only-one]\n")  # edited, or from another version
    with pytest.raises(OutputExistsError, match="different evolve run"):
        evolve(config, backend=quadratic_backend(config.search_space()))
    summary = evolve(config, backend=quadratic_backend(config.search_space()), force=True)
    assert summary.evaluations == 4


def test_out_dir_that_is_not_a_run_is_never_deleted(tmp_path: Path, family: dict[str, Path]) -> None:
    config = make_config(tmp_path, family)
    config.out.mkdir(parents=True)
    (config.out / "precious.txt").write_text("keep me")
    for force in (False, True):
        with pytest.raises(OutputExistsError, match="not an evomerge run dir"):
            evolve(config, backend=quadratic_backend(config.search_space()), force=force)
    assert (config.out / "precious.txt").read_text() == "keep me"


def _script(command: str, root: Path, family: dict[str, Path], delay: float, optimizer: str) -> list[str]:
    return [
        sys.executable,
        str(HERE / "fake_problem.py"),
        command,
        str(root),
        str(family["base"].parent),
        str(delay),
        optimizer,
    ]


def _count(run_dir: Path) -> int:
    try:
        with sqlite3.connect(run_dir / "run.sqlite") as db:
            return int(db.execute("SELECT COUNT(*) FROM evaluations").fetchone()[0])
    except sqlite3.Error:
        return 0


def test_warm_start_evaluates_each_source_then_starts_at_the_best(
    tmp_path: Path, family: dict[str, Path]
) -> None:
    optimizer = {"name": "cma-es", "population_size": 4, "sigma0": 0.05, "start": "best-source"}
    config = make_config(tmp_path, family, optimizer=optimizer, budget={"max_evaluations": 6})
    space = config.search_space()
    evolve(config, backend=quadratic_backend(space))
    rows = stored(config.out)
    assert [(g, i) for g, i, *_ in rows] == [(-1, 0), (-1, 1), (0, 0), (0, 1), (0, 2), (0, 3)]
    sources = space.source_genomes()
    np.testing.assert_array_equal(np.array([rows[0][2], rows[1][2]]), sources)
    best = sources[int(np.argmax([rows[0][3], rows[1][3]]))]
    first_generation = np.array([row[2] for row in rows[2:]])
    assert np.abs(first_generation - best).max() < 0.3  # sampled around the best source, sigma 0.05


@pytest.mark.parametrize("start", ["best-source", "best-known"])
@pytest.mark.parametrize("crash_at", [1, 2, 3, 7])
def test_crash_in_the_warm_start_then_resume_equals_an_uninterrupted_run(
    tmp_path: Path, family: dict[str, Path], crash_at: int, start: str
) -> None:
    optimizer = {"name": "cma-es", "population_size": 4, "start": start}
    config = make_config(tmp_path / "crashed", family, optimizer=optimizer, budget={"max_evaluations": 10})
    space = config.search_space()
    good = quadratic_backend(space)
    calls = {"n": 0}

    def crashing(recipe, seed):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] == crash_at:
            raise Crash
        return good.function(recipe, seed)

    with pytest.raises(Crash):
        evolve(config, backend=FunctionBackend(crashing))
    resume(config.out, backend=quadratic_backend(space))
    straight = make_config(tmp_path / "straight", family, optimizer=optimizer, budget={"max_evaluations": 10})
    evolve(straight, backend=quadratic_backend(space))
    assert stored(config.out) == stored(straight.out)
    assert len(stored(config.out)) == 10


class Crash(BaseException):
    """Escapes every `except Exception`, like a kill would: the loop stops where it is."""


@pytest.mark.parametrize("crash_at", [1, 4, 7, 13])
def test_crash_anywhere_then_resume_equals_an_uninterrupted_run(
    tmp_path: Path, family: dict[str, Path], crash_at: int
) -> None:
    config = make_config(tmp_path / "crashed", family)
    space = config.search_space()
    good = quadratic_backend(space)
    calls = {"n": 0}

    def crashing(recipe, seed):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] == crash_at:
            raise Crash
        return good.function(recipe, seed)

    with pytest.raises(Crash):
        evolve(config, backend=FunctionBackend(crashing))
    assert len(stored(config.out)) == crash_at - 1
    resume(config.out, backend=quadratic_backend(space))
    straight = make_config(tmp_path / "straight", family)
    evolve(straight, backend=quadratic_backend(space))
    assert stored(config.out) == stored(straight.out)


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", optimizer_names())
def test_kill_9_mid_generation_then_resume_equals_an_uninterrupted_run(
    tmp_path: Path, family: dict[str, Path], optimizer: str
) -> None:
    env = {**os.environ, "PYTHONPATH": str(HERE.parent.parent / "src"), "OMP_NUM_THREADS": "1"}
    killed_root = tmp_path / "killed"
    process = subprocess.Popen(_script("evolve", killed_root, family, 0.15, optimizer), env=env, cwd=HERE)
    deadline = time.monotonic() + 60
    while _count(killed_root / "run") < 6 and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    killed_at = _count(killed_root / "run")
    assert 6 <= killed_at < 20, "the run must be killed part-way"
    done = subprocess.run(
        _script("resume", killed_root, family, 0.0, optimizer), env=env, cwd=HERE, timeout=120
    )
    assert done.returncode == 0
    config = make_config(tmp_path / "straight", family, optimizer=optimizer_block(optimizer))
    evolve(config, backend=quadratic_backend(config.search_space()))
    resumed_rows, straight_rows = stored(killed_root / "run"), stored(config.out)
    assert len(resumed_rows) == 20
    assert resumed_rows == straight_rows
    with RunStore.in_dir(killed_root / "run") as a, RunStore.in_dir(config.out) as b:
        assert a.best().recipe == b.best().recipe  # type: ignore[union-attr]
        assert np.array_equal(a.best().genome, b.best().genome)  # type: ignore[union-attr]
        assert [(s, e.key) for s, e in a.elites()] == [(s, e.key) for s, e in b.elites()]
