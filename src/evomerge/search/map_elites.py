"""`map-elites`: quality diversity through pyribs, with CycleQD's cycling quality by default.

MAP-Elites (Mouret & Clune 2015) keeps a grid of cells over behaviour measures and, in each cell, the best
genome that landed there (its elite); new genomes are bred from elites. Here the measures are fitness
tasks' scores (every built-in metric lies in [0, 1]), so the grid is a map of *trade-offs between tasks*.

Two ways to choose quality and measures (`MapElitesSettings.measures`):
- explicit `measures`: one archive; quality is the weighted fitness `result.score`, or the task `quality`
  names; the named tasks' scores are the measures.
- left out (the default), CycleQD (Kuroki et al. 2024, arXiv:2410.14735): with tasks T1..Tk there are k
  archives, archive i scoring quality by Ti and placing genomes by the other tasks' scores. Every
  evaluated genome goes into *every* archive (its scores are known for all tasks), but each generation
  breeds only from the archive of the current quality task, which cycles T1, T2, ..., Tk, T1, ... one
  generation at a time. This is what CycleQD's released code does (one archive map per task, children
  inserted into all of them, parents sampled from the quality task's). One archive re-scored each
  generation would instead throw away, at every switch, the elites of cells the new quality ranks
  differently; k archives keep each task's specialists.

Breeding is a pyribs emitter over the quality archive: `iso-line` (Vassiliades & Mouret 2018, Iso+LineDD:
an elite plus Gaussian noise plus a random step along the line to a second elite; in a linear merge space
such as task-arithmetic weights that line is CycleQD's model-merging crossover in task-vector space) or
`gaussian` (an elite plus Gaussian noise). Before anything is told (no warm start), a generation is
uniform in the box, as MAP-Elites starts.

Each told genome and its whole EvalResult are kept by the optimiser under an integer id that the archive
stores beside the solution, so `elites()` returns exactly the genomes told (the loop finds their
evaluations by exact genome) with their results. Failed or non-finite results never enter an archive.
Everything (archives and emitters with their numpy Generators) pickles; a restored copy asks the same.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from pydantic import Field, ValidationInfo, field_validator, model_validator

from evomerge.errors import ConfigError
from evomerge.eval.result import WORST_SCORE, EvalResult
from evomerge.search.base import (
    SEARCH_EXTRA,
    BoxOptimizer,
    Elite,
    OptimizerSettings,
    SearchSpace,
    Seeds,
    TensorSpace,
    check_told,
    require_extra,
)


class MapElitesSettings(OptimizerSettings):
    """`map-elites`: a grid archive over task scores (see the module doc for the CycleQD default)."""

    name: Literal["map-elites"] = "map-elites"
    # Fitness task names whose scores place a genome in the grid; None: CycleQD's cycling quality.
    measures: list[str] | None = Field(default=None, min_length=1)
    quality: str | None = None  # a task name; None: the weighted fitness `score` (explicit measures only)
    resolution: int | list[int] = 10  # cells per measure (one value for all, or one per measure)
    measure_ranges: list[tuple[float, float]] | None = None  # None: [0, 1] per measure
    emitter: Literal["iso-line", "gaussian"] = "iso-line"
    # Gaussian step in gene units (genes usually live in [0, 1]); ribs' own default 0.01 is slow to move
    # within the few hundred evaluations a merge search affords.
    sigma: float = Field(default=0.05, gt=0)
    line_sigma: float = Field(default=0.2, ge=0)  # iso-line: step along the line between two elites
    # CycleQD's SVD mutation of each child's task vectors (whole models: `search.space: weights`): the top
    # `svd_rank` singular directions of each weight matrix's task vector grow by gains drawn in
    # [0, svd_scale) (merge.svd_mutation); "none": only the emitter's variation.
    mutation: Literal["none", "svd"] = "none"
    svd_rank: int = Field(default=8, ge=1)
    svd_scale: float = Field(default=0.1, gt=0)  # CycleQD's configs: 0.1

    @field_validator("measures")
    @classmethod
    def _distinct_measures(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and len(set(value)) != len(value):
            raise ValueError(f"each task may be one measure only, got {value}")
        return value

    @field_validator("quality")
    @classmethod
    def _quality_needs_measures(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is not None and info.data.get("measures") is None:
            raise ValueError(
                "a fixed quality task needs explicit measures; without measures the quality cycles through "
                "every fitness task (CycleQD). Add `measures: [...]` or remove `quality`."
            )
        return value

    @field_validator("resolution")
    @classmethod
    def _at_least_one_cell(cls, value: int | list[int], info: ValidationInfo) -> int | list[int]:
        cells = [value] if isinstance(value, int) else value
        if not cells or min(cells) < 1:
            raise ValueError(f"each measure needs at least 1 cell, got {value}; give an integer >= 1")
        _check_count(value, info.data.get("measures"))
        return value

    @field_validator("measure_ranges")
    @classmethod
    def _ordered_ranges(
        cls, value: list[tuple[float, float]] | None, info: ValidationInfo
    ) -> list[tuple[float, float]] | None:
        for low, high in value or []:
            if not (math.isfinite(low) and math.isfinite(high) and low < high):
                raise ValueError(
                    f"each range must be finite [low, high] with low < high, got [{low}, {high}]"
                )
        _check_count(value, info.data.get("measures"))
        return value

    @model_validator(mode="after")
    def _ribs_installed(self) -> MapElitesSettings:
        require_extra("ribs", "'map-elites'")
        return self

    def check_space(self, space: SearchSpace) -> None:
        if self.mutation == "svd" and not isinstance(space, TensorSpace):
            raise ConfigError(
                "optimizer.mutation: 'svd' mutates task vectors tensor by tensor, which needs a genome of "
                f"whole tensors (search.space: weights); this space is {type(space).__name__}. Use "
                "mutation: none (the emitter's steps) or search whole models."
            )

    def check_tasks(self, task_names: Sequence[str]) -> None:
        """Refuse measures or a quality naming unknown tasks, and the CycleQD default with < 2 tasks."""
        known = ", ".join(task_names)
        for field, names in (
            ("measures", self.measures or []),
            ("quality", [self.quality] if self.quality else []),
        ):
            for name in names:
                if name not in task_names:
                    raise ConfigError(
                        f"optimizer.{field}: unknown task {name!r}; the fitness tasks are {known} "
                        "(a task's name is its `name`, else its dev file's folder)."
                    )
        if self.measures is None:
            _check_cycle(task_names)
            others = "the other tasks in each archive"  # CycleQD: k - 1 measures per archive
            for field in ("resolution", "measure_ranges"):
                _check_count(getattr(self, field), [others] * (len(task_names) - 1), field=field)


def _check_cycle(task_names: Sequence[str]) -> None:
    if len(task_names) < 2:
        raise ConfigError(
            f"optimizer.measures: the default (CycleQD: each task in turn is the quality, the others are "
            f"the measures) needs at least 2 fitness tasks, the config has {len(task_names)} "
            f"({', '.join(task_names) or 'none'}); name `measures` (fitness tasks) or add fitness tasks."
        )


def _check_count(value: Any, measures: Sequence[str] | None, *, field: str | None = None) -> None:
    """A per-measure list must give one value per measure (a single int resolution serves all).

    Inside a pydantic validator (`field` None) pydantic names the field; elsewhere the message does.
    """
    if not isinstance(value, list) or measures is None or len(value) == len(measures):
        return
    where = f"optimizer.{field}: " if field else ""
    names = ", ".join(dict.fromkeys(measures))
    raise ConfigError(
        f"{where}expected one value per measure, {len(measures)} ({names}), got {len(value)}; "
        "give one per measure, or a single number for all."
    )


# --- archives -----------------------------------------------------------------------------------------
@dataclass
class _Archive:
    """One ribs GridArchive, the emitter that breeds from it, and which scores place a result in it."""

    quality: str | None  # a task name; None: `result.score`
    measures: tuple[str, ...]  # task names; () for the one-cell archive
    label: str  # the niche's prefix ("" with one archive, else "quality T, ")
    grid: Any  # ribs.archives.GridArchive
    emitter: Any  # ribs.emitters.IsoLineEmitter | GaussianEmitter

    def placement(self, result: EvalResult) -> tuple[float, np.ndarray] | None:
        """(quality, measures (M,)) of an ok result, None when a score it needs is missing or not finite."""
        try:
            quality = result.score if self.quality is None else result.tasks[self.quality].score
            measures = [result.tasks[name].score for name in self.measures] or [0.0]
        except KeyError:
            return None
        values = np.array([quality, *measures], dtype=float)
        return (float(values[0]), values[1:]) if np.all(np.isfinite(values)) else None

    def niche(self, cell: np.ndarray) -> str:
        return f"{self.label}cell ({', '.join(str(int(i)) for i in cell)})"


class MapElites(BoxOptimizer):
    """MAP-Elites over fitness tasks through pyribs (see the module doc). All state in one picklable object."""

    def __init__(
        self,
        lower: np.ndarray,
        upper: np.ndarray,
        settings: MapElitesSettings,
        *,
        seed: int,
        seeds: Seeds = (),
        space: SearchSpace | None = None,
    ) -> None:
        super().__init__(lower, upper, settings, seed)
        self._tensors: tuple[list[tuple[int, tuple[int, ...]]], np.ndarray] | None = None  # (slots, origin)
        if settings.mutation == "svd":
            if not isinstance(space, TensorSpace):  # a run checks this before any model loads
                raise ConfigError(
                    "optimizer.mutation: 'svd' needs a space of whole tensors (search.space: weights)."
                )
            self._tensors = (space.tensor_slots(), np.asarray(space.origin(), dtype=float))
        self.generation = 0  # generations told; the quality archive is archives[generation % k]
        self.archives: list[_Archive] = []  # built when the task names are known (see _layout)
        self._told: dict[int, tuple[np.ndarray, EvalResult]] = {}  # id -> (genome, result) of archived ones
        self._next_id = 0
        if settings.measures is not None:
            self._build([(settings.quality, tuple(settings.measures))])
        if seeds:  # the warm start enters the archives before the first ask
            self._insert(np.stack([np.asarray(g, dtype=float) for g, _ in seeds]), [r for _, r in seeds])

    # --- ask / tell ---------------------------------------------------------------------------------
    @property
    def quality_task(self) -> str | None:
        """The task the next generation improves (None: the weighted score, or nothing archived yet)."""
        archive = self._breeding()
        return None if archive is None else archive.quality

    def ask(self) -> np.ndarray:
        """population_size genomes (B, D): bred from the quality archive, uniform while it is empty."""
        archive = self._breeding()
        if archive is None or archive.grid.empty:
            return self.rng.uniform(self.lower, self.upper, size=(self.population_size, self.dim))
        children = np.asarray(archive.emitter.ask(), dtype=float)  # (B, D), clipped to the box by ribs
        if self._tensors is None:
            return children
        return np.clip(self._svd_mutated(children), self.lower, self.upper)

    def _svd_mutated(self, children: np.ndarray) -> np.ndarray:
        """Each child's task vectors (child - origin, per weight matrix) after CycleQD's SVD mutation."""
        import torch

        from evomerge.merge.svd_mutation import svd_mutation

        assert self._tensors is not None
        slots, origin = self._tensors
        generator = torch.Generator().manual_seed(int(self.rng.integers(2**63 - 1)))
        mutated = children.copy()
        for child in mutated:  # (D,) views: written in place
            for offset, shape in slots:
                if len(shape) < 2:
                    continue  # biases and norms: CycleQD leaves them alone
                stop = offset + int(np.prod(shape))
                task_vector = torch.from_numpy(child[offset:stop] - origin[offset:stop]).reshape(shape)
                changed = svd_mutation(
                    task_vector,
                    rank=self.settings.svd_rank,
                    scale=self.settings.svd_scale,
                    generator=generator,
                )
                child[offset:stop] = origin[offset:stop] + changed.reshape(-1).numpy()
        return mutated

    def tell(self, genomes: np.ndarray, results: Sequence[EvalResult]) -> None:
        genomes = check_told(genomes, results, self.population_size, self.dim)
        self._insert(genomes, results)
        self.generation += 1

    def _breeding(self) -> _Archive | None:
        return self.archives[self.generation % len(self.archives)] if self.archives else None

    # --- archives -----------------------------------------------------------------------------------
    def _insert(self, genomes: np.ndarray, results: Sequence[EvalResult]) -> None:
        """Every ok result into every archive where it has the scores (pyribs keeps the better per cell)."""
        ok = [i for i, result in enumerate(results) if result.ok]
        if not self.archives and ok:
            self._build(_layout(results[ok[0]]))
        for i in ok:
            self._told[self._next_id + i] = (genomes[i].copy(), results[i])
        for archive in self.archives:
            self._add(archive, [(self._next_id + i, results[i]) for i in ok])
        self._next_id += len(results)
        self._forget_unarchived()

    def _add(self, archive: _Archive, told: list[tuple[int, EvalResult]]) -> None:
        placed = [(key, archive.placement(result)) for key, result in told]
        rows = [(key, where) for key, where in placed if where is not None]
        if not rows:
            return
        keys = np.array([key for key, _ in rows], dtype=np.int64)
        archive.grid.add(
            np.stack([self._told[key][0] for key in keys]),  # (N, D)
            np.array([quality for _, (quality, _) in rows]),  # (N,)
            np.stack([measures for _, (_, measures) in rows]),  # (N, M)
            told=keys,
        )

    def _forget_unarchived(self) -> None:
        """Keep only the told genomes some archive still holds (a run tells thousands)."""
        held = {int(key) for archive in self.archives for key in archive.grid.data("told")}
        self._told = {key: value for key, value in self._told.items() if key in held}

    def _build(self, layout: list[tuple[str | None, tuple[str, ...]]]) -> None:
        ribs = _import_ribs()
        for quality, measures in layout:
            dims, ranges = _grid_shape(self.settings, measures)
            grid = ribs.archives.GridArchive(
                solution_dim=self.dim,
                dims=dims,
                ranges=ranges,
                seed=int(self.rng.integers(2**31 - 1)),
                dtype=np.float64,  # told genomes are float64; the archive must not round them
                extra_fields={"told": ((), np.int64)},
            )
            label = f"quality {quality}, " if len(layout) > 1 else ""
            self.archives.append(_Archive(quality, measures, label, grid, self._emitter(ribs, grid)))

    def _emitter(self, ribs: Any, grid: Any) -> Any:
        settings = self.settings
        common = {
            "x0": (self.lower + self.upper) / 2,  # unused: an empty archive is sampled uniformly instead
            "lower_bounds": self.lower,
            "upper_bounds": self.upper,
            "batch_size": self.population_size,
            "seed": int(self.rng.integers(2**31 - 1)),
        }
        if settings.emitter == "gaussian":
            return ribs.emitters.GaussianEmitter(grid, sigma=settings.sigma, **common)
        return ribs.emitters.IsoLineEmitter(
            grid, iso_sigma=settings.sigma, line_sigma=settings.line_sigma, **common
        )

    # --- reading ------------------------------------------------------------------------------------
    def elites(self) -> list[Elite]:
        """Every archive's elites, archive by archive, cell by cell (a genome may be elite in several)."""
        return [elite for archive in self.archives for elite in self._elites_of(archive)]

    def _elites_of(self, archive: _Archive) -> list[Elite]:
        data = archive.grid.data()
        order = np.argsort(data["index"])
        cells = archive.grid.int_to_grid_index(data["index"][order])  # (N, M)
        elites = []
        for key, cell, measures in zip(data["told"][order], cells, data["measures"][order], strict=True):
            genome, result = self._told[int(key)]
            named = {name: float(value) for name, value in zip(archive.measures, measures, strict=False)}
            elites.append(Elite(genome.copy(), result, archive.niche(cell), named))
        return elites

    def stats(self) -> dict[str, float]:
        """Coverage and QD score over every archive, for the run store and the report."""
        return {"coverage": self.coverage(), "qd_score": self.qd_score()} if self.archives else {}

    def coverage(self, task: str | None = None) -> float:
        """Fraction of cells holding an elite, over every archive (or the one whose quality is `task`)."""
        archives = self._chosen(task)
        cells = sum(int(np.prod(a.grid.dims)) for a in archives)
        return sum(len(a.grid) for a in archives) / cells if cells else 0.0

    def qd_score(self, task: str | None = None, offset: float = WORST_SCORE) -> float:
        """Sum over filled cells of (quality - offset): an empty cell counts 0, a cell at the worst score too.

        Over every archive, or the one whose quality is `task`. `offset` defaults to the worst score of the
        built-in metrics (0), so the QD score only grows as cells fill and elites improve.
        """
        return sum(float(np.sum(a.grid.data("objective") - offset)) for a in self._chosen(task))

    def _chosen(self, task: str | None) -> list[_Archive]:
        if task is None:
            return self.archives
        chosen = [archive for archive in self.archives if archive.quality == task]
        if not chosen:
            qualities = ", ".join(str(a.quality) for a in self.archives) or "none yet"
            raise ValueError(f"no archive has quality {task!r}; the archives' qualities: {qualities}")
        return chosen


