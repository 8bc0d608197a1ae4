"""The evolve loop: warm start, then ask, evaluate what the store does not hold yet, commit, tell, checkpoint.

Resuming after a kill at any moment gives the uninterrupted run's result because (1) the optimiser is
checkpointed, rng included, before each generation is asked, so a restored one asks the same genomes;
(2) every evaluation is committed (keyed by generation and index) before the optimiser is told, so a
resumed run re-uses it instead of evaluating again; (3) each candidate's mask seed is a pure function of
(run seed, generation, index). The warm start (generation -1) is committed the same way and is never
checkpointed: an interrupted one is finished from the store on resume.

A pool of workers (the Ray backend) takes a whole generation and each result is committed as it finishes;
the optimiser is still told the generation in order, so the results are the in-process ones. With
`schedule: steady-state` the optimiser is told each result as it arrives instead and asked for the next
genome at once (`_steady_state`): no committed evaluation is lost or repeated on resume, but what the
optimiser is told depends on timing.

The run's best is the best dev score among *everything* it evaluated, warm start included, so a run that
starts from the sources and the default merges never ends below them on dev.
"""

from __future__ import annotations

import shutil
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from evomerge.backends.base import Backend, Pool
from evomerge.backends.registry import BackendRequest
from evomerge.backends.registry import make_backend as build_backend
from evomerge.dataflow.guard import HELD_OUT, SEARCHED, guard_cost, held_out_tasks, judge
from evomerge.errors import ConfigError, EvomergeError, OutputExistsError
from evomerge.eval.result import EvalResult
from evomerge.io.atomic import atomic_write_text
from evomerge.runs.baselines import baseline_recipes, source_recipes, union_recipe
from evomerge.runs.config import DATAFLOW_SPACES, PS_BEST, EvolveConfig, check_inputs
from evomerge.runs.fitness import fitness_layer
from evomerge.runs.store import (
    FORMAT,
    WARM_START_GENERATION,
    Checkpoint,
    Evaluation,
    RunStore,
    StoredElite,
    genome_text,
)
from evomerge.search.base import Elite, Optimizer, SearchSpace, SteadyState
from evomerge.search.optimizers import load_blob, load_state, save_state
from evomerge.search.registry import make_optimizer

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
    stopped_by: str  # "max_evaluations", "max_wall_seconds" or "patience"


@dataclass(frozen=True)
class Point:
    """One candidate to evaluate: its genome ((dim,), or (0,) for a warm-start candidate outside the
    space), the candidate itself, and a label for warm-start candidates."""

    genome: np.ndarray
    candidate: Any
    label: str | None = None


def evolve(
    config: EvolveConfig,
    *,
    backend: Backend | None = None,
    force: bool = False,
    progress: ProgressCallback | None = None,
) -> RunSummary:
    """Start (or continue, if `config.out` holds this same run) an evolve run; see the module doc."""
    space = check_inputs(config)  # every input error surfaces here or in make_backend, before any evaluation
    if config.search.space == "ps+dfs":
        run_dir = prepare_run_dir(config, force=force)
        return _ps_then_dfs(run_dir, config, space, backend, progress, force=force)
    with _backend(config, backend) as built:
        run_dir = prepare_run_dir(config, force=force)
        return _run(run_dir, config, space, built, progress)


def resume(
    run_dir: Path,
    *,
    backend: Backend | None = None,
    progress: ProgressCallback | None = None,
    max_evaluations: int | None = None,
) -> RunSummary:
    """Continue the run stored in `run_dir` (optionally with a larger evaluation budget)."""
    check_resumable(Path(run_dir))
    config = load_run_config(run_dir)
    if max_evaluations is not None:
        config = config.model_copy(
            update={"budget": config.budget.model_copy(update={"max_evaluations": max_evaluations})}
        )
    space = check_inputs(config)
    if config.search.space == "ps+dfs":
        return _ps_then_dfs(Path(run_dir), config, space, backend, progress, force=False)
    with _backend(config, backend) as built:
        return _run(Path(run_dir), config, space, built, progress)


