"""Spherical interpolation: slerp (base + one model), nuslerp (two models, optional base), multislerp.

The arithmetic follows mergekit 0.1.5 step by step (same chunking of long reductions, same float32 work
dtype, same order of operations), because the result of a norm or a dot over millions of entries depends
on the order it is summed in, and the promise is mergekit's tensors to the last bit.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from evomerge.merge.methods._common import (
    MergeNumericsError,
    as_kernel,
    check_models,
    check_per_model,
    flag_spec,
    require_base,
    require_count,
    weight_spec,
)
from evomerge.merge.registry import MergeMethod, ParamSpec, register

SLERP_CHUNK = 1024 * 1024  # mergekit sums norms and dots over chunks of this many entries
DOT_THRESHOLD = 0.9995  # |cos| above this: nearly collinear, interpolate linearly


def _chunks(flat: torch.Tensor, dtype: torch.dtype) -> list[torch.Tensor]:
    return [flat[:, i : i + SLERP_CHUNK].to(dtype) for i in range(0, flat.shape[1], SLERP_CHUNK)]


def _chunked_norm(chunks: list[torch.Tensor]) -> torch.Tensor:
    """||x|| as the norm of the per-chunk norms, shape (1, 1)."""
    parts = [torch.linalg.vector_norm(chunk, dim=1, keepdim=True) for chunk in chunks]
    return torch.linalg.vector_norm(torch.stack(parts), dim=0)


def slerp_tensors(t: float, v0: torch.Tensor, v1: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Slerp between whole tensors flattened to vectors; linear where |cos theta| > 0.9995.

    theta = acos(<v0/|v0|, v1/|v1|>); out = sin((1-t) theta)/sin theta * v0 + sin(t theta)/sin theta * v1.
    """
    dtype = torch.float64 if v0.dtype == torch.float64 else torch.float32
    a, b = v0.reshape(1, -1), v1.reshape(1, -1)  # (1, N)
    t_tensor = torch.tensor([[t]], dtype=dtype, device=v0.device)  # (1, 1), t rounded like mergekit
    if a.shape[1] == 0:
        return ((1 - t_tensor) * a + t_tensor * b).reshape(v0.shape).to(v0.dtype)
    chunks_a, chunks_b = _chunks(a, dtype), _chunks(b, dtype)
    norm_a, norm_b = _chunked_norm(chunks_a), _chunked_norm(chunks_b)
    norm_a = torch.where(norm_a > eps, norm_a, 1)
    norm_b = torch.where(norm_b > eps, norm_b, 1)
    dots = [
        ((x / norm_a) * (y / norm_b)).sum(dim=1, keepdim=True)
        for x, y in zip(chunks_a, chunks_b, strict=True)
    ]
    dot = torch.stack(dots).sum(dim=0).clamp(-1, 1)
    linear = dot.abs() > DOT_THRESHOLD
    theta = torch.acos(torch.where(linear, 0, dot))
    sin_theta = torch.sin(theta)
    coef_a = torch.where(linear, 1 - t_tensor, torch.sin((1 - t_tensor) * theta) / sin_theta)
    coef_b = torch.where(linear, t_tensor, torch.sin(t_tensor * theta) / sin_theta)
    result = torch.empty_like(a)
    for index, (x, y) in enumerate(zip(chunks_a, chunks_b, strict=True)):
        result[:, index * SLERP_CHUNK : (index + 1) * SLERP_CHUNK] = coef_a * x + coef_b * y
    return result.reshape(v0.shape)


def slerp(
    tensors: Sequence[torch.Tensor],
    *,
    base: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    t: float,
) -> torch.Tensor:
    """t = 0 gives the base, t = 1 the other model."""
    base = require_base("slerp", base)
    require_count("slerp", tensors, 1, 1)
    check_models("slerp", tensors, base)
    return slerp_tensors(t, base, tensors[0])


