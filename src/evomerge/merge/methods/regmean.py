"""RegMean (Jin et al. 2023, "Dataless Knowledge Fusion by Merging Weights of Language Models",
https://arxiv.org/abs/2212.09849): the closed-form merge of linear layers from their inputs' Gram matrices.

For a linear layer y = x W^T each model i saw inputs X_i (tokens, in) on the calibration data; RegMean
picks the W that best reproduces every model's outputs on its own inputs, min_W sum_i ||X_i W^T - X_i W_i^T||^2:

    G_i     = X_i^T X_i / N_i                                  # (in, in), gathered once per source
    G~_i    = alpha G_i + (1 - alpha) diag(G_i)                # shrink the off-diagonal part
    W^T     = (sum_i w_i G~_i)^-1 sum_i w_i G~_i W_i^T

`alpha` (the paper's off-diagonal scaling) pulls the solution towards a per-input-feature weighted mean
(alpha = 0) and away from an ill-conditioned inverse; `w_i` (1 in the paper) weighs whole models and is
what evolution can tune. Tensors that are not the weight of a linear layer (norms, biases) have no Gram
matrix and get the weighted mean sum_i w_i x_i / sum_i w_i, as in the paper.

A token embedding E (vocab, hidden) is the linear map x E of a one-hot input x, so the same regression has
a closed form there too (evomerge's extension; the paper averages embeddings): the Gram matrix of one-hot
inputs is diagonal, G_i = diag(c_i) with c_i[t] the share of model i's calibration tokens that are token t,
off-diagonal scaling does nothing, and the solution is a per-row weighted mean,

    E[t] = sum_i w_i c_i[t] E_i[t] / sum_i w_i c_i[t]        (rows no model saw: sum_i w_i E_i[t] / sum_i w_i)

so a token only one model's data uses (the translate specialist's Greek letters) keeps that model's row.
`token_counts: false` gives the paper's plain mean instead.

`regmean_plusplus` (alias `regmean++`; Nguyen et al. 2025, https://arxiv.org/abs/2508.03121) is the same
kernel with each layer's Gram matrices gathered on the merged model's activations of the layers before it,
layer by layer (see `evomerge.merge.sequential`).

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
    token_counts: bool = True,
    own_targets: bool = False,
    statistics: Sequence[torch.Tensor | None] | None = None,
) -> torch.Tensor:
    """The RegMean merge of one tensor; `statistics[i]` is model i's Gram matrix of this layer's inputs
    (for an embedding: its diagonal, the share of each token id in model i's calibration tokens).
    `own_targets` is read by RegMean++'s sequential pass (which then hands over (G, C) pairs), not here.

    With a `base`, the result is moved `lambda_` times its distance from the base (see `extrapolate`).
    """
    check_models("regmean", tensors, base)
    weights = check_per_model(
        "regmean", "weight", weight if weight is not None else [1.0] * len(tensors), len(tensors)
    )
    grams = list(statistics) if statistics is not None else [None] * len(tensors)
    dtype = torch.float64 if tensors[0].dtype == torch.float64 else torch.float32
    present = [g for g in grams if g is not None]
    if tensors[0].dim() != 2 or len(present) < len(grams):
        merged = weighted_mean(tensors, weights)
    elif all(g.dim() == 1 for g in present):  # one-hot inputs: an embedding's token shares
        merged = (
            row_weighted_mean(tensors, present, weights) if token_counts else weighted_mean(tensors, weights)
        )
    else:
        merged = _closed_form(tensors, present, weights, alpha, dtype)
    return extrapolate("regmean", merged, base, lambda_).to(tensors[0].dtype)


def row_weighted_mean(
    tensors: Sequence[torch.Tensor], counts: Sequence[torch.Tensor], weights: Sequence[float]
) -> torch.Tensor:
    """RegMean's closed form for an embedding (rows indexed by token): row t is sum_i w_i c_i[t] E_i[t] /
    sum_i w_i c_i[t]; a row no model's calibration tokens used gets the weighted mean of the rows."""
    dtype = torch.float64 if tensors[0].dtype == torch.float64 else torch.float32
    rows = tensors[0].shape[0]
    for index, count in enumerate(counts):
        if tuple(count.shape) != (rows,):
            raise ConfigError(
                f"regmean: model {index}'s token counts have shape {list(count.shape)} for an embedding of "
                f"shape {list(tensors[0].shape)} (expected [{rows}]); the calibration statistics belong to "
                "another model: delete the calibration cache entry and merge again."
            )
    fallback = weighted_mean(tensors, weights)
    numerator = torch.zeros_like(fallback)
    denominator = torch.zeros(rows, dtype=dtype, device=fallback.device)
    for tensor, count, w in zip(tensors, counts, weights, strict=True):
        share = count.to(dtype) * w
        numerator.add_(tensor.to(dtype) * share[:, None])
        denominator.add_(share)
    seen = denominator > 0
    return torch.where(
        seen[:, None], numerator / denominator.clamp_min(torch.finfo(dtype).tiny)[:, None], fallback
    )


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
    """RegMean's solve; a statistic of shape (2, in, in) is RegMean++'s `own_targets` pair (G, C) of model
    i: min_W sum_i w_i ||X~_i W^T - X_i W_i^T||^2 with G = X~^T X~ / N, C = X~^T X / N, whose solution is
    W^T = (sum_i w_i G~_i)^-1 sum_i w_i C~_i W_i^T (C~: C with its off-diagonal scaled by alpha too)."""
    _positive_sum("regmean", weights)
    n_in = tensors[0].shape[1]
    lhs = torch.zeros(n_in, n_in, dtype=dtype, device=tensors[0].device)  # sum_i w_i G~_i
    rhs = torch.zeros(
        n_in, tensors[0].shape[0], dtype=dtype, device=tensors[0].device
    )  # sum_i w_i G~_i W_i^T
    for index, (tensor, gram, w) in enumerate(zip(tensors, grams, weights, strict=True)):
        if tuple(gram.shape[-2:]) != (n_in, n_in) or gram.dim() not in (2, 3):
            raise ConfigError(
                f"regmean: model {index}'s Gram matrix is {list(gram.shape)} for a weight of shape "
                f"{list(tensor.shape)} (expected [{n_in}, {n_in}]); the calibration statistics belong to "
                "another model: delete the calibration cache entry and merge again."
            )
        pair = gram.to(dtype)
        own, cross = (pair, pair) if pair.dim() == 2 else (pair[0], pair[1])
        lhs.add_(shrink_off_diagonal(own, alpha), alpha=w)
        rhs.add_(shrink_off_diagonal(cross, alpha) @ tensor.to(dtype).T, alpha=w)
    ridge = RIDGE * float(lhs.diagonal().mean().clamp_min(torch.finfo(dtype).tiny))
    lhs.diagonal().add_(ridge)
    return torch.linalg.solve(lhs, rhs).T  # (out, in)


def lambda_spec() -> ParamSpec:
    return ParamSpec(
        "lambda", default=1.0, per_model=False, low=0.0,
        description="with a base_model: how far past the merge, from the base, to go (1: the merge)",
    )  # fmt: skip


def token_counts_spec() -> ParamSpec:
    return ParamSpec(
        "token_counts", kind="bool", default=True, per_model=False,
        description="embeddings: rows weighted by each model's token counts (false: the plain mean)",
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
            token_counts_spec(),
        ),
        requires_base=False,
        accepts_base=True,
        min_models=1,
        description="RegMean: closed-form merge of linear layers from their inputs' Gram matrices.",
        statistics="gram",
    )
)


REGMEAN_PLUSPLUS = register(
    MergeMethod(
        name="regmean_plusplus",
        kernel=REGMEAN.kernel,
        params=(
            *REGMEAN.params,
            ParamSpec(
                "own_targets",
                kind="bool",
                default=False,
                per_model=False,
                description="fit each layer to the sources' own outputs on their own inputs (false: the paper's)",
            ),
        ),
        requires_base=False,
        accepts_base=True,
        min_models=1,
        aliases=("regmean++",),
        description=(
            "RegMean++: RegMean merged layer by layer, each layer's Gram matrices taken on the merged "
            "model's activations of the layers before it."
        ),
        statistics="gram",
        sequential=True,
    )
)
