"""The single-objective optimisers: CMA-ES (with IPOP/BIPOP restarts) and random search.

Every optimiser is one picklable object holding all of its state (including its random generator), so the
evolve loop checkpoints it with `pickle.dumps` and a restored copy asks exactly what the original would
have asked. Each has its own settings block (a pydantic model; `search.registry` maps names to them).
"""

from __future__ import annotations

import functools
import logging
import math
import pickle
from collections.abc import Sequence
from typing import ClassVar, Literal

import numpy as np
from pydantic import Field

from evomerge.errors import ConfigError
from evomerge.eval.result import EvalResult
from evomerge.search.base import (
    Optimizer,
    OptimizerSettings,
    SearchSpace,
    Seeds,
    SingleObjective,
    finite_or_worst,
    scores_of,
)

log = logging.getLogger(__name__)

MAX_CMA_GENES = 2000  # a (D, D) covariance: 32 MB and a few seconds' eigendecomposition at 2000


class RandomSettings(OptimizerSettings):
    """`random`: uniform samples in the box, the baseline every other optimiser must beat."""

    name: Literal["random"] = "random"
    steady_state: ClassVar[bool] = True


class CMAESSettings(OptimizerSettings):
    """`cma-es`: one search distribution; restarts when it stalls (see CMAESOptimizer)."""

    name: Literal["cma-es"] = "cma-es"
    population_size: int = Field(default=8, ge=4)  # < 2 parents leaves the rank-mu update undefined
    sigma0: float = Field(default=0.2, gt=0)  # step size in gene units (genes live in [0, 1])
    restarts: Literal["none", "ipop", "bipop"] = "ipop"
    # A restart also happens on a plateau: when this many generations in a row found exactly the run's
    # best again without beating it (accuracy near one specialist, where small steps change no prediction
    # and CMA-ES' own stop criteria take long to fire) ...
    flat_generations: int = Field(default=3, ge=1)
    # ... or when the best of the current run has not improved for this many generations. Large, since a
    # noisy fitness (100 dev examples) goes many generations without a new best while still improving.
    stagnation_generations: int = Field(default=20, ge=1)
    # Where a restart's mean is: a uniform random point (IPOP as published: a stalled run's basin is spent),
    # or the best genome told so far (a larger population and a fresh step size look around it again).
    restart_from: Literal["random", "best"] = "random"

    def check_space(self, space: SearchSpace) -> None:
        dim = space.dim
        if dim > MAX_CMA_GENES:
            raise ConfigError(
                f"optimizer.name: cma-es keeps a {dim} x {dim} covariance and decomposes it every few "
                f"generations; above {MAX_CMA_GENES} genes use natural-niches, ga or map-elites (a whole "
                "model's weights), or a coarser search.granularity."
            )


class RandomSearch(SingleObjective):
    """Uniform samples in the bounds: the baseline every other optimiser must beat."""

    def __init__(
        self, lower: np.ndarray, upper: np.ndarray, settings: RandomSettings, *, seed: int, seeds: Seeds = ()
    ) -> None:
        super().__init__(lower, upper, settings, seed, seeds)

    def ask(self) -> np.ndarray:
        return self.rng.uniform(self.lower, self.upper, size=(self.population_size, self.dim))  # (B, D)

    def tell(self, genomes: np.ndarray, results: Sequence[EvalResult]) -> None:
        genomes = self._check_told(genomes, results, self.population_size)
        self._track(genomes, results)

    def ask_one(self) -> np.ndarray:
        # The same draws, in the same order, as a generation's ask: steady-state asks the same genomes.
        return self.rng.uniform(self.lower, self.upper)  # (D,)

    def tell_one(self, genome: np.ndarray, result: EvalResult) -> None:
        self._track(np.asarray(genome, dtype=float)[None, :], [result])