@contextmanager
def _backend(config: EvolveConfig, given: Backend | None) -> Iterator[Backend]:
    """`given` (left open; a pool drops the work of a run that stopped with an error), else the backend
    the config names, closed after the run (Ray workers, loaded sources)."""
    backend = given or make_backend(config)
    try:
        yield backend
    except BaseException:
        if given is not None and isinstance(given, Pool):
            given.cancel()
        raise
    finally:
        if given is None:
            backend.close()


def _ps_then_dfs(
    run_dir: Path,
    config: EvolveConfig,
    space: SearchSpace,
    backend: Backend | None,
    progress: ProgressCallback | None,
    *,
    force: bool,
) -> RunSummary:
    """ps+dfs: the parameter-space search (its own run in `out/ps`, its budget share), its best merged
    into `out/ps-best`, then the path search over the pool with that merge in it (this run dir's store).
    Resumable at any point: a finished merge marks the first phase done."""
    best_dir = run_dir / PS_BEST
    phase = config.ps_phase()
    if not best_dir.is_dir():
        evolve(phase, force=force, progress=progress)
        with RunStore.in_dir(phase.out) as store:
            best = store.best()
        if best is None:
            raise RunStateError(
                f"{phase.out}: the parameter-space phase has no successful candidate to merge."
            )
        phase.search_space().export(best.recipe, best_dir, seed=best.seed, force=True)
    with RunStore.in_dir(phase.out) as store:
        ps_spent, ps_seconds = store.count_evaluations(), store.elapsed()
    flow = config.search.dataflow
    held_out = held_out_tasks(config.fitness, flow.guard_examples) if flow.guard else []
    reserve = guard_cost(config.fitness, held_out)
    dfs = config.dfs_phase(ps_spent=ps_spent, ps_seconds=ps_seconds, reserve=reserve)
    with _backend(dfs, backend) as built:
        with RunStore.in_dir(run_dir) as store:
            store.choose(None)  # a resumed run searches on: the guard judges its new best afterwards
        summary = _run(run_dir, dfs, space, built, progress)
        if not flow.guard or summary.best is None:
            return summary
        return replace(summary, best=_guard(run_dir, dfs, space, built, held_out))


def _guard(
    run_dir: Path, config: EvolveConfig, space: SearchSpace, backend: Backend, held_out: list[Any]
) -> Evaluation:
    """The ps+dfs guard (dataflow/guard.py): the path search's best stays the run's result only if it
    beats ps-best alone (the warm start's identity path) beyond the noise; the verdict goes in the store."""
    with RunStore.in_dir(run_dir) as store:
        best = store.best_on_dev()
        reference = next(
            (e for e in store.evaluations() if e.label == f"source {PS_BEST}" and e.result.ok), None
        )
        assert best is not None
        if reference is None or reference.key == best.key:
            return best
        if held_out:
            scored = _score_on(config, space, backend, held_out, [reference, best])
            results, examples = scored, HELD_OUT
        else:
            results, examples = [reference.result, best.result], SEARCHED
        verdict = judge(
            (reference.key, results[0]),
            (best.key, results[1]),
            alpha=config.search.dataflow.guard_alpha,
            examples=examples,
        )
        chosen = best if verdict.accepted else reference
        store.choose((chosen.generation, chosen.index), verdict.to_dict())
    return chosen


def _score_on(
    config: EvolveConfig, space: SearchSpace, backend: Backend, tasks: list[Any], picked: list[Evaluation]
) -> list[EvalResult]:
    """`picked`'s candidates scored on `tasks` (the guard's held-out dev examples), with their own seeds."""
    from evomerge.dataflow.backend import PathBackend

    candidates = [space.from_text(e.recipe) for e in picked]
    seeds = [e.seed for e in picked]
    if isinstance(backend, PathBackend):
        return backend.on_tasks(tasks).evaluate_batch(candidates, seeds)
    return evaluate_once(config, candidates, seeds, tasks=tasks)


