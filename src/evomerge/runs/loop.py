"""The evolve loop: ask, evaluate what the store does not hold yet, commit, tell, checkpoint.

Resuming after a kill at any moment gives the uninterrupted run's result because (1) the optimiser is
checkpointed, rng included, before each generation is asked, so a restored one asks the same genomes;
(2) every evaluation is committed (keyed by generation and index) before the optimiser is told, so a
resumed run re-uses it instead of evaluating again; (3) each candidate's mask seed is a pure function of
(run seed, generation, index).
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from evomerge.backends.base import Backend
from evomerge.errors import ConfigError, EvomergeError, OutputExistsError
from evomerge.eval.result import EvalResult
from evomerge.runs.config import EvolveConfig, check_inputs
from evomerge.runs.store import Checkpoint, Evaluation, RunStore
from evomerge.search.optimizers import Optimizer, load_state, make_optimizer, save_state
from evomerge.search.space import ParameterSpace

if TYPE_CHECKING:
    from evomerge.backends.local import LocalBackend

CONFIG_NAME = "evolve.yaml"


class RunStateError(EvomergeError):
    """The run dir's store disagrees with what this run asks (a different config or a diverged replay)."""


@dataclass(frozen=True)
class Progress:
    generation: int
    evaluations: int
    best_score: float | None
    evaluations_per_minute: float


ProgressCallback = Callable[[Progress], None]


@dataclass(frozen=True)
class RunSummary:
    run_dir: Path
    evaluations: int
    generations: int
    best: Evaluation | None
    stopped_by: str  # "max_evaluations" or "max_wall_seconds"


def evolve(
    config: EvolveConfig,
    *,
    backend: Backend | None = None,
    force: bool = False,
    progress: ProgressCallback | None = None,
) -> RunSummary:
    """Start (or continue, if `config.out` holds this same run) an evolve run; see the module doc."""
    space = check_inputs(config)  # every input error surfaces here or in make_backend, before any evaluation
    backend = backend or make_backend(config, space)
    run_dir = prepare_run_dir(config, force=force)
    return _run(run_dir, config, space, backend, progress)


def resume(
    run_dir: Path,
    *,
    backend: Backend | None = None,
    progress: ProgressCallback | None = None,
    max_evaluations: int | None = None,
) -> RunSummary:
    """Continue the run stored in `run_dir` (optionally with a larger evaluation budget)."""
    config = load_run_config(run_dir)
    if max_evaluations is not None:
        config = config.model_copy(
            update={"budget": config.budget.model_copy(update={"max_evaluations": max_evaluations})}
        )
    space = check_inputs(config)
    return _run(Path(run_dir), config, space, backend or make_backend(config, space), progress)


def _run(
    run_dir: Path,
    config: EvolveConfig,
    space: ParameterSpace,
    backend: Backend,
    progress: ProgressCallback | None,
) -> RunSummary:
    with RunStore.in_dir(run_dir) as store:
        checkpoint = _open(store, config)
        elapsed = max(checkpoint.elapsed_s if checkpoint else 0.0, store.elapsed())
        clock = _Clock(config, elapsed, store.count_evaluations(), progress)
        optimizer, generation = _restore_or_start(store, backend, space, config, clock, checkpoint)
        while (stop := clock.stop_reason(store.count_evaluations())) is None:
            genomes = optimizer.ask()  # (population, dim)
            scores = _evaluate_generation(store, backend, space, config, generation, genomes, clock)
            if scores is None:  # the budget ran out inside this generation
                continue
            optimizer.tell(genomes, scores)
            generation += 1
            store.save_checkpoint(_checkpoint(generation, optimizer, clock.elapsed()))
        return RunSummary(run_dir, store.count_evaluations(), generation, store.best(), stop)


def _evaluate_generation(
    store: RunStore,
    backend: Backend,
    space: ParameterSpace,
    config: EvolveConfig,
    generation: int,
    genomes: np.ndarray,
    clock: _Clock,
) -> np.ndarray | None:
    """Scores of one generation, from the store where committed, else evaluated and committed now."""
    results: list[EvalResult | None] = [_stored(store, generation, i, g) for i, g in enumerate(genomes)]
    pending = [i for i, result in enumerate(results) if result is None]
    for chunk in _chunks(pending, max(1, backend.batch_size)):
        if clock.stop_reason(store.count_evaluations()) is not None:
            return None
        chunk = chunk[: clock.evaluations_left(store.count_evaluations())]
        recipes = [space.decode(genomes[i]) for i in chunk]
        seeds = [candidate_seed(config.seed, generation, i) for i in chunk]
        for i, recipe, seed, result in zip(
            chunk, recipes, seeds, backend.evaluate_batch(recipes, seeds), strict=True
        ):
            store.add_evaluation(
                Evaluation(generation, i, genomes[i], recipe.to_yaml(), seed, result, _wall(result))
            )
            results[i] = result
        store.save_elapsed(clock.elapsed())
        clock.report(generation, store)
    if any(result is None for result in results):
        return None
    return np.array([r.score if r is not None and r.ok else np.nan for r in results])