def _unit(x: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    return x / torch.norm(x, dim=-1, keepdim=True).clamp(min=eps)


def nuslerp_tensors(
    t: float, v0: torch.Tensor, v1: torch.Tensor, *, row_wise: bool, flatten: bool, eps: float = 1e-8
) -> torch.Tensor:
    """Slerp per vector: the whole tensor (`flatten`), rows, or with `row_wise` the vectors along axis 0.

    mergekit's `nuslerp_row_wise` interpolates along dimension 0, i.e. column vectors of a 2-D weight.
    """
    shape = v0.shape
    if flatten:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif row_wise:
        v0, v1 = v0.transpose(0, -1), v1.transpose(0, -1)
    cos_theta = torch.sum(_unit(v0) * _unit(v1), dim=-1, keepdim=True).clamp(-1, 1)
    colinear = (1 - cos_theta.square()) <= eps**2
    theta = torch.acos(torch.where(colinear, 0, cos_theta))
    sin_theta = torch.sin(theta)
    result = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / sin_theta
    result = torch.where(colinear, (1 - t) * v0 + t * v1, result)
    if row_wise and not flatten:
        result = result.transpose(0, -1)
    return result.reshape(shape)


def nuslerp(
    tensors: Sequence[torch.Tensor],
    *,
    base: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    weight: Sequence[float],
    nuslerp_row_wise: bool = False,
    nuslerp_flatten: bool = True,
) -> torch.Tensor:
    """Two models at t = w_1 / (w_0 + w_1) (0.5 when the weights cancel); with a base, their task vectors."""
    require_count("nuslerp", tensors, 2, 2)
    check_models("nuslerp", tensors, base)
    w0, w1 = check_per_model("nuslerp", "weight", weight, 2)
    total = w0 + w1
    t = 0.5 if abs(total) < 1e-6 else w1 / total
    options = {"row_wise": nuslerp_row_wise, "flatten": nuslerp_flatten}
    if base is None:
        return nuslerp_tensors(t, tensors[0], tensors[1], **options)
    return base + nuslerp_tensors(t, tensors[0] - base, tensors[1] - base, **options)


def multislerp(
    tensors: Sequence[torch.Tensor],
    *,
    base: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    weight: Sequence[float],
    normalize_weights: bool = True,
    eps: float = 1e-8,
) -> torch.Tensor:
    """Barycentric interpolation on the sphere: average the unit vectors in the tangent space at their
    weighted mean, map back with the exponential map, scale by the weighted mean norm. With a base,
    the task vectors are interpolated. One model is returned as it is (base ignored), as in mergekit."""
    check_models("multislerp", tensors, base)
    weights = check_per_model("multislerp", "weight", weight, len(tensors))
    if len(tensors) == 1:
        return tensors[0].clone()
    stacked = torch.stack(list(tensors), dim=0)  # (M, ...)
    if base is not None:
        stacked -= base
    flat = stacked.view(stacked.shape[0], -1)  # (M, N)
    w = torch.tensor(weights, dtype=stacked.dtype, device=stacked.device)
    if normalize_weights:
        w = w / w.sum()
    norms = torch.norm(flat, dim=-1, keepdim=True)  # (M, 1)
    units = flat / (norms + eps)
    mean = (units * w.view(-1, 1)).sum(0)  # (N,)
    mean_norm = torch.norm(mean)
    if mean_norm < eps:
        return _multislerp_degenerate(stacked, w, base)
    mean = mean / mean_norm
    tangents = units - (units * mean).sum(-1, keepdim=True) * mean  # (M, N)
    tangent = (tangents * w.view(-1, 1)).sum(0)  # (N,)
    length = torch.norm(tangent) + eps
    result = mean * torch.cos(length) + tangent * (torch.sin(length) / length)
    result = (result * (norms.squeeze(-1) * w).sum()).view(stacked.shape[1:])
    return result + base if base is not None else result


def _multislerp_degenerate(stacked: torch.Tensor, w: torch.Tensor, base: torch.Tensor | None) -> torch.Tensor:
    """The weighted unit vectors cancel: two models fall back to linear, more have no answer."""
    if stacked.shape[0] != 2:
        raise MergeNumericsError(
            "multislerp: the weighted sum of the models' unit vectors is zero (antipodal models with "
            "balancing weights), so there is no direction to interpolate; change the weights."
        )
    result = (stacked[0] * w[0] + stacked[1] * w[1]).view(stacked.shape[1:])
    return result + base if base is not None else result


register(
    MergeMethod(
        name="slerp",
        kernel=as_kernel(slerp),
        params=(
            ParamSpec(
                "t", per_model=False, low=0.0, high=1.0, description="0 gives the base, 1 the other model"
            ),
        ),
        requires_base=True,
        accepts_base=True,
        min_models=1,
        max_models=1,
        description="Spherical interpolation between the base and one model.",
    )
)
register(
    MergeMethod(
        name="nuslerp",
        kernel=as_kernel(nuslerp),
        params=(
            weight_spec("relative weight; t = w_1 / (w_0 + w_1)"),
            flag_spec("nuslerp_row_wise", False, "interpolate vectors along axis 0 instead of rows"),
            flag_spec("nuslerp_flatten", True, "interpolate whole tensors as single vectors"),
        ),
        requires_base=False,
        accepts_base=True,
        min_models=2,
        max_models=2,
        description="Slerp of two models (or their task vectors) with weights instead of t.",
    )
)
register(
    MergeMethod(
        name="multislerp",
        kernel=as_kernel(multislerp),
        params=(
            weight_spec(),
            flag_spec("normalize_weights", True, "divide the weights by their sum"),
            ParamSpec("eps", default=1e-8, per_model=False, low=0.0, description="numerical guard"),
        ),
        requires_base=False,
        accepts_base=True,
        min_models=1,
        description="Spherical barycentre of any number of models (or task vectors).",
    )
)
