"""The Ray backend on a local Ray instance the tests start: same results as local, faults, every optimiser.

Marked `ray` (`make test-ray`): each backend starts its worker processes, a few seconds each.
"""

from __future__ import annotations

import functools
import logging
import os
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from evomerge.backends.base import FunctionBackend
from evomerge.backends.ray import RayBackend, RaySettings
from evomerge.errors import EvaluationError
from evomerge.runs import loop
from evomerge.runs.config import EvolveConfig
from evomerge.runs.loop import Progress, evolve, resume
from evomerge.runs.store import RunStore
from evomerge.search.registry import optimizer_names

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.ray

# Workers of half a CPU: the shared pool (2 workers) and a test's own pool fit in ray.init(num_cpus=2).
WORKER = {"name": "ray", "workers": 2, "num_cpus": 0.5}


@pytest.fixture(scope="module", autouse=True)
def ray_instance() -> Iterator[None]:
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import the tests
    ray.init(
        num_cpus=2,
        object_store_memory=80 * 1024**2,
        include_dashboard=False,
        logging_level=logging.WARNING,
        log_to_driver=False,
    )
    yield
    ray.shutdown()


def make_config(
    root: Path, family: dict[str, Path], optimizer: dict[str, Any], *, backend: Any = "local", **extra: Any
) -> EvolveConfig:
    data: dict[str, Any] = {
        "base_model": str(family["base"]),
        "models": [str(family["ft0"]), str(family["ft1"])],
        "merge_method": "ties",
        "search": {"granularity": "model", "parameters": {"weight": [0, 1], "density": [0.3, 1]}},
        "optimizer": {"population_size": 4, "start": "center", **optimizer},
        "budget": {"max_evaluations": 10},
        # Two tasks (the same file): map-elites (CycleQD) and nsga2 need two; perplexity scores are exact.
        "fitness": [
            {"name": name, "dev": str(family["dev"]), "metric": "perplexity"} for name in ("sums", "again")
        ],
        "seed": 5,
        "out": str(root / "run"),
        "backend": backend,
        **extra,
    }
    return EvolveConfig.from_dict(data)


def evaluations(run_dir: Path) -> list[tuple[int, int, list[float], float, str | None]]:
    with RunStore.in_dir(run_dir) as store:
        return [
            (e.generation, e.index, e.genome.tolist(), e.result.score, e.result.error)
            for e in store.evaluations()
        ]


def elites(run_dir: Path) -> list[tuple[int, int, str, float]]:
    with RunStore.in_dir(run_dir) as store:
        return [(e.generation, e.index, e.niche, v.score) for e, v in store.elites()]


def best(summary: Any) -> tuple[str, float]:
    return summary.best.key, summary.best.score


