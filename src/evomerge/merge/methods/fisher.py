"""Fisher-weighted averaging (Matena & Raffel 2022, "Merging Models with Fisher-Weighted Averaging",
https://arxiv.org/abs/2111.09832): each parameter averaged with the weight its model's Fisher gives it.

    F_i     = E_x E_{y ~ p_i(y|x)} [ (d log p_i(y|x) / d theta)^2 ]   # diagonal Fisher, per source
    F^_i    = F_i / mean(F_i)                                          # over all of model i's parameters
    theta   = sum_i w_i (F^_i + eps) theta_i / sum_i w_i (F^_i + eps)

A parameter one model relies on (large Fisher) keeps that model's value; where no model cares, the
result is the plain weighted mean (`eps` dominates). The per-model normalisation (FusionBench's
`normalize_fisher_weight`) makes the Fisher of models trained at different scales comparable, so
`w_i` alone sets how much each model counts; `eps` is relative to the mean Fisher.

The Fisher of each tensor reaches the kernel as `statistics` (one per model, None for tensors without
a gradient, which are averaged), already normalised by `evomerge.merge.calibration`; the kernel is pure.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from evomerge.errors import ConfigError
from evomerge.merge.calibration import with_statistics
from evomerge.merge.methods._common import check_models, check_per_model
from evomerge.merge.methods.regmean import extrapolate, lambda_spec, weighted_mean
from evomerge.merge.registry import MergeMethod, ParamSpec, register


def fisher(
    tensors: Sequence[torch.Tensor],
    *,
    base: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    weight: Sequence[float] | None = None,
    epsilon: float = 1e-6,
    lambda_: float = 1.0,
    statistics: Sequence[torch.Tensor | None] | None = None,
) -> torch.Tensor:
    """The Fisher-weighted average of one tensor; `statistics[i]` is model i's (normalised) diagonal Fisher."""
    check_models("fisher", tensors, base)
    weights = check_per_model(
        "fisher", "weight", weight if weight is not None else [1.0] * len(tensors), len(tensors)
    )
    fishers = list(statistics) if statistics is not None else [None] * len(tensors)
    if any(f is None for f in fishers):
        return extrapolate("fisher", weighted_mean(tensors, weights), base, lambda_).to(tensors[0].dtype)
    dtype = torch.float64 if tensors[0].dtype == torch.float64 else torch.float32
    numerator = torch.zeros_like(tensors[0], dtype=dtype)
    denominator = torch.zeros_like(tensors[0], dtype=dtype)
    for index, (tensor, f, w) in enumerate(zip(tensors, fishers, weights, strict=True)):
        if f is None or f.shape != tensor.shape:
            raise ConfigError(
                f"fisher: model {index}'s Fisher has shape {list(f.shape) if f is not None else None} for a "
                f"tensor of shape {list(tensor.shape)}; the calibration statistics belong to another model: "
                "delete the calibration cache entry and merge again."
            )
        importance = f.to(dtype) + epsilon
        denominator.add_(importance, alpha=w)
        numerator.addcmul_(importance, tensor.to(dtype), value=w)
    if not bool((denominator > 0).all()):
        raise ConfigError(
            "fisher: the weights sum to zero or less; give at least one model a positive weight."
        )
    return extrapolate("fisher", numerator / denominator, base, lambda_).to(tensors[0].dtype)


FISHER = register(
    MergeMethod(
        name="fisher",
        kernel=with_statistics(fisher),
        params=(
            ParamSpec("weight", default=1.0, low=0.0, description="how much this model counts"),
            ParamSpec(
                "epsilon",
                default=1e-6,
                per_model=False,
                low=0.0,
                low_open=True,
                description="Fisher floor (relative to each model's mean Fisher): the plain mean where no model cares",
            ),
            lambda_spec(),
        ),
        requires_base=False,
        accepts_base=True,
        min_models=1,
        description="Fisher merging: parameters averaged with their diagonal Fisher information as weights.",
        statistics="fisher",
    )
)