class CMAESOptimizer(SingleObjective):
    """CMA-ES through the `cmaes` library (which minimises: only this adapter flips the sign).

    Starts at the best seed (default: the centre of the box) with step size `sigma0`. A run restarts
    when cmaes' own criteria say it converged (spread collapsed, flat fitness history), when
    `flat_generations` generations in a row found exactly its best again without beating it (a plateau),
    or when its best has not improved for `stagnation_generations` generations:
    - `ipop` (Auger & Hansen 2005): twice the last population, step size `sigma0` again;
    - `bipop` (Hansen 2009): alternates that large-population regime with small-population runs
      (population lambda_def * (lambda_large / (2 lambda_def))^(U^2), step sigma0 * 10^(-2U), U ~ U(0, 1)),
      choosing the small regime whenever it has used fewer evaluations than the large one.
    A restart's mean is a uniform random point (`restart_from: random`, the default, as published) or the
    best genome so far (`best`). On the lm zoo's noisy 100-example fitness, restarts after 8 generations
    without a new best cut short searches that were still improving, whether from the best or from a
    random point (benchmarks/results/warm_start.md): hence a plateau criterion that needs the best
    re-attained exactly, and a long stagnation window.
    """

    def __init__(
        self,
        lower: np.ndarray,
        upper: np.ndarray,
        settings: CMAESSettings,
        *,
        seed: int,
        seeds: Seeds = (),
    ) -> None:
        super().__init__(lower, upper, settings, seed, seeds)
        self.restarts_done = 0
        self.large_population = settings.population_size  # the IPOP regime's population so far
        # Evaluations per BIPOP regime; the first run counts for neither, so the first restart is large.
        self.spent = {"first": 0, "large": 0, "small": 0}
        self.regime: Literal["first", "large", "small"] = "first"
        start = self._best.genome if self._best is not None else (self.lower + self.upper) / 2
        self._new_run(np.clip(start, self.lower, self.upper), settings.sigma0, settings.population_size)

    def _new_run(self, mean: np.ndarray, sigma: float, population_size: int) -> None:
        from cmaes import CMA

        bounds = np.stack([self.lower, self.upper], axis=1)  # (D, 2)
        self.population_size = population_size
        self._cma = CMA(
            mean=mean,
            sigma=sigma,
            bounds=bounds,
            seed=int(self.rng.integers(2**31 - 1)),
            population_size=population_size,
        )
        self._run_best = -math.inf
        self._stale = 0  # generations since the run's best last improved
        self._flat = 0  # generations in a row whose best equalled the run's best exactly

    def ask(self) -> np.ndarray:
        # cmaes drops its RandomState when pickled; reseeding it from our own generator before every ask
        # keeps all randomness in `self.rng`, so a restored checkpoint asks exactly the same genomes.
        self._cma.reseed_rng(int(self.rng.integers(2**31 - 1)))
        return np.stack([self._cma.ask() for _ in range(self.population_size)])  # (B, D)

    def tell(self, genomes: np.ndarray, results: Sequence[EvalResult]) -> None:
        genomes = self._check_told(genomes, results, self.population_size)
        self._track(genomes, results)
        scores = finite_or_worst(scores_of(results))
        self._cma.tell(list(zip(genomes, -scores, strict=True)))  # cmaes minimises
        self.spent[self.regime] += len(genomes)
        self._note_progress(scores)
        if self.settings.restarts != "none" and self._stalled():
            self._restart()

    def _note_progress(self, scores: np.ndarray) -> None:
        best = float(scores.max())
        # On a plateau the search keeps finding exactly its best again without beating it; on a noisy
        # fitness the generation's best moves up and down instead.
        self._flat = self._flat + 1 if best == self._run_best else 0
        if best > self._run_best:
            self._run_best, self._stale = best, 0
        else:
            self._stale += 1

    def _stalled(self) -> bool:
        settings = self.settings
        plateau = self._flat >= settings.flat_generations
        return bool(self._cma.should_stop()) or plateau or self._stale >= settings.stagnation_generations

    def _restart(self) -> None:
        self.restarts_done += 1
        mean = self.rng.uniform(self.lower, self.upper)  # drawn either way: one rng stream for both modes
        if self.settings.restart_from == "best" and self._best is not None:
            mean = self._best.genome.copy()
        base = self.settings.population_size
        if self.settings.restarts == "bipop" and self.spent["small"] < self.spent["large"]:
            u = float(self.rng.uniform())
            population = max(4, int(base * (0.5 * self.large_population / base) ** (u**2)))
            self.regime = "small"
            self._new_run(mean, self.settings.sigma0 * 10 ** (-2 * u), population)
            return
        self.regime = "large"
        self.large_population *= 2
        self._new_run(mean, self.settings.sigma0, self.large_population)

    def __getstate__(self) -> dict[str, object]:
        # cmaes pickles its covariance through a symmetric compression that changes it in the last bit;
        # storing its attributes as they are keeps a restored run bit-identical to an uninterrupted one.
        state = dict(self.__dict__)
        state["_cma"] = {k: v for k, v in vars(self._cma).items() if k != "_rng"}
        return state

    def __setstate__(self, state: dict[str, object]) -> None:
        from cmaes import CMA

        cma = CMA.__new__(CMA)
        cma.__dict__.update(state["_cma"])
        cma._rng = np.random.RandomState()  # reseeded from self.rng before every ask
        self.__dict__.update({**state, "_cma": cma})


