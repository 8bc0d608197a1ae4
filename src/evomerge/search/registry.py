"""Optimiser names -> (settings block, factory). The run config and the loop choose optimisers here.

Built-in optimisers are listed below; `register_optimizer` adds one from outside the package (register
it before a config that names it is read).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydantic import ValidationError

from evomerge.configfile import settings_block_message
from evomerge.errors import ConfigError
from evomerge.search.base import Optimizer, OptimizerSettings, SearchSpace, Seeds
from evomerge.search.ga import GAOptimizer, GASettings
from evomerge.search.map_elites import MapElites, MapElitesSettings
from evomerge.search.natural_niches import NaturalNiches, NaturalNichesSettings
from evomerge.search.nsga2 import NSGA2Optimizer, NSGA2Settings
from evomerge.search.optimizers import CMAESOptimizer, CMAESSettings, RandomSearch, RandomSettings

# (settings, lower, upper, seed, seeds, space) -> Optimizer. `seeds` are the warm start's in-space genomes
# with their results, in evaluation order; `seed` is the resolved random seed; `space` the search space
# (None outside a run), for the few optimisers whose variation needs more than the box (TensorSpace).
OptimizerFactory = Callable[[Any, np.ndarray, np.ndarray, int, Seeds, "SearchSpace | None"], Optimizer]


@dataclass(frozen=True)
class OptimizerEntry:
    settings: type[OptimizerSettings]
    factory: OptimizerFactory


def _builtin(
    settings: type[OptimizerSettings], optimizer: Callable[..., Optimizer], *, with_space: bool = False
) -> OptimizerEntry:
    """Every built-in optimiser takes (lower, upper, settings, *, seed, seeds), some also `space`."""

    def factory(s: Any, lo: np.ndarray, hi: np.ndarray, seed: int, seeds: Seeds, space: Any) -> Optimizer:
        extra = {"space": space} if with_space else {}
        return optimizer(lo, hi, s, seed=seed, seeds=seeds, **extra)

    return OptimizerEntry(settings, factory)


_OPTIMIZERS: dict[str, OptimizerEntry] = {
    "cma-es": _builtin(CMAESSettings, CMAESOptimizer),
    "random": _builtin(RandomSettings, RandomSearch),
    "ga": _builtin(GASettings, GAOptimizer),
    "nsga2": _builtin(NSGA2Settings, NSGA2Optimizer),
    "map-elites": _builtin(MapElitesSettings, MapElites, with_space=True),
    "natural-niches": _builtin(NaturalNichesSettings, NaturalNiches),
}


def register_optimizer(name: str, settings: type[OptimizerSettings], factory: OptimizerFactory) -> None:
    """Make `name` choosable as `optimizer.name` in a run config, with `settings` as its block."""
    if name in _OPTIMIZERS:
        raise ValueError(f"optimizer {name!r} is registered twice")
    _OPTIMIZERS[name] = OptimizerEntry(settings, factory)


def optimizer_names() -> list[str]:
    return sorted(_OPTIMIZERS)


def steady_state_optimizers() -> list[str]:
    """Optimisers that take results one at a time (`schedule: steady-state`)."""
    return sorted(name for name, entry in _OPTIMIZERS.items() if entry.settings.steady_state)


def optimizer_entry(name: str) -> OptimizerEntry:
    try:
        return _OPTIMIZERS[name]
    except KeyError:
        known = ", ".join(sorted(_OPTIMIZERS))
        raise ConfigError(f"optimizer.name: unknown optimizer {name!r}; known: {known}.") from None


def parse_settings(data: Any) -> OptimizerSettings:
    """The settings block of the optimiser `data["name"]` names, validated; one located ConfigError."""
    if isinstance(data, OptimizerSettings):
        return data
    if not isinstance(data, dict):
        raise ConfigError(f"optimizer: expected a mapping with a 'name' ({', '.join(optimizer_names())}).")
    name = str(data.get("name", "cma-es"))
    entry = optimizer_entry(name)
    try:
        return entry.settings.model_validate({**data, "name": name})
    except ValidationError as error:
        raise ConfigError(_settings_message(error, name)) from None


def _settings_message(error: ValidationError, name: str) -> str:
    settings = {n: entry.settings for n, entry in _OPTIMIZERS.items()}
    return settings_block_message(
        error, block="optimizer", name=name, settings=settings, docs="docs/evolve.md"
    )


def make_optimizer(
    settings: OptimizerSettings,
    lower: np.ndarray,
    upper: np.ndarray,
    *,
    seed: int = 0,
    seeds: Seeds = (),
    space: SearchSpace | None = None,
) -> Optimizer:
    """The optimiser `settings.name` names over the box [lower, upper], warm-started with `seeds`."""
    return optimizer_entry(settings.name).factory(settings, lower, upper, seed, seeds, space)