def _run(
    run_dir: Path,
    config: EvolveConfig,
    space: SearchSpace,
    backend: Backend,
    progress: ProgressCallback | None,
) -> RunSummary:
    with RunStore.in_dir(run_dir) as store:
        checkpoint = _open(store, config)
        backend = _fitness_layer(config, space, backend, store)  # racing / subset, when configured
        elapsed = max(checkpoint.elapsed_s if checkpoint else 0.0, store.elapsed())
        clock = _Clock(config, elapsed, store.count_evaluations(), progress)
        if config.backend.schedule == "steady-state":
            generation = _steady_state(store, backend, space, config, clock, checkpoint)
            reason = clock.stop_reason(store.count_evaluations()) or "max_evaluations"
            return RunSummary(run_dir, store.count_evaluations(), generation, store.best(), reason)
        optimizer, generation = _restore_or_start(store, backend, space, config, clock, checkpoint)
        while (stop := clock.stop_reason(store.count_evaluations()) or _stagnated(store, config)) is None:
            genomes = _repaired(space, optimizer.ask())  # (population, dim)
            points = [Point(genome, space.decode(genome)) for genome in genomes]
            results = _evaluate(store, backend, space, config, generation, points, clock)
            if results is None:  # the budget ran out inside this generation
                continue
            optimizer.tell(genomes, results)
            generation += 1
            _save_checkpoint(store, generation, optimizer, clock)
        return RunSummary(run_dir, store.count_evaluations(), generation, store.best(), stop)


def _repaired(space: SearchSpace, genomes: np.ndarray) -> np.ndarray:
    """The asked genomes after the space's `repair` (a space whose genes can be meaningless in some
    candidates: data-flow scales of dropped slots); evaluated and told as repaired."""
    repair = getattr(space, "repair", None)
    return genomes if repair is None else np.stack([repair(genome) for genome in genomes])


def _stagnated(store: RunStore, config: EvolveConfig) -> str | None:
    """ "patience" once the best on dev is `budget.patience` evaluations old or more, else None."""
    patience = config.budget.patience
    if patience is None:
        return None
    return "patience" if store.evaluations_since_best() >= patience else None


def _fitness_layer(config: EvolveConfig, space: SearchSpace, backend: Backend, store: RunStore) -> Backend:
    if config.racing is None and config.subset is None:
        return backend
    warm = len(warm_start_points(config, space))
    return fitness_layer(config, backend, store, tasks=load_tasks(config), warm_start_size=warm)


def _evaluate(
    store: RunStore,
    backend: Backend,
    space: SearchSpace,
    config: EvolveConfig,
    generation: int,
    points: Sequence[Point],
    clock: _Clock,
) -> list[EvalResult] | None:
    """Results of one generation, from the store where committed, else evaluated and committed now."""
    results: list[EvalResult | None] = [_stored(store, generation, i, p) for i, p in enumerate(points)]
    pending = [i for i, result in enumerate(results) if result is None]
    # A pool takes the whole generation at once and hands back each result as it finishes.
    handover = len(pending) if isinstance(backend, Pool) else backend.batch_size
    for chunk in _chunks(pending, max(1, handover)):
        if clock.stop_reason(store.count_evaluations()) is not None:
            return None
        chunk = chunk[: clock.evaluations_left(store.count_evaluations())]
        seeds = {i: candidate_seed(config.seed, generation, i) for i in chunk}
        for i, result in _evaluated(backend, {i: points[i].candidate for i in chunk}, seeds):
            _commit(store, space, generation, i, points[i], seeds[i], result)
            results[i] = result
            store.save_elapsed(clock.elapsed())
            clock.report(generation, store)
    if any(result is None for result in results):
        return None
    return [result for result in results if result is not None]