def _stored(store: RunStore, generation: int, index: int, genome: np.ndarray) -> EvalResult | None:
    evaluation = store.evaluation(generation, index)
    if evaluation is None:
        return None
    if not np.array_equal(evaluation.genome, genome):
        raise RunStateError(
            f"{store.path}: generation {generation} candidate {index} was stored with another genome than "
            "the restored optimiser asks; the run store is inconsistent (edited, or written by another version)."
        )
    return evaluation.result


def candidate_seed(run_seed: int, generation: int, index: int) -> int:
    """The seed a candidate's random masks (DARE, DELLA, ...) draw from: a pure function of its position."""
    # +1: the warm start is generation -1, and SeedSequence takes non-negative entropy only.
    return int(np.random.SeedSequence([run_seed, generation + 1, index]).generate_state(1)[0] & 0x7FFFFFFF)


# --- run dir, store and optimiser state ---------------------------------------------------------------
def prepare_run_dir(config: EvolveConfig, *, force: bool) -> Path:
    """Create `config.out`, or re-open it when it holds this same run; refuse a different one."""
    run_dir = Path(config.out)
    stored = _stored_identity(run_dir)
    if stored is not None and stored != config.identity() and not force:
        raise OutputExistsError(
            f"out dir {run_dir} holds a different evolve run; choose another --out, pass --force to "
            f"overwrite it, or run `evomerge resume {run_dir}` to continue that run."
        )
    if run_dir.exists() and any(run_dir.iterdir()) and (force or stored is None):
        _clear(run_dir, is_run=stored is not None)
    run_dir.mkdir(parents=True, exist_ok=True)
    _write_config(run_dir, config)
    return run_dir


def _stored_identity(run_dir: Path) -> dict[str, Any] | None:
    """The identity of the run stored in `run_dir`; None if none. A config that no longer loads (edited,
    or written by another version) still marks a run dir: `--force` may replace it, nothing else may."""
    if not (run_dir / CONFIG_NAME).is_file():
        return None
    try:
        return load_run_config(run_dir).identity()
    except ConfigError as error:
        return {"unreadable config": str(error)}


def _clear(run_dir: Path, *, is_run: bool) -> None:
    if not is_run:
        raise OutputExistsError(
            f"out dir {run_dir} exists and is not an evomerge run dir; choose another --out "
            "(evomerge only overwrites a dir holding an earlier run)."
        )
    shutil.rmtree(run_dir)


def _write_config(run_dir: Path, config: EvolveConfig) -> None:
    import yaml

    temporary = run_dir / f".{CONFIG_NAME}.tmp"
    temporary.write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
    temporary.replace(run_dir / CONFIG_NAME)


def load_run_config(run_dir: Path) -> EvolveConfig:
    path = Path(run_dir) / CONFIG_NAME
    if not path.is_file():
        raise RunStateError(
            f"{run_dir} is not an evolve run dir (no {CONFIG_NAME}); start one with `evomerge evolve`."
        )
    return EvolveConfig.from_yaml(path)


def _open(store: RunStore, config: EvolveConfig) -> Checkpoint | None:
    if store.run_config() is None:
        store.init_run(config.identity(), config.seed)
    return store.last_checkpoint()


def _restore_or_start(
    store: RunStore,
    backend: Backend,
    space: ParameterSpace,
    config: EvolveConfig,
    clock: _Clock,
    checkpoint: Checkpoint | None,
) -> tuple[Optimizer, int]:
    """The checkpointed optimiser, or a new one (after the warm start, when the config asks for one)."""
    if checkpoint is not None:
        return load_state(checkpoint.optimizer), checkpoint.generation
    x0, complete = _warm_start(store, backend, space, config, clock)
    lower, upper = space.bounds
    optimizer = make_optimizer(config.optimizer_settings(), lower, upper, x0)
    if complete:  # an interrupted warm start is redone (from the store) on resume, never checkpointed
        store.save_checkpoint(_checkpoint(0, optimizer, clock.elapsed()))
    return optimizer, 0


