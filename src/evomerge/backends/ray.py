"""The Ray backend: candidates evaluated by a pool of Ray actors, on one machine or a cluster.

Each worker is an actor holding its own in-process backend (a `LocalBackend`: sources in RAM once, one
live model, every candidate merged into it in place), so a candidate costs one remote call carrying its
recipe and returning its EvalResult. The optimiser and the run store stay in the driver, which alone
writes the store. A worker evaluates exactly what the local backend would (same recipe, same mask seed),
so a synchronous run gives the local backend's evaluations, elites and scores.

Faults: a worker that dies (its process killed, its node lost) has its candidate queued again for another
worker; every candidate's result is returned once; the pool goes on with the workers it has left and logs
a warning saying so. Only when none is left does it raise.

Ray is the optional extra `ray`: this module imports it only when a backend is built (`RaySettings` is
read without it), and a missing install is a ConfigError naming `pip install 'evomerge[ray]'`.
"""

from __future__ import annotations

import functools
import logging
import os
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, field_validator, model_validator

from evomerge.backends.base import Backend, BackendSettings
from evomerge.errors import EvaluationError
from evomerge.eval.result import EvalResult
from evomerge.extras import check_extra, import_extra

log = logging.getLogger(__name__)

# Recipe keys whose values are model dirs (what `paths` rewrites for the workers).
_PATH_KEYS = frozenset({"model", "base_model", "tokenizer_source"})


class RaySettings(BackendSettings):
    """`ray`: a pool of Ray actors (see docs/ray.md)."""

    name: Literal["ray"] = "ray"
    # None: Ray's own choice (RAY_ADDRESS, else a cluster `ray start` started here, else a new local
    # instance); "auto": the cluster this machine is a node of; "ray://HOST:10001": Ray Client.
    address: str | None = None
    workers: int = Field(default=1, ge=1)
    num_cpus: float = Field(default=1.0, ge=0)  # per worker; also its torch threads (at least 1)
    num_gpus: float = Field(default=0.0, ge=0)  # per worker; a fraction shares a GPU; > 0: it runs on CUDA
    resources: dict[str, float] = Field(default_factory=dict)  # custom Ray resources per worker
    start_timeout_s: float = Field(default=300.0, gt=0)  # every worker must have loaded the sources by then
    # A driver path prefix -> the prefix the workers read the same files under (per-node model paths).
    paths: dict[str, str] = Field(default_factory=dict)

    @field_validator("paths")
    @classmethod
    def _absolute_prefixes(cls, value: dict[str, str]) -> dict[str, str]:
        for source, target in value.items():
            if not (os.path.isabs(source) and os.path.isabs(target)):
                raise ValueError(
                    f"each prefix must be an absolute path, got {source!r}: {target!r}; write e.g. "
                    "'/data/models': '/mnt/models'"
                )
        return value

    @model_validator(mode="after")
    def _ray_installed(self) -> RaySettings:
        check_extra("ray", who="backend 'ray'", extra="ray")
        return self


def import_ray() -> Any:
    """The `ray` module, or a ConfigError naming the extra to install."""
    return import_extra("ray", who="backend 'ray'", extra="ray")


# --- per-node paths -------------------------------------------------------------------------------------
def map_path(path: str, paths: dict[str, str]) -> str:
    """`path` with its longest prefix in `paths` replaced (whole path components only)."""
    for source in sorted(paths, key=len, reverse=True):
        prefix = source.rstrip("/")
        if path == prefix or path.startswith(prefix + "/"):
            return paths[source].rstrip("/") + path[len(prefix) :]
    return path


def map_recipe(recipe: Any, paths: dict[str, str]) -> Any:
    """A merge recipe (MergeConfig) reading its models under the workers' paths; anything else as is."""
    to_dict = getattr(recipe, "to_dict", None)
    if not paths or to_dict is None:
        return recipe
    return type(recipe).from_dict(_mapped(to_dict(), paths))