def _evaluated(
    backend: Backend, candidates: dict[int, Any], seeds: dict[int, int]
) -> Iterator[tuple[int, EvalResult]]:
    """(index, result) of each candidate: from a pool as each finishes, else after the whole batch."""
    if isinstance(backend, Pool):
        for i, candidate in candidates.items():
            backend.submit(i, candidate, seeds[i])
        for _ in candidates:
            yield _next(backend)
        return
    indices = list(candidates)
    batch = backend.evaluate_batch([candidates[i] for i in indices], [seeds[i] for i in indices])
    yield from zip(indices, batch, strict=True)


def _commit(
    store: RunStore,
    space: SearchSpace,
    generation: int,
    index: int,
    point: Point,
    seed: int,
    result: EvalResult,
) -> None:
    text = space.to_text(point.candidate)
    store.add_evaluation(
        Evaluation(generation, index, point.genome, text, seed, result, _wall(result), point.label)
    )


def _stored(store: RunStore, generation: int, index: int, point: Point) -> EvalResult | None:
    evaluation = store.evaluation(generation, index)
    if evaluation is None:
        return None
    if genome_text(evaluation.genome) != genome_text(point.genome) or evaluation.label != point.label:
        raise RunStateError(
            f"{store.path}: generation {generation} candidate {index} was stored with another genome than "
            "the restored optimiser asks; the run store is inconsistent (edited, or written by another version)."
        )
    return evaluation.result


def candidate_seed(run_seed: int, generation: int, index: int) -> int:
    """The seed a candidate's random masks (DARE, DELLA, ...) draw from: a pure function of its position."""
    # +1: the warm start is generation -1, and SeedSequence takes non-negative entropy only.
    return int(np.random.SeedSequence([run_seed, generation + 1, index]).generate_state(1)[0] & 0x7FFFFFFF)


# --- warm start ---------------------------------------------------------------------------------------
def warm_start_points(config: EvolveConfig, space: SearchSpace) -> list[Point]:
    """What `optimizer.start` evaluates before the first generation (see OptimizerSettings)."""
    start = config.optimizer.start
    if start == "center":
        return []
    if start == "best-source":
        genomes = _source_genomes(space)  # (n_models, dim)
        names = [Path(m).name for m in config.models]
        return [
            Point(g, space.decode(g), f"source {n} (in the space)")
            for n, g in zip(names, genomes, strict=True)
        ]
    own = getattr(space, "warm_start_recipes", None)  # a space that names its own (data-flow: the pool)
    if callable(own):
        return [_known_point(space, label, recipe) for label, recipe in own().items()]
    known = {f"source {name}": recipe for name, recipe in source_recipes(config, with_base=False).items()}
    known |= {f"default {name}": recipe for name, recipe in baseline_recipes(config).items()}
    points = [_known_point(space, label, recipe) for label, recipe in known.items()]
    lower, upper = space.bounds
    centre = (lower + upper) / 2
    return [*points, Point(centre, space.decode(centre), "centre of the search space")]


def _known_point(space: SearchSpace, label: str, recipe: dict[str, Any]) -> Point:
    from evomerge.merge.config import MergeConfig

    genome = space.genome_of(recipe)
    if genome is None:
        return Point(np.zeros(0), MergeConfig.from_dict(recipe, label=label), label)
    return Point(genome, space.decode(genome), label)  # the space's own spelling of the same recipe


def _source_genomes(space: SearchSpace) -> np.ndarray:
    source_genomes = getattr(space, "source_genomes", None)
    if source_genomes is None:
        raise ConfigError(
            f"optimizer.start: 'best-source' needs a space of weights; {type(space).__name__} has none."
        )
    return np.asarray(source_genomes())


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

    data = config.model_dump(mode="json", exclude=config.unused_fields())
    atomic_write_text(run_dir / CONFIG_NAME, yaml.safe_dump(data, sort_keys=False))