@pytest.fixture(scope="module")
def pool(scoreable_family: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """One Ray backend of 2 workers for the tests that do not kill it (its sources: every model)."""
    config = make_config(tmp_path_factory.mktemp("pool"), scoreable_family, {}, backend=WORKER)
    backend = loop.make_backend(config)
    assert isinstance(backend, RayBackend)
    yield backend
    backend.close()


def test_ray_gives_the_local_backends_evaluations_elites_and_scores(
    tmp_path: Path, scoreable_family: dict[str, Path]
) -> None:
    optimizer = {"name": "cma-es", "start": "best-known"}  # the warm start runs on the workers too
    local = evolve(
        make_config(tmp_path / "local", scoreable_family, optimizer, budget={"max_evaluations": 14})
    )
    on_ray = evolve(
        make_config(
            tmp_path / "ray", scoreable_family, optimizer, budget={"max_evaluations": 14}, backend=WORKER
        )
    )
    assert len(evaluations(on_ray.run_dir)) == 14
    assert evaluations(on_ray.run_dir) == evaluations(local.run_dir)
    assert elites(on_ray.run_dir) == elites(local.run_dir) != []
    assert best(on_ray) == best(local)


@pytest.mark.parametrize("name", optimizer_names())
def test_every_optimizer_runs_on_ray_as_it_does_locally(
    name: str, tmp_path: Path, scoreable_family: dict[str, Path], pool: Any
) -> None:
    optimizer = {"name": name, **({"objectives": ["sums", "again"]} if name == "nsga2" else {})}
    config = make_config(tmp_path, scoreable_family, optimizer)
    on_ray = evolve(config.model_copy(update={"out": tmp_path / "ray"}), backend=pool)
    local = evolve(config.model_copy(update={"out": tmp_path / "local"}))
    assert [row[:2] for row in evaluations(on_ray.run_dir)] == [(g, i) for g in range(3) for i in range(4)][
        :10
    ]
    assert evaluations(on_ray.run_dir) == evaluations(local.run_dir)
    assert elites(on_ray.run_dir) == elites(local.run_dir)


def test_natural_niches_breeds_whole_models_on_ray(
    tmp_path: Path, scoreable_family: dict[str, Path], pool: Any
) -> None:
    optimizer = {"name": "natural-niches", "start": "best-source"}
    config = make_config(
        tmp_path, scoreable_family, optimizer, merge_method=None, search={"space": "weights"}
    )
    on_ray = evolve(config.model_copy(update={"out": tmp_path / "ray"}), backend=pool)
    local = evolve(config.model_copy(update={"out": tmp_path / "local"}))
    assert len(evaluations(on_ray.run_dir)) == 10
    assert evaluations(on_ray.run_dir) == evaluations(local.run_dir)


class DriverKilled(Exception):
    pass


# --- steady-state ---------------------------------------------------------------------------------------
def test_steady_state_random_search_asks_what_the_synchronous_run_asks(
    tmp_path: Path, scoreable_family: dict[str, Path], pool: Any
) -> None:
    steady = {**WORKER, "schedule": "steady-state"}
    config = make_config(tmp_path, scoreable_family, {"name": "random"}, budget={"max_evaluations": 11})
    synchronous = evolve(config.model_copy(update={"out": tmp_path / "sync"}), backend=pool)
    config = make_config(
        tmp_path, scoreable_family, {"name": "random"}, budget={"max_evaluations": 11}, backend=steady
    )
    summary = evolve(config.model_copy(update={"out": tmp_path / "steady"}), backend=pool)
    # Random asks do not depend on what was told: the same genomes under the same keys, in any order.
    assert sorted(evaluations(summary.run_dir)) == sorted(evaluations(synchronous.run_dir))
    assert len(evaluations(summary.run_dir)) == 11 and best(summary) == best(synchronous)


def test_steady_state_natural_niches_killed_between_commit_and_tell_resumes(
    tmp_path: Path, scoreable_family: dict[str, Path], pool: Any
) -> None:
    steady = {**WORKER, "schedule": "steady-state"}
    config = make_config(
        tmp_path, scoreable_family, {"name": "natural-niches"}, budget={"max_evaluations": 13}, backend=steady
    )

    def crash(progress: Progress) -> None:  # reported after the 7th result is committed and told
        if progress.evaluations == 7:
            raise DriverKilled

    with pytest.raises(DriverKilled):
        evolve(config, backend=pool, progress=crash)  # the pool drops the candidate still running
    first = evaluations(config.out)
    assert len(first) == 7
    again = resume(config.out, backend=pool)
    rows = evaluations(again.run_dir)
    assert len(rows) == 13 and len({row[:2] for row in rows}) == 13  # nothing lost, nothing twice
    assert all(row in rows for row in first)
    with RunStore.in_dir(again.run_dir) as store:
        assert store.elites()


# --- faults ---------------------------------------------------------------------------------------------
def slow_score(recipe: Any, seed: int) -> float:
    time.sleep(1.0)  # long enough to be killed in the middle
    return float(recipe)


def test_a_worker_killed_mid_candidate_has_it_run_again_elsewhere(caplog: pytest.LogCaptureFixture) -> None:
    backend = RayBackend(RaySettings(**WORKER), functools.partial(FunctionBackend, slow_score))
    try:
        pids = ray.get([worker.pid.remote() for worker in backend.workers])
        for key in range(4):
            backend.submit(key, key / 10, seed=0)  # keys 0 and 1 start at once, one on each worker
        os.kill(pids[0], signal.SIGKILL)
        with caplog.at_level(logging.WARNING, logger="evomerge.backends.ray"):
            results = dict(backend.next_result() for _ in range(4))
        assert {key: result.score for key, result in results.items()} == {k: k / 10 for k in range(4)}
        assert len(backend.workers) == 1
        assert "goes on with 1 worker(s) of 2" in caplog.text
        backend.submit("dropped", 0.5, seed=0)
        backend.cancel()  # a run that stopped with an error: what it left running is never returned
        backend.submit("next", 0.7, seed=0)
        assert backend.next_result()[0] == "next"
    finally:
        backend.close()


def test_a_worker_killed_mid_run_loses_no_evaluation_and_records_none_twice(
    tmp_path: Path, scoreable_family: dict[str, Path]
) -> None:
    config = make_config(tmp_path, scoreable_family, {"name": "cma-es"}, budget={"max_evaluations": 14})
    local = evolve(config.model_copy(update={"out": tmp_path / "local"}))
    backend = loop.make_backend(config.model_copy(update={"backend": RaySettings(**WORKER)}))
    assert isinstance(backend, RayBackend)
    pids = ray.get([worker.pid.remote() for worker in backend.workers])

    def kill_one(progress: Progress) -> None:
        if progress.evaluations == 3:  # mid-generation: the other worker is still busy
            os.kill(pids[1], signal.SIGKILL)

    try:
        on_ray = evolve(
            config.model_copy(update={"out": tmp_path / "ray"}), backend=backend, progress=kill_one
        )
        assert len(backend.workers) == 1  # it went on with the one left
    finally:
        backend.close()
    rows = evaluations(on_ray.run_dir)
    assert len(rows) == 14 and len({row[:2] for row in rows}) == 14
    assert rows == evaluations(local.run_dir)  # the candidate the kill interrupted was evaluated again


def test_a_driver_killed_mid_run_resumes_from_the_store(
    tmp_path: Path, scoreable_family: dict[str, Path], pool: Any
) -> None:
    config = make_config(tmp_path, scoreable_family, {"name": "ga"}, budget={"max_evaluations": 12})
    local = evolve(config.model_copy(update={"out": tmp_path / "local"}))

    def crash(progress: Progress) -> None:
        if progress.evaluations == 6:
            raise DriverKilled

    ray_config = config.model_copy(update={"out": tmp_path / "ray", "backend": RaySettings(**WORKER)})
    with pytest.raises(DriverKilled):
        evolve(ray_config, progress=crash)  # the backend it built is closed on the way out
    assert len(evaluations(tmp_path / "ray")) == 6
    resumed = resume(tmp_path / "ray", backend=pool)
    assert evaluations(resumed.run_dir) == evaluations(local.run_dir)
    assert np.isfinite(resumed.best.score)  # type: ignore[union-attr]


# --- start-up and per-node paths ------------------------------------------------------------------------
def test_workers_that_never_fit_stop_the_run_before_any_evaluation() -> None:
    settings = RaySettings(workers=1, num_gpus=1, start_timeout_s=1)  # this Ray instance has no GPU
    with pytest.raises(
        EvaluationError, match=r"did not start within start_timeout_s=1 s; each asks .*num_gpus=1"
    ):
        RayBackend(settings, functools.partial(FunctionBackend, slow_score))


def test_workers_read_the_models_under_the_mapped_paths(
    tmp_path: Path, scoreable_family: dict[str, Path]
) -> None:
    """The workers' node keeps the models elsewhere (here: a link) than the driver's paths say."""
    driver_root = scoreable_family["base"].parent
    (tmp_path / "node").mkdir()
    (tmp_path / "node" / "models").symlink_to(driver_root)
    moved = {
        "name": "ray",
        "workers": 1,
        "num_cpus": 0.5,
        "paths": {str(driver_root): str(tmp_path / "node/models")},
    }
    config = make_config(tmp_path, scoreable_family, {"name": "random"}, budget={"max_evaluations": 4})
    on_ray = evolve(config.model_copy(update={"out": tmp_path / "ray", "backend": RaySettings(**moved)}))
    local = evolve(config.model_copy(update={"out": tmp_path / "local"}))
    assert evaluations(on_ray.run_dir) == evaluations(local.run_dir)
    with RunStore.in_dir(on_ray.run_dir) as store:  # the store keeps the driver's paths
        assert all(str(driver_root) in e.recipe for e in store.evaluations())
    wrong = {**moved, "paths": {str(driver_root): str(tmp_path / "nowhere")}}
    with pytest.raises(EvaluationError, match=r"could not load the sources.*nowhere"):
        evolve(config.model_copy(update={"out": tmp_path / "wrong", "backend": RaySettings(**wrong)}))
