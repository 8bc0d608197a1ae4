"""Helpers shared by the method modules: parameter specs with mergekit's names, input checks."""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

import torch

from evomerge.errors import ConfigError, EvomergeError
from evomerge.merge.registry import Kernel, KernelFn, ParamSpec


class MergeNumericsError(EvomergeError, ValueError):
    """The tensors themselves make a method undefined (e.g. multislerp of vectors that cancel out)."""


def as_kernel(function: KernelFn) -> Kernel:
    """Register-ready kernel: run without autograd (merging is not differentiated, and the in-place work
    on owned temporaries would refuse tensors that require grad). Kernels declare their parameters as
    keywords; the registry's Protocol takes them as **params, hence the cast."""
    return cast(Kernel, torch.no_grad()(function))


def weight_spec(description: str = "how much of this model to take") -> ParamSpec:
    return ParamSpec("weight", description=description)


def density_spec() -> ParamSpec:
    return ParamSpec(
        "density", default=1.0, low=0.0, high=1.0, low_open=True, description="fraction of the delta kept"
    )


def flag_spec(name: str, default: bool, description: str) -> ParamSpec:
    return ParamSpec(name, kind="bool", default=default, per_model=False, description=description)


def check_models(method: str, tensors: Sequence[torch.Tensor], base: torch.Tensor | None) -> None:
    """All inputs must share one shape; name both shapes when they do not."""
    reference = base if base is not None else (tensors[0] if tensors else None)
    if reference is None:
        raise ConfigError(f"{method}: no tensors to merge; give at least one model.")
    for index, tensor in enumerate(tensors):
        if tensor.shape != reference.shape:
            raise ConfigError(
                f"{method}: model {index} has shape {tuple(tensor.shape)} but "
                f"{'the base' if base is not None else 'model 0'} has {tuple(reference.shape)}; "
                "merge only tensors of the same shape."
            )


def check_per_model(method: str, name: str, values: Sequence[float], count: int) -> list[float]:
    """Per-model parameters must give one value per non-base model."""
    if isinstance(values, (int, float)):
        raise ConfigError(f"{method}: '{name}' must be a list with one value per model, got {values!r}.")
    if len(values) != count:
        raise ConfigError(
            f"{method}: '{name}' has {len(values)} values for {count} models; give one value per model."
        )
    return [float(value) for value in values]


def require_base(method: str, base: torch.Tensor | None) -> torch.Tensor:
    if base is None:
        raise ConfigError(f"{method}: needs a base_model; add `base_model:` to the config.")
    return base


def require_count(method: str, tensors: Sequence[torch.Tensor], low: int, high: int | None) -> None:
    count = len(tensors)
    if count < low or (high is not None and count > high):
        wanted = f"exactly {low}" if low == high else f"at least {low}" if high is None else f"{low}-{high}"
        raise ConfigError(f"{method}: needs {wanted} non-base models, got {count}.")