def load_run_config(run_dir: Path) -> EvolveConfig:
    path = Path(run_dir) / CONFIG_NAME
    if not path.is_file():
        raise RunStateError(
            f"{run_dir} is not an evolve run dir (no {CONFIG_NAME}); start one with `evomerge evolve`."
        )
    return EvolveConfig.from_yaml(path)


def _open(store: RunStore, config: EvolveConfig) -> Checkpoint | None:
    if store.format() is None:
        store.init_run(config.identity(), config.seed)
    check_store_format(store)
    return store.last_checkpoint()


def check_resumable(run_dir: Path) -> None:
    """Refuse a run dir this version cannot continue, before its config is read."""
    if (Path(run_dir) / "run.sqlite").is_file():
        with RunStore.in_dir(run_dir) as store:
            check_store_format(store)


def check_store_format(store: RunStore) -> None:
    found = store.format()
    if found is not None and found != FORMAT:
        run_dir = store.path.parent
        raise RunStateError(
            f"{run_dir} was written by an older evomerge (run store format {found}, this version writes "
            f"{FORMAT}); its optimiser checkpoints pickle classes this version no longer has, so it cannot be "
            f"resumed. Its evaluations stay readable: `evomerge elites {run_dir}`, `evomerge export "
            f"{run_dir} --elite ID OUT`. Start it again with `evomerge evolve CONFIG --force --out {run_dir}`."
        )


def _restore_or_start(
    store: RunStore,
    backend: Backend,
    space: SearchSpace,
    config: EvolveConfig,
    clock: _Clock,
    checkpoint: Checkpoint | None,
) -> tuple[Optimizer, int]:
    """The checkpointed optimiser, or a new one seeded by the warm start (when the config asks for one)."""
    if checkpoint is not None:
        where = f"{store.path}'s checkpoint before generation {checkpoint.generation}"
        return load_state(checkpoint.optimizer, where), checkpoint.generation
    points = warm_start_points(config, space)
    results = _evaluate(store, backend, space, config, WARM_START_GENERATION, points, clock)
    complete = results is not None
    seeds = [(p.genome, r) for p, r in zip(points, results or [], strict=False) if p.genome.size]
    lower, upper = space.bounds
    optimizer = make_optimizer(
        config.optimizer, lower, upper, seed=config.optimizer_seed(), seeds=seeds, space=space
    )
    if complete:  # an interrupted warm start is redone (from the store) on resume, never checkpointed
        _save_checkpoint(store, 0, optimizer, clock)
    return optimizer, 0


def _save_checkpoint(
    store: RunStore, generation: int, optimizer: Optimizer | SteadyRun, clock: _Clock
) -> None:
    """The optimiser before `generation`, its elites as keys of stored evaluations, and its stats."""
    elites = [_stored_elite(store, elite) for elite in optimizer.elites()]
    stats = getattr(optimizer, "stats", None)  # optional: archive coverage, front hypervolume, ...
    checkpoint = _checkpoint(generation, optimizer, clock.elapsed())
    store.save_checkpoint(
        checkpoint, [elite for elite in elites if elite is not None], stats() if callable(stats) else None
    )


def _stored_elite(store: RunStore, elite: Elite) -> StoredElite | None:
    key = store.key_of(elite.genome)
    return None if key is None else StoredElite(key[0], key[1], elite.niche, dict(elite.measures))


def _checkpoint(generation: int, optimizer: Any, elapsed: float) -> Checkpoint:
    rng = getattr(optimizer, "rng", None)
    rng_state = dict(rng.bit_generator.state) if rng is not None else {}
    return Checkpoint(generation, save_state(optimizer), _jsonable(rng_state), elapsed)


def _jsonable(state: dict[str, Any]) -> dict[str, Any]:
    return {
        k: (_jsonable(v) if isinstance(v, dict) else int(v) if isinstance(v, np.integer) else v)
        for k, v in state.items()
    }