def _mapped(value: Any, paths: dict[str, str]) -> Any:
    if isinstance(value, dict):
        return {
            k: map_path(v, paths) if k in _PATH_KEYS and isinstance(v, str) else _mapped(v, paths)
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [_mapped(item, paths) for item in value]
    return value


# --- one worker -----------------------------------------------------------------------------------------
class Worker:
    """The body of one Ray actor: builds its backend once (in its own process), then evaluates."""

    def __init__(self, make_backend: Callable[[], Backend], threads: int, paths: dict[str, str]) -> None:
        torch.set_num_threads(threads)
        self.paths = paths
        self.backend = make_backend()

    def pid(self) -> int:
        return os.getpid()

    def evaluate(self, candidate: Any, seed: int) -> EvalResult:
        return self.backend.evaluate_batch([map_recipe(candidate, self.paths)], [seed])[0]


def local_backend(request: Any, paths: dict[str, str], use_gpu: bool) -> Backend:
    """A worker's LocalBackend for `request` (a BackendRequest), reading the models under `paths`."""
    from evomerge.backends.local import LocalBackend

    # Ray shows an actor the GPUs it reserved for it (CUDA_VISIBLE_DEVICES) and none otherwise, so the
    # worker's device follows num_gpus, not the driver's evaluation.device.
    device = torch.device("cuda" if use_gpu else "cpu")
    return LocalBackend.create(
        Path(map_path(str(request.base_model), paths)),
        map_recipe(request.sample_recipe, paths),
        request.tasks,
        batch_size=request.batch_size,
        max_new_tokens=request.max_new_tokens,
        device=device,
        measures=request.measures,
        # several workers on one host would each claim half the free memory: no task-vector cache
        task_vector_cache="off",
    )


# --- the pool -------------------------------------------------------------------------------------------
class RayBackend:
    """A pool of `settings.workers` Ray actors, each running the backend `make_backend` builds (the Backend
    and Pool protocols of backends.base)."""

    def __init__(self, settings: RaySettings, make_backend: Callable[[], Backend]) -> None:
        self._ray = ray = import_ray()
        self.settings = settings
        self._owns_ray = not ray.is_initialized()
        if self._owns_ray:
            ray.init(address=settings.address, include_dashboard=False, logging_level=logging.WARNING)
        actor = ray.remote(Worker).options(
            num_cpus=settings.num_cpus,
            num_gpus=settings.num_gpus,
            resources=settings.resources or None,
            max_restarts=0,  # a dead worker stays dead: its candidate is re-queued here instead
            max_task_retries=0,
        )
        threads = max(1, int(settings.num_cpus))
        self.workers: list[Any] = [
            actor.remote(make_backend, threads, settings.paths) for _ in range(settings.workers)
        ]
        self.batch_size = settings.workers
        self._idle: deque[Any] = deque()
        self._queue: deque[tuple[Hashable, Any, int]] = deque()  # (key, candidate, seed) not started
        self._running: dict[Any, tuple[Any, Hashable, Any, int]] = {}  # ref -> (worker, key, candidate, seed)
        self._wait_until_ready()

    @classmethod
    def create(cls, settings: RaySettings, request: Any) -> RayBackend:
        """Workers that each load the request's sources once (a LocalBackend in every actor)."""
        return cls(settings, functools.partial(local_backend, request, settings.paths, settings.num_gpus > 0))

    def _wait_until_ready(self) -> None:
        ray, s = self._ray, self.settings
        try:
            ray.get([worker.pid.remote() for worker in self.workers], timeout=s.start_timeout_s)
        except ray.exceptions.GetTimeoutError:
            self.close()
            raise EvaluationError(
                f"backend: {s.workers} Ray worker(s) did not start within start_timeout_s={s.start_timeout_s:g}"
                f" s; each asks num_cpus={s.num_cpus:g}, num_gpus={s.num_gpus:g}"
                f"{f', resources={s.resources}' if s.resources else ''} and the cluster has "
                f"{ray.available_resources()} free. Lower workers or the per-worker resources, add nodes, or "
                "raise start_timeout_s."
            ) from None
        except ray.exceptions.RayActorError as error:
            self.close()
            raise EvaluationError(
                f"backend: a Ray worker could not load the sources; every node must read the model dirs "
                f"(a shared filesystem, the same paths, or backend.paths; see docs/ray.md). The worker "
                f"raised: {_last_line(error)}"
            ) from None
        self._idle.extend(self.workers)

    # --- Backend ----------------------------------------------------------------------------------------
    def evaluate_batch(self, recipes: Sequence[Any], seeds: Sequence[int]) -> list[EvalResult]:
        """Every recipe spread over the workers; results in the recipes' order."""
        for key, (recipe, seed) in enumerate(zip(recipes, seeds, strict=True)):
            self.submit(key, recipe, seed)
        results: dict[Hashable, EvalResult] = dict(self.next_result() for _ in recipes)
        return [results[key] for key in range(len(recipes))]

    def close(self) -> None:
        for worker in self.workers:
            self._ray.kill(worker)
        self.workers, self._running = [], {}
        self._idle.clear()
        self._queue.clear()
        if self._owns_ray:
            self._ray.shutdown()
            self._owns_ray = False

    # --- Pool -------------------------------------------------------------------------------------------
    def submit(self, key: Hashable, candidate: Any, seed: int) -> None:
        self._queue.append((key, candidate, seed))
        self._dispatch()

    def idle_workers(self) -> int:
        return max(0, len(self._idle) - len(self._queue))

    def cancel(self) -> None:
        # A running candidate cannot be stopped inside its actor; its result is dropped, and the worker
        # takes its next candidate once it has finished this one (an actor runs its calls in order).
        self._queue.clear()
        self._idle.extend(worker for worker, *_ in self._running.values())
        self._running.clear()

    def next_result(self) -> tuple[Hashable, EvalResult]:
        ray = self._ray
        while True:
            self._dispatch()
            if not self._running:
                raise EvaluationError(
                    "backend: every Ray worker has died; the run store holds every finished evaluation: "
                    "`evomerge resume RUN_DIR` continues once the cluster is back."
                    if self._queue
                    else "next_result: nothing was submitted."
                )
            [ref], _ = ray.wait(list(self._running), num_returns=1)
            worker, key, candidate, seed = self._running.pop(ref)
            try:
                result = ray.get(ref)
            except ray.exceptions.RayActorError as error:
                self._lose(worker, error)
                self._queue.appendleft((key, candidate, seed))  # first in line for a live worker
                continue
            self._idle.append(worker)
            return key, result

    def _dispatch(self) -> None:
        while self._queue and self._idle:
            worker = self._idle.popleft()
            key, candidate, seed = self._queue.popleft()
            self._running[worker.evaluate.remote(candidate, seed)] = (worker, key, candidate, seed)

    def _lose(self, worker: Any, error: Exception) -> None:
        self.workers.remove(worker)
        self._ray.kill(worker)  # no-op when dead; a worker Ray only calls unavailable is not trusted again
        log.warning(
            "a Ray worker died mid-candidate (%s: %s); its candidate goes to another worker; the run goes "
            "on with %d worker(s) of %d",
            type(error).__name__,
            _last_line(error),
            len(self.workers),
            self.settings.workers,
        )


def _last_line(error: Exception) -> str:
    """The last line of a Ray error: the remote exception itself, after Ray's traceback."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__
