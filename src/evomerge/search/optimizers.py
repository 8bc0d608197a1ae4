"""Ask/tell optimisers over a box of genes. One convention: a higher score is better.

Every optimiser is one picklable object holding all of its state (including its random generator), so the
evolve loop checkpoints it with `pickle.dumps` and a restored copy asks exactly what the original would
have asked. New strategies (MAP-Elites, NSGA-II, natural niches, ...) register a factory under a name
with `register_optimizer` and are then chosen in the run config.
"""

from __future__ import annotations

import math
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, Protocol, runtime_checkable

import numpy as np

from evomerge.errors import ConfigError


@dataclass(frozen=True)
class OptimizerSettings:
    """What every optimiser is built from; fields an optimiser does not use are ignored."""

    name: str = "cma-es"
    population_size: int = 8
    sigma0: float = 0.2  # CMA-ES step size, in gene units (genes live in [0, 1])
    seed: int = 0
    restarts: Literal["none", "ipop"] = "none"


@runtime_checkable
class Optimizer(Protocol):
    """`ask()` a batch of genomes (batch, dim), evaluate them, `tell(genomes, scores)` (higher is better)."""

    dim: int
    population_size: int

    def ask(self) -> np.ndarray: ...

    def tell(self, genomes: np.ndarray, scores: np.ndarray) -> None: ...

    @property
    def best(self) -> tuple[np.ndarray, float] | None: ...


class _Tracked:
    """Keeps the best genome told so far (first one wins ties); non-finite scores never win."""

    def __init__(self, lower: np.ndarray, upper: np.ndarray) -> None:
        self.lower = np.asarray(lower, dtype=float)
        self.upper = np.asarray(upper, dtype=float)
        self.dim = int(self.lower.shape[0])
        self._best: tuple[np.ndarray, float] | None = None

    @property
    def best(self) -> tuple[np.ndarray, float] | None:
        return self._best

    def _track(self, genomes: np.ndarray, scores: np.ndarray) -> None:
        for genome, score in zip(genomes, scores, strict=True):
            if math.isfinite(score) and (self._best is None or score > self._best[1]):
                self._best = (np.array(genome, dtype=float), float(score))

    def _check_told(
        self, genomes: np.ndarray, scores: np.ndarray, expected: int
    ) -> tuple[np.ndarray, np.ndarray]:
        genomes = np.asarray(genomes, dtype=float)
        scores = np.asarray(scores, dtype=float)
        if genomes.shape != (expected, self.dim) or scores.shape != (expected,):
            raise ValueError(
                f"tell: expected genomes ({expected}, {self.dim}) and scores ({expected},), "
                f"got {genomes.shape} and {scores.shape}; tell every genome of the last ask() once."
            )
        return genomes, scores


class RandomSearch(_Tracked):
    """Uniform samples in the bounds: the baseline every other optimiser must beat."""

    def __init__(self, lower: np.ndarray, upper: np.ndarray, settings: OptimizerSettings) -> None:
        super().__init__(lower, upper)
        self.population_size = settings.population_size
        self.rng = np.random.default_rng(settings.seed)

    def ask(self) -> np.ndarray:
        return self.rng.uniform(self.lower, self.upper, size=(self.population_size, self.dim))  # (B, D)

    def tell(self, genomes: np.ndarray, scores: np.ndarray) -> None:
        genomes, scores = self._check_told(genomes, scores, self.population_size)
        self._track(genomes, scores)