# The libraries whose objects an optimiser's pickle may hold (pymoo's algorithm, ribs' archive, cmaes'
# state, numpy's generators). A checkpoint records their versions: pickles of library objects are not
# promised to load, or to behave the same, under another version of the library.
LIBRARIES = ("numpy", "cmaes", "pymoo", "ribs")


@functools.cache  # read from the installed metadata once per process, not at every checkpoint
def library_versions() -> dict[str, str]:
    """The installed versions of LIBRARIES (the ones not installed are left out)."""
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in LIBRARIES:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            continue
    return found


def save_state(optimizer: object) -> bytes:
    """The optimiser's whole state (rng included) as bytes for the run store, with the versions of the
    libraries it may hold objects of."""
    return pickle.dumps(
        {"evomerge_state": 1, "libraries": library_versions(), "state": optimizer},
        protocol=pickle.HIGHEST_PROTOCOL,
    )


def load_blob(blob: bytes, where: str = "the checkpoint") -> object:
    """Inverse of save_state, for any checkpointed state (an optimiser, the steady-state run around one).

    Only ever load blobs this program wrote into its own run store. A blob written under other library
    versions that no longer unpickles raises a ConfigError naming them; one that does is used, with a
    warning that the rest of the run may not match an uninterrupted one."""
    current = library_versions()
    try:
        saved = pickle.loads(blob)  # the run store is written by this process, not downloaded
    except (AttributeError, ImportError, TypeError, ValueError) as error:
        raise ConfigError(
            f"{where} cannot be restored with the libraries installed now ({_versions(current)}): "
            f"{type(error).__name__}: {error}. It was written by other versions of them; install the "
            f"versions the run was started with to resume it, or start it again with --force. Its "
            f"evaluations stay readable (`evomerge elites`, `evomerge export`)."
        ) from error
    if not (isinstance(saved, dict) and saved.get("evomerge_state") == 1):
        return saved  # written before the versions were recorded
    changed = {
        name: (saved["libraries"].get(name), current.get(name))
        for name in set(saved["libraries"]) | set(current)
        if saved["libraries"].get(name) != current.get(name)
    }
    if changed:
        log.warning(
            "%s was written with %s; installed now: %s. The run resumes, but the optimiser may not ask "
            "what an uninterrupted run would have asked.",
            where,
            ", ".join(f"{name} {was or 'absent'}" for name, (was, _) in sorted(changed.items())),
            ", ".join(f"{name} {now or 'absent'}" for name, (_, now) in sorted(changed.items())),
        )
    return saved["state"]


def _versions(found: dict[str, str]) -> str:
    return ", ".join(f"{name} {v}" for name, v in sorted(found.items())) or "none of " + ", ".join(LIBRARIES)


def load_state(blob: bytes, where: str = "the checkpoint") -> Optimizer:
    """Inverse of save_state for an optimiser (see load_blob)."""
    optimizer = load_blob(blob, where)
    if not isinstance(optimizer, Optimizer):
        raise TypeError(f"checkpoint holds a {type(optimizer).__name__}, not an optimizer")
    return optimizer
