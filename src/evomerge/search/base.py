"""The search seam: what a search space and an optimiser are, and the registry that names optimisers.

The evolve loop, the run config and the report talk to these protocols only, so a data-flow space, a
black-box space, MAP-Elites or NSGA-II plug in without touching them.

- A `SearchSpace` maps genomes (points of a box) to candidates (what a backend evaluates: a merge
  recipe, a layer path, ...) and back. It is built from metadata and never loads weights.
- An `Optimizer` asks for genomes and is told the *whole* EvalResult of each (per-task and per-example
  scores, behaviour measures), so quality-diversity and multi-objective strategies see more than one
  number. One convention throughout: higher is better. `elites()` is what the optimiser would hand back
  now: its best for a single-objective search, an archive or a front otherwise.
- Each optimiser has its own pydantic settings class (its block in the run config, chosen by `name`),
  validated with the rest of the config before any model is loaded; `search.registry` names them.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, Protocol, runtime_checkable

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from evomerge.eval.result import EvalResult
from evomerge.extras import check_extra


# --- search spaces ------------------------------------------------------------------------------------
@runtime_checkable
class SearchSpace(Protocol):
    """Genome (a point of the box `bounds`, shape (dim,)) <-> candidate. Pure: reads no weights."""

    @property
    def dim(self) -> int: ...

    @property
    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """(lower, upper), each (dim,)."""
        ...

    def decode(self, x: np.ndarray) -> Any:
        """The candidate of genome `x` (what a backend evaluates)."""
        ...

    def encode(self, candidate: Any) -> np.ndarray:
        """The genome nearest to `candidate` (clipped to the bounds)."""
        ...

    def genome_of(self, candidate: Any) -> np.ndarray | None:
        """The genome that decodes to exactly this candidate, or None when the candidate lies outside the
        space (another method, a value out of bounds, ...). The warm start seeds optimisers with these."""
        ...

    def to_text(self, candidate: Any) -> str:
        """The candidate as text for the run store and the exported recipe (`from_text` reads it back)."""
        ...

    def from_text(self, text: str) -> Any: ...

    def describe(self) -> str:
        """One paragraph for the report: what the genes are."""
        ...

    def per_layer(self, x: np.ndarray) -> dict[str, np.ndarray]:
        """Row label -> value per layer, for the report's heatmap ({} where the space has no layers)."""
        ...

    def export(self, text: str, out_dir: Path, *, seed: int, force: bool = False) -> Path:
        """Write the candidate stored as `text` as a model dir (`seed`: its random masks); an existing
        `out_dir` is replaced only with `force`."""
        ...


@runtime_checkable
class TensorSpace(Protocol):
    """A space whose genome is whole tensors laid end to end (the weights space): what tensor-wise
    variation (CycleQD's SVD mutation of task vectors) needs besides the box."""

    def tensor_slots(self) -> list[tuple[int, tuple[int, ...]]]:
        """(offset, shape) of each tensor in the genome, in layout order."""
        ...

    def origin(self) -> np.ndarray:
        """The base model's genome (dim,): a genome minus it is a task vector."""
        ...


# --- optimisers ---------------------------------------------------------------------------------------
@dataclass
class Elite:
    """One solution an optimiser keeps: its genome, its whole result, and where it sits (`niche`: "best",
    an archive cell, a front rank)."""

    genome: np.ndarray
    result: EvalResult
    niche: str = "best"
    measures: dict[str, float] = field(default_factory=dict)

    @property
    def score(self) -> float:
        return self.result.score


@runtime_checkable
class Optimizer(Protocol):
    """`ask()` a batch of genomes (batch, dim), evaluate them, `tell(genomes, results)`; `elites()`.

    An optimiser may also define `stats() -> dict[str, float]` (an archive's coverage and QD score, a
    front's size and hypervolume): the loop stores them with every checkpoint and the report plots them
    against evaluations."""

    dim: int
    population_size: int

    def ask(self) -> np.ndarray: ...

    def tell(self, genomes: np.ndarray, results: Sequence[EvalResult]) -> None: ...

    def elites(self) -> list[Elite]: ...


@runtime_checkable
class SteadyState(Protocol):
    """An optimiser that may also be asked and told one genome at a time, in any order, while other asked
    genomes are still being evaluated (the Ray backend's `schedule: steady-state`). Its settings class
    says so with `steady_state = True`, so a config is checked before any model loads."""

    def ask_one(self) -> np.ndarray:
        """One genome (dim,), bred from what has been told so far."""
        ...

    def tell_one(self, genome: np.ndarray, result: EvalResult) -> None:
        """The result of one genome `ask_one` returned."""
        ...


# The warm start's in-space genomes with their results, in evaluation order (optimisers seed from them).
Seeds = Sequence[tuple[np.ndarray, EvalResult]]
StartMode = Literal["best-known", "center", "best-source"]