WARM_START_GENERATION = -1


def _warm_start(
    store: RunStore, backend: Backend, space: ParameterSpace, config: EvolveConfig, clock: _Clock
) -> tuple[np.ndarray | None, bool]:
    """With `optimizer.start: best-source`, evaluate each source alone (generation -1) and start there."""
    if config.optimizer.start != "best-source":
        return None, True
    genomes = space.source_genomes()  # (n_models, dim)
    scores = _evaluate_generation(store, backend, space, config, WARM_START_GENERATION, genomes, clock)
    if scores is None:
        return None, False
    if not np.isfinite(scores).any():
        return None, True
    return genomes[int(np.nanargmax(scores))], True


def _checkpoint(generation: int, optimizer: Optimizer, elapsed: float) -> Checkpoint:
    rng = getattr(optimizer, "rng", None)
    rng_state = dict(rng.bit_generator.state) if rng is not None else {}
    return Checkpoint(generation, save_state(optimizer), _jsonable(rng_state), elapsed)


def _jsonable(state: dict[str, Any]) -> dict[str, Any]:
    return {
        k: (_jsonable(v) if isinstance(v, dict) else int(v) if isinstance(v, np.integer) else v)
        for k, v in state.items()
    }


def make_backend(config: EvolveConfig, space: ParameterSpace, *, split: str = "dev") -> Backend:
    """The backend the config names, scoring on the `split` ("dev" or "test") of each fitness task."""
    return local_backend(config, space.decode(np.full(space.dim, 0.5)), split=split)


def local_backend(config: EvolveConfig, sample_recipe: Any, *, split: str = "dev") -> LocalBackend:
    """A LocalBackend holding `sample_recipe`'s sources, with the config's evaluation settings."""
    from evomerge.backends.local import LocalBackend

    settings = config.evaluation
    return LocalBackend.create(
        config.base_model,
        sample_recipe,
        load_tasks(config, split=split),
        batch_size=settings.batch_size,
        max_new_tokens=settings.max_new_tokens,
        device=settings.torch_device(),
    )


def load_tasks(config: EvolveConfig, *, split: str = "dev") -> list[Any]:
    from evomerge.eval.tasks import load_task

    tasks = []
    for task in config.fitness:
        path = task.dev if split == "dev" else task.test
        if path is None:
            raise RunStateError(f"fitness task {task.task_name!r} has no test split; add 'test: PATH'.")
        limit = task.limit if split == "dev" else None
        tasks.append(
            load_task(path, metric=task.metric, limit=limit, name=task.task_name, weight=task.weight)
        )
    return tasks


# --- budget and progress ------------------------------------------------------------------------------
class _Clock:
    """Budget by evaluations and/or wall time; wall time accumulates across resumes (kept in the store)."""

    def __init__(
        self,
        config: EvolveConfig,
        elapsed_before: float,
        evaluations_before: int,
        show: ProgressCallback | None,
    ) -> None:
        self.budget = config.budget
        self.show = show
        self.start = _now()
        self.elapsed_before = elapsed_before
        self.evaluations_before = evaluations_before

    def elapsed(self) -> float:
        return self.elapsed_before + _now() - self.start

    def evaluations_left(self, done: int) -> int:
        limit = self.budget.max_evaluations
        return max(0, limit - done) if limit is not None else 1 << 62

    def stop_reason(self, done: int) -> str | None:
        if self.evaluations_left(done) == 0:
            return "max_evaluations"
        if self.budget.max_wall_seconds is not None and self.elapsed() >= self.budget.max_wall_seconds:
            return "max_wall_seconds"
        return None

    def report(self, generation: int, store: RunStore) -> None:
        """Tell the progress display where the run stands (after each committed batch)."""
        if self.show is None:
            return
        done = store.count_evaluations()
        minutes = max(_now() - self.start, 1e-9) / 60
        best = store.best()
        rate = (done - self.evaluations_before) / minutes
        self.show(Progress(generation, done, best.score if best else None, rate))


def _now() -> float:
    """The run's clock (one seam, so tests can drive wall-time budgets deterministically)."""
    return time.monotonic()


def _chunks(items: list[int], size: int) -> list[list[int]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def _wall(result: EvalResult) -> float:
    return float(result.cost.get("wall_s", 0.0))