class CMAESOptimizer(_Tracked):
    """CMA-ES through the `cmaes` library (which minimises: only this adapter flips the sign).

    Starts at `x0` (default: the centre of the box) with step size `sigma0`; with `restarts="ipop"` a
    converged search restarts from a random point with twice the population (IPOP-CMA-ES).
    """

    def __init__(
        self,
        lower: np.ndarray,
        upper: np.ndarray,
        settings: OptimizerSettings,
        *,
        x0: np.ndarray | None = None,
    ) -> None:
        super().__init__(lower, upper)
        if settings.sigma0 <= 0:
            raise ConfigError(f"optimizer.sigma0: expected a step size > 0, got {settings.sigma0}.")
        if settings.population_size < 4:  # fewer than 2 parents leaves CMA-ES' rank-mu update undefined
            raise ConfigError(
                f"optimizer.population_size: CMA-ES needs at least 4, got {settings.population_size}."
            )
        self.settings = settings
        self.rng = np.random.default_rng(settings.seed)
        self.population_size = settings.population_size
        self.restarts_done = 0
        mean = (
            (self.lower + self.upper) / 2
            if x0 is None
            else np.clip(np.asarray(x0, float), self.lower, self.upper)
        )
        self._cma = self._new_cma(mean, self.population_size)

    def _new_cma(self, mean: np.ndarray, population_size: int) -> object:
        from cmaes import CMA

        bounds = np.stack([self.lower, self.upper], axis=1)  # (D, 2)
        seed = int(self.rng.integers(2**31 - 1))
        return CMA(
            mean=mean, sigma=self.settings.sigma0, bounds=bounds, seed=seed, population_size=population_size
        )

    def ask(self) -> np.ndarray:
        # cmaes drops its RandomState when pickled; reseeding it from our own generator before every ask
        # keeps all randomness in `self.rng`, so a restored checkpoint asks exactly the same genomes.
        self._cma.reseed_rng(int(self.rng.integers(2**31 - 1)))  # type: ignore[attr-defined]
        return np.stack([self._cma.ask() for _ in range(self.population_size)])  # type: ignore[attr-defined]  # (B, D)

    def tell(self, genomes: np.ndarray, scores: np.ndarray) -> None:
        genomes, scores = self._check_told(genomes, scores, self.population_size)
        self._track(genomes, scores)
        losses = -_finite_or_worst(scores)  # cmaes minimises
        self._cma.tell(list(zip(genomes, losses, strict=True)))  # type: ignore[attr-defined]
        if self.settings.restarts == "ipop" and self._cma.should_stop():  # type: ignore[attr-defined]
            self._restart()

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

    def _restart(self) -> None:
        self.restarts_done += 1
        self.population_size *= 2
        mean = self.rng.uniform(self.lower, self.upper)
        self._cma = self._new_cma(mean, self.population_size)


def _finite_or_worst(scores: np.ndarray) -> np.ndarray:
    """NaN/inf scores become a little worse than the worst finite one, so CMA-ES can still rank them."""
    finite = scores[np.isfinite(scores)]
    worst = float(finite.min()) - 1.0 if finite.size else 0.0
    return np.where(np.isfinite(scores), scores, worst)


# --- registry -----------------------------------------------------------------------------------------
OptimizerFactory = Callable[[np.ndarray, np.ndarray, OptimizerSettings, "np.ndarray | None"], Optimizer]
_OPTIMIZERS: dict[str, OptimizerFactory] = {}


def register_optimizer(name: str, factory: OptimizerFactory) -> None:
    if name in _OPTIMIZERS:
        raise ValueError(f"optimizer {name!r} is registered twice")
    _OPTIMIZERS[name] = factory


def get_optimizer(name: str) -> OptimizerFactory:
    """The factory `(lower, upper, settings, x0) -> Optimizer` registered under `name`."""
    try:
        return _OPTIMIZERS[name]
    except KeyError:
        known = ", ".join(sorted(_OPTIMIZERS))
        raise ConfigError(f"optimizer.name: unknown optimizer {name!r}; known: {known}.") from None


def optimizer_names() -> list[str]:
    return sorted(_OPTIMIZERS)


def make_optimizer(
    settings: OptimizerSettings, lower: np.ndarray, upper: np.ndarray, x0: np.ndarray | None = None
) -> Optimizer:
    return get_optimizer(settings.name)(lower, upper, settings, x0)


def save_state(optimizer: Optimizer) -> bytes:
    """The optimiser's whole state (rng included) as bytes for the run store."""
    return pickle.dumps(optimizer, protocol=pickle.HIGHEST_PROTOCOL)


def load_state(blob: bytes) -> Optimizer:
    """Inverse of save_state. Only ever load blobs this program wrote into its own run store."""
    optimizer = pickle.loads(blob)  # the run store is written by this process, not downloaded
    if not isinstance(optimizer, Optimizer):
        raise TypeError(f"checkpoint holds a {type(optimizer).__name__}, not an optimizer")
    return optimizer


register_optimizer("cma-es", lambda lower, upper, settings, x0: CMAESOptimizer(lower, upper, settings, x0=x0))
register_optimizer("random", lambda lower, upper, settings, x0: RandomSearch(lower, upper, settings))
