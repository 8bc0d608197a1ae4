"""One registry of merge methods: name -> kernel and the schema of the parameters it takes.

A kernel is a pure function over tensors (see `Kernel`). Everything else a method needs to be run from a
mergekit config (which parameters exist, their defaults and bounds, whether they are given per model or
once, how many models and whether a base is needed) is declared here, so that config validation, the
merge engine and the evolutionary search space all read one source of truth.

The built-in methods (`evomerge.merge.methods`, each module importing this one to register) are imported
by the package `evomerge.merge` itself, so they are registered before any of its modules is used, and
this module needs no import of them (which would be a cycle).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import torch

from evomerge.errors import ConfigError

ParamKind = Literal["float", "int", "bool"]
StatisticKind = Literal["gram", "fisher"]  # per linear layer input Gram matrices; diagonal Fisher


class Kernel(Protocol):
    """`kernel(tensors, *, base, generator, **params) -> Tensor`.

    - `tensors`: the non-base models' tensors, all of one shape, float32 (the engine upcasts).
    - `base`: the base model's tensor (None for methods that take no base).
    - per-model parameters arrive as sequences aligned with `tensors` (e.g. `weight=[0.5, 0.5]`),
      global ones as scalars (e.g. `normalize=True`, `t=0.3`).
    - `generator`: a seeded `torch.Generator` for methods that draw random masks, else None.
    The result has the shape of the inputs; inputs are never mutated.
    """

    def __call__(
        self,
        tensors: Sequence[torch.Tensor],
        *,
        base: torch.Tensor | None,
        generator: torch.Generator | None,
        **params: Any,
    ) -> torch.Tensor: ...


@dataclass(frozen=True)
class ParamSpec:
    """One parameter of a method, as written in mergekit YAML."""

    name: str
    kind: ParamKind = "float"
    default: float | int | bool | None = None  # None: required
    per_model: bool = True
    low: float | None = None
    high: float | None = None
    low_open: bool = False  # True: `low` itself is not allowed, e.g. density in (0, 1]
    high_open: bool = False
    description: str = ""
    # The range evolution searches when the config gives no bounds (a method-specific scale, e.g.
    # nearswap's distance `t`); None: the search space's default range for the name, else [low, high].
    search_range: tuple[float, float] | None = None

    @property
    def required(self) -> bool:
        return self.default is None

    def validate(self, value: Any, where: str) -> float | int | bool:
        """Check one value; `where` names the field in the message (e.g. "models[1].parameters.density")."""
        if self.kind == "bool":
            if isinstance(value, bool):
                return value
            raise ConfigError(f"{where}: expected true or false for '{self.name}', got {value!r}.")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
            raise ConfigError(f"{where}: expected a number for '{self.name}', got {value!r}.")
        self._check_bounds(float(value), where)
        return int(value) if self.kind == "int" else float(value)

    def _check_bounds(self, value: float, where: str) -> None:
        too_low = self.low is not None and (value < self.low or (self.low_open and value == self.low))
        too_high = self.high is not None and (value > self.high or (self.high_open and value == self.high))
        if too_low or too_high:
            raise ConfigError(
                f"{where}: '{self.name}' = {value} is outside {self.interval()}; "
                f"choose a value in that range."
            )

    def interval(self) -> str:
        left = "(" if self.low_open else "["
        right = ")" if self.high_open else "]"
        low = "-inf" if self.low is None else f"{self.low:g}"
        high = "inf" if self.high is None else f"{self.high:g}"
        return f"{left}{low}, {high}{right}"


@dataclass(frozen=True)
class MergeMethod:
    """A merge method: its kernel and what it accepts."""

    name: str
    kernel: Kernel | None  # None only for passthrough, which the engine handles by copying
    params: tuple[ParamSpec, ...] = ()
    requires_base: bool = False
    accepts_base: bool = True
    min_models: int = 1  # counted without the base model
    max_models: int | None = None
    randomized: bool = False
    description: str = ""
    aliases: tuple[str, ...] = field(default=())
    # Keyword options the kernel takes beyond mergekit's parameters (e.g. "tie_break"); never in configs.
    options: tuple[str, ...] = field(default=())
    # Data-aware methods: which calibration statistic the kernel takes as `statistics` (one per model).
    statistics: StatisticKind | None = None
    # Data-aware and sequential (RegMean++): the statistics of each layer are gathered on the merged model
    # of the layers before it, in a pass before the merge (merge/sequential.py); `models:` merges only.
    sequential: bool = False
    # Sequential and distilled (ProDistill): the pass trains each stage's merging coefficients instead of
    # gathering Gram matrices, and hands them to the kernel as its `statistics`.
    distill: bool = False
    # The kernel returns float32 (or wider) for half-precision inputs, as mergekit's does (a float32 mask
    # or coefficient promotes them); without `out_dtype` the output tensors keep that dtype, as mergekit's.
    widens_to_float32: bool = False

    def result_dtype(self, compute: torch.dtype) -> torch.dtype:
        """The dtype of the kernel's result for inputs of dtype `compute`."""
        return torch.promote_types(compute, torch.float32) if self.widens_to_float32 else compute

    def param(self, name: str) -> ParamSpec:
        for spec in self.params:
            if spec.name == name:
                return spec
        known = ", ".join(spec.name for spec in self.params) or "none"
        raise ConfigError(f"merge_method '{self.name}' takes no parameter '{name}' (it takes: {known}).")

    @property
    def per_model_params(self) -> tuple[ParamSpec, ...]:
        return tuple(spec for spec in self.params if spec.per_model)

    @property
    def global_params(self) -> tuple[ParamSpec, ...]:
        return tuple(spec for spec in self.params if not spec.per_model)


_METHODS: dict[str, MergeMethod] = {}


def register(method: MergeMethod) -> MergeMethod:
    for name in (method.name, *method.aliases):
        if name in _METHODS:
            raise ValueError(f"merge method {name!r} is registered twice")
        _METHODS[name] = method
    return method


def get_method(name: str) -> MergeMethod:
    try:
        return _METHODS[name]
    except KeyError:
        known = ", ".join(sorted(_METHODS))
        raise ConfigError(f"merge_method: unknown method {name!r}; known methods: {known}.") from None


def all_methods() -> list[MergeMethod]:
    """Every registered method once (aliases folded), in name order."""
    return sorted({id(m): m for m in _METHODS.values()}.values(), key=lambda m: m.name)


KernelFn = Callable[..., torch.Tensor]