class OptimizerSettings(BaseModel):
    """What every optimiser's settings block holds; each optimiser subclasses it with its own fields.

    `start` decides the warm start (the loop evaluates it as generation -1, inside the budget):
    - `best-known` (default): each source, the default merges the results table reports (linear
      average, task arithmetic, TIES and DARE-TIES at their defaults) and the centre of the box; those
      that lie in the search space seed the optimiser, and the run's best is chosen among all of them.
    - `center`: nothing is evaluated first; the optimiser starts at the centre of the box.
    - `best-source`: each source alone as a genome of the space (its weight 1, the others 0).
    """

    model_config = ConfigDict(extra="forbid")
    steady_state: ClassVar[bool] = False  # whether the optimiser is SteadyState (takes results one at a time)

    name: str
    population_size: int = Field(default=8, ge=2)
    seed: int | None = None  # None: the run's seed
    start: StartMode = "best-known"

    def check_tasks(self, task_names: Sequence[str]) -> None:
        """Refuse settings that name fitness tasks the config does not have (objectives, measures)."""
        return None

    def check_space(self, space: SearchSpace) -> None:
        """Refuse a search space this optimiser cannot search (checked before any model loads)."""
        return None

    def measures_needed(self) -> tuple[str, ...]:
        """Behaviour measures the backend must add to every result (e.g. "sparsity" for an objective)."""
        return ()


class BoxOptimizer:
    """What every optimiser over the box [lower, upper] holds: the bounds, its settings, its population
    size and its own generator, seeded from the run (all of it pickles with the optimiser)."""

    def __init__(self, lower: np.ndarray, upper: np.ndarray, settings: Any, seed: int) -> None:
        self.lower = np.asarray(lower, dtype=float)
        self.upper = np.asarray(upper, dtype=float)
        self.dim = int(self.lower.shape[0])
        self.settings = settings
        self.population_size = int(settings.population_size)
        self.rng = np.random.default_rng(seed)


class SingleObjective(BoxOptimizer):
    """Keeps the best genome told so far (first one wins ties); failed or non-finite results never win.

    The elite of a single-objective optimiser; seeds given at construction count as told.
    """

    def __init__(
        self, lower: np.ndarray, upper: np.ndarray, settings: Any, seed: int, seeds: Seeds = ()
    ) -> None:
        super().__init__(lower, upper, settings, seed)
        self._best: Elite | None = None
        for genome, result in seeds:
            self._track(np.asarray(genome, dtype=float)[None, :], [result])

    def elites(self) -> list[Elite]:
        return [] if self._best is None else [self._best]

    @property
    def best(self) -> tuple[np.ndarray, float] | None:
        return None if self._best is None else (self._best.genome, self._best.score)

    def _track(self, genomes: np.ndarray, results: Sequence[EvalResult]) -> None:
        for genome, result, score in zip(genomes, results, scores_of(results), strict=True):
            if math.isfinite(score) and (self._best is None or score > self._best.score):
                self._best = Elite(np.array(genome, dtype=float), result)

    def _check_told(self, genomes: np.ndarray, results: Sequence[EvalResult], expected: int) -> np.ndarray:
        return check_told(genomes, results, expected, self.dim)


def check_told(genomes: np.ndarray, results: Sequence[EvalResult], expected: int, dim: int) -> np.ndarray:
    """`genomes` as floats (expected, dim), after checking one result per asked genome; else ValueError."""
    genomes = np.asarray(genomes, dtype=float)
    if genomes.shape != (expected, dim) or len(results) != expected:
        raise ValueError(
            f"tell: expected genomes ({expected}, {dim}) and {expected} results, "
            f"got {genomes.shape} and {len(results)}; tell every genome of the last ask() once."
        )
    return genomes


SEARCH_EXTRA = "install it with `pip install 'evomerge[search]'`"


def require_extra(module: str, who: str) -> None:
    """A ConfigError (a ValueError, so pydantic locates it) when `module` of the `search` extra is missing."""
    check_extra(module, who=who, extra="search")


def is_space_text(text: str, kind: str) -> bool:
    """Whether `text` is a candidate stored by the space whose JSON texts carry `"space": kind` (and not,
    say, a merge recipe's YAML): how a space that stores JSON tells its own candidates apart."""
    if not text.startswith("{"):
        return False
    try:
        payload = json.loads(text)
    except json.JSONDecodeError:
        return False
    return isinstance(payload, dict) and payload.get("space") == kind


def as_genome(x: np.ndarray, dim: int) -> np.ndarray:
    """`x` as a float genome of shape (dim,); ValueError for another shape, NaN or inf."""
    x = np.asarray(x, dtype=float)
    if x.shape != (dim,):
        raise ValueError(f"genome: expected shape ({dim},), got {x.shape}.")
    if not np.all(np.isfinite(x)):
        raise ValueError("genome: holds NaN or inf.")
    return x


def scores_of(results: Sequence[EvalResult]) -> np.ndarray:
    """Each result's score, NaN where the evaluation failed. (N,)"""
    return np.array([r.score if r.ok else np.nan for r in results], dtype=float)


def finite_or_worst(scores: np.ndarray) -> np.ndarray:
    """NaN/inf scores become a little worse than the worst finite one, so a ranking method can use them."""
    finite = scores[np.isfinite(scores)]
    worst = float(finite.min()) - 1.0 if finite.size else 0.0
    return np.where(np.isfinite(scores), scores, worst)