def make_backend(config: EvolveConfig, *, split: str = "dev", tasks: list[Any] | None = None) -> Backend:
    """The backend the config names (backends.registry), scoring on the `split` ("dev" or "test") of
    each fitness task (or on `tasks`, when given); it holds the base and every source, so any default
    merge evaluates too."""
    from evomerge.merge.config import MergeConfig

    settings = config.evaluation
    request = BackendRequest(
        base_model=config.base_model,
        sample_recipe=MergeConfig.from_dict(union_recipe(config)),
        tasks=load_tasks(config, split=split) if tasks is None else tasks,
        batch_size=settings.batch_size,
        max_new_tokens=settings.max_new_tokens,
        device=settings.torch_device(),
        measures=config.optimizer.measures_needed(),
    )
    if config.search.space in DATAFLOW_SPACES:  # layer paths over the pool; other recipes go to `backend`
        from evomerge.dataflow.backend import PathBackend

        return PathBackend.create(
            config.search_space(), request, lambda: build_backend(config.backend, request)
        )
    return build_backend(config.backend, request)


def evaluate_once(
    config: EvolveConfig,
    candidates: Sequence[Any],
    seeds: Sequence[int],
    *,
    split: str = "dev",
    tasks: list[Any] | None = None,
) -> list[EvalResult]:
    """`candidates` (with their mask seeds) scored through a backend built for this call (make_backend's
    `split` and `tasks`) and closed after it, also on failure."""
    backend = make_backend(config, split=split, tasks=tasks)
    try:
        return backend.evaluate_batch(list(candidates), list(seeds))
    finally:
        backend.close()


def load_tasks(config: EvolveConfig, *, split: str = "dev") -> list[Any]:
    from evomerge.eval.tasks import load_task

    tasks: list[Any] = []
    for task in config.fitness:
        if task.lm_eval is not None:
            if split != "dev":
                raise RunStateError(f"fitness task {task.task_name!r} (lm_eval) has no held-out test split.")
            tasks.append(_lm_eval_task(task))
            continue
        path = task.dev if split == "dev" else task.test
        if path is None:
            raise RunStateError(f"fitness task {task.task_name!r} has no test split; add 'test: PATH'.")
        limit = task.limit if split == "dev" else None
        tasks.append(
            load_task(path, metric=task.metric, limit=limit, name=task.task_name, weight=task.weight)
        )
    return tasks


# --- steady-state (a pool of workers, an optimiser told one result at a time) ---------------------------
@dataclass
class SteadyRun:
    """What a steady-state checkpoint holds: the optimiser, how many genomes it has asked, and those asked
    but not told yet (ask number -> genome), which a resumed run evaluates (or tells, if committed)."""

    optimizer: Any  # SteadyState and Optimizer
    asked: int = 0
    out: dict[int, np.ndarray] = field(default_factory=dict)

    def key(self, number: int) -> tuple[int, int]:
        """Ask number -> (generation, index) in the store: population_size asks make a generation."""
        return divmod(number, int(self.optimizer.population_size))

    @property
    def rng(self) -> Any:
        return getattr(self.optimizer, "rng", None)

    def elites(self) -> list[Elite]:
        return list(self.optimizer.elites())

    def stats(self) -> dict[str, float] | None:
        stats = getattr(self.optimizer, "stats", None)
        return stats() if callable(stats) else None