def _layout(result: EvalResult) -> list[tuple[str | None, tuple[str, ...]]]:
    """CycleQD's archives from the first ok result's tasks: (quality, measures) for each task in turn.

    Results with fewer than two task scores (only possible without `check_tasks`, e.g. an optimiser made
    directly) get one one-cell archive whose quality is `score`: an elitist search that keeps the best.
    """
    tasks = list(result.tasks)
    if len(tasks) < 2:
        return [(None, ())]
    return [(task, tuple(other for other in tasks if other != task)) for task in tasks]


def _grid_shape(
    settings: MapElitesSettings, measures: tuple[str, ...]
) -> tuple[list[int], list[tuple[float, float]]]:
    """Cells and range per measure; the one-cell archive (no measures) has one dummy measure."""
    if not measures:
        return [1], [(0.0, 1.0)]
    for field in ("resolution", "measure_ranges"):  # check_tasks has said so for a config's tasks
        _check_count(getattr(settings, field), measures, field=field)
    resolution = settings.resolution
    dims = [resolution] * len(measures) if isinstance(resolution, int) else list(resolution)
    return dims, list(settings.measure_ranges or [(0.0, 1.0)] * len(measures))


def _import_ribs() -> Any:
    try:
        import ribs.archives
        import ribs.emitters
    except ImportError as error:
        raise ConfigError(f"optimizer.name: 'map-elites' needs pyribs ({error}); {SEARCH_EXTRA}") from error
    return ribs
