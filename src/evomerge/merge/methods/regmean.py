"""RegMean (Jin et al. 2023, "Dataless Knowledge Fusion by Merging Weights of Language Models",
https://arxiv.org/abs/2212.09849): the closed-form merge of linear layers from their inputs' Gram matrices.

For a linear layer y = x W^T each model i saw inputs X_i (tokens, in) on the calibration data; RegMean
picks the W that best reproduces every model's outputs on its own inputs, min_W sum_i ||X_i W^T - X_i W_i^T||^2:

    G_i     = X_i^T X_i / N_i                                  # (in, in), gathered once per source
    G~_i    = alpha G_i + (1 - alpha) diag(G_i)                # shrink the off-diagonal part
    W^T     = (sum_i w_i G~_i)^-1 sum_i w_i G~_i W_i^T

`alpha` (the paper's off-diagonal scaling) pulls the solution towards a per-input-feature weighted mean
(alpha = 0) and away from an ill-conditioned inverse; `w_i` (1 in the paper) weighs whole models and is
what evolution can tune. Tensors that are not the weight of a linear layer (embeddings, norms, biases)
have no Gram matrix and get the weighted mean sum_i w_i x_i / sum_i w_i, as in the paper.

The Gram matrices reach the kernel as `statistics` (one per model, None where a tensor has none), read by
the engine from the calibration cache (`evomerge.merge.calibration`); the kernel itself is pure.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from evomerge.errors import ConfigError
from evomerge.merge.calibration import with_statistics
from evomerge.merge.methods._common import check_models, check_per_model
from evomerge.merge.registry import MergeMethod, ParamSpec, register

RIDGE = 1e-6  # times the mean diagonal, added before solving: an input feature no model used stays solvable


def regmean(
    tensors: Sequence[torch.Tensor],
    *,
    base: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    weight: Sequence[float] | None = None,
    alpha: float = 0.9,
    lambda_: float = 1.0,
    statistics: Sequence[torch.Tensor | None] | None = None,
) -> torch.Tensor:
    """The RegMean merge of one tensor; `statistics[i]` is model i's Gram matrix of this layer's inputs.

    With a `base`, the result is moved `lambda_` times its distance from the base (see `extrapolate`).
    """
    check_models("regmean", tensors, base)
    weights = check_per_model(
        "regmean", "weight", weight if weight is not None else [1.0] * len(tensors), len(tensors)
    )
    grams = list(statistics) if statistics is not None else [None] * len(tensors)
    dtype = torch.float64 if tensors[0].dtype == torch.float64 else torch.float32
    if tensors[0].dim() != 2 or any(gram is None for gram in grams):
        merged = weighted_mean(tensors, weights)
    else:
        merged = _closed_form(tensors, [g for g in grams if g is not None], weights, alpha, dtype)
    return extrapolate("regmean", merged, base, lambda_).to(tensors[0].dtype)


def extrapolate(method: str, merged: torch.Tensor, base: torch.Tensor | None, lambda_: float) -> torch.Tensor:
    """base + lambda (merged - base): with T tasks an average keeps about 1/T of each task vector, and
    `lambda` (task arithmetic's scale, evomerge's extension of the paper) gives the rest back. No base:
    `lambda` must stay 1 (the paper's merge)."""
    if base is None:
        if lambda_ != 1.0:
            raise ConfigError(
                f"{method}: lambda = {lambda_} scales the distance from a base; add base_model."
            )
        return merged
    reference = base.to(merged.dtype)
    return reference + lambda_ * (merged - reference)


def weighted_mean(tensors: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """sum_i w_i x_i / sum_i w_i in the work dtype (float64 for float64 inputs, else float32)."""
    dtype = torch.float64 if tensors[0].dtype == torch.float64 else torch.float32
    total = torch.zeros_like(tensors[0], dtype=dtype)
    for tensor, w in zip(tensors, weights, strict=True):
        total.add_(tensor.to(dtype), alpha=w)
    return total.div_(_positive_sum("regmean", weights))


def _positive_sum(method: str, weights: Sequence[float]) -> float:
    total = float(sum(weights))
    if total <= 0:
        raise ConfigError(f"{method}: the weights sum to {total}; give at least one model a positive weight.")
    return total


def _closed_form(
    tensors: Sequence[torch.Tensor],
    grams: Sequence[torch.Tensor],
    weights: Sequence[float],
    alpha: float,
    dtype: torch.dtype,
) -> torch.Tensor:
    _positive_sum("regmean", weights)
    n_in = tensors[0].shape[1]
    lhs = torch.zeros(n_in, n_in, dtype=dtype, device=tensors[0].device)  # sum_i w_i G~_i
    rhs = torch.zeros(
        n_in, tensors[0].shape[0], dtype=dtype, device=tensors[0].device
    )  # sum_i w_i G~_i W_i^T
    for index, (tensor, gram, w) in enumerate(zip(tensors, grams, weights, strict=True)):
        if tuple(gram.shape) != (n_in, n_in):
            raise ConfigError(
                f"regmean: model {index}'s Gram matrix is {list(gram.shape)} for a weight of shape "
                f"{list(tensor.shape)} (expected [{n_in}, {n_in}]); the calibration statistics belong to "
                "another model: delete the calibration cache entry and merge again."
            )
        shrunk = shrink_off_diagonal(gram.to(dtype), alpha)
        lhs.add_(shrunk, alpha=w)
        rhs.add_(shrunk @ tensor.to(dtype).T, alpha=w)
    ridge = RIDGE * float(lhs.diagonal().mean().clamp_min(torch.finfo(dtype).tiny))
    lhs.diagonal().add_(ridge)
    return torch.linalg.solve(lhs, rhs).T  # (out, in)


def lambda_spec() -> ParamSpec:
    return ParamSpec(
        "lambda", default=1.0, per_model=False, low=0.0,
        description="with a base_model: how far past the merge, from the base, to go (1: the merge)",
    )  # fmt: skip


def shrink_off_diagonal(gram: torch.Tensor, alpha: float) -> torch.Tensor:
    """alpha G + (1 - alpha) diag(G): the off-diagonal entries scaled by alpha, the diagonal kept."""
    result = gram * alpha
    result.diagonal().copy_(gram.diagonal())
    return result


REGMEAN = register(
    MergeMethod(
        name="regmean",
        kernel=with_statistics(regmean),
        params=(
            ParamSpec("weight", default=1.0, low=0.0, description="how much this model's inputs count"),
            ParamSpec(
                "alpha",
                default=0.9,
                per_model=False,
                low=0.0,
                high=1.0,
                description="scale of the Gram matrices' off-diagonal entries",
            ),
            lambda_spec(),
        ),
        requires_base=False,
        accepts_base=True,
        min_models=1,
        description="RegMean: closed-form merge of linear layers from their inputs' Gram matrices.",
        statistics="gram",
    )
)