def _steady_state(
    store: RunStore,
    backend: Backend,
    space: SearchSpace,
    config: EvolveConfig,
    clock: _Clock,
    checkpoint: Checkpoint | None,
) -> int:
    """Keep every worker busy: a free worker gets the next genome at once; each result is committed, then
    told, then the free workers get new genomes. The checkpoint after each such step holds every genome
    asked so far, so a resumed run never asks one again: those not committed are evaluated, one committed
    but not told is told from the store. What the optimiser is told depends on which worker finishes
    first, so two runs (or a run and its resume) may differ."""
    if not isinstance(backend, Pool):
        raise ConfigError(
            f"backend.schedule: 'steady-state' needs a pool of workers (backend: ray); {type(backend).__name__} "
            "evaluates one batch at a time. Use schedule: synchronous."
        )
    run = _steady_run(store, backend, space, config, clock, checkpoint)
    ready: deque[tuple[int, EvalResult]] = deque()  # committed before a kill, not told yet
    running = 0
    for number, genome in sorted(run.out.items()):
        running += _start(store, backend, space, config, run, number, genome, ready)
    while True:
        while not ready and backend.idle_workers() and _may_ask(store, clock, running):
            genome = np.asarray(run.optimizer.ask_one(), dtype=float)  # (D,)
            number, run.asked = run.asked, run.asked + 1
            run.out[number] = genome
            running += _start(store, backend, space, config, run, number, genome, ready)
        _save_checkpoint(store, run.key(run.asked)[0], run, clock)
        if not ready and running == 0:
            return run.key(run.asked)[0]
        if ready:
            number, result = ready.popleft()
        else:
            number, result = _next(backend)
            running -= 1
            generation, index = run.key(number)
            point = Point(run.out[number], space.decode(run.out[number]))
            seed = candidate_seed(config.seed, generation, index)
            _commit(store, space, generation, index, point, seed, result)
            store.save_elapsed(clock.elapsed())
        run.optimizer.tell_one(run.out.pop(number), result)
        clock.report(run.key(number)[0], store)


def _steady_run(
    store: RunStore,
    backend: Backend,
    space: SearchSpace,
    config: EvolveConfig,
    clock: _Clock,
    checkpoint: Checkpoint | None,
) -> SteadyRun:
    """The checkpointed steady-state run, or a new one around the warm-started optimiser."""
    if checkpoint is None:
        optimizer, _ = _restore_or_start(store, backend, space, config, clock, None)
        run = SteadyRun(optimizer)
    else:
        state = load_blob(checkpoint.optimizer, f"{store.path}'s steady-state checkpoint")
        run = state if isinstance(state, SteadyRun) else SteadyRun(state)  # the warm start's checkpoint
    if not isinstance(run.optimizer, SteadyState):
        raise ConfigError(
            f"backend.schedule: 'steady-state' needs an optimiser that takes results one "
            f"at a time; {type(run.optimizer).__name__} does not."
        )
    return run


def _start(
    store: RunStore,
    backend: Pool,
    space: SearchSpace,
    config: EvolveConfig,
    run: SteadyRun,
    number: int,
    genome: np.ndarray,
    ready: deque[tuple[int, EvalResult]],
) -> int:
    """Submit ask `number` to the pool (1), or queue its stored result when a run killed before telling
    it had committed it (0): nothing is evaluated twice."""
    generation, index = run.key(number)
    point = Point(genome, space.decode(genome))
    stored = _stored(store, generation, index, point)
    if stored is not None:
        ready.append((number, stored))
        return 0
    backend.submit(number, point.candidate, candidate_seed(config.seed, generation, index))
    return 1


def _next(backend: Pool) -> tuple[int, EvalResult]:
    key, result = backend.next_result()
    assert isinstance(key, int)  # the loop submits ints
    return key, result


def _may_ask(store: RunStore, clock: _Clock, running: int) -> bool:
    done = store.count_evaluations()
    return clock.stop_reason(done) is None and clock.evaluations_left(done) > running


def _lm_eval_task(task: Any) -> Any:
    from evomerge.eval.lm_eval_fitness import LmEvalTask

    return LmEvalTask(
        name=task.task_name,
        task=task.lm_eval,
        weight=task.weight,
        metric=task.lm_eval_metric,
        limit=task.limit,
        num_fewshot=task.num_fewshot,
        include_path=task.include_path,
    )


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
