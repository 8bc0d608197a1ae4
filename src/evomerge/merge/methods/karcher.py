"""Karcher mean: the Riemannian centre of mass of the models on the unit sphere, https://arxiv.org/abs/2603.04972.

Like mergekit, every listed model (a base_model too) counts equally (alpha_i = 1/M); the direction is the
fixed point of a few gradient steps on the sphere and the length is the mean of the models' norms.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from evomerge.merge.methods._common import as_kernel, check_models
from evomerge.merge.registry import MergeMethod, ParamSpec, register


def _units(
    tensors: Sequence[torch.Tensor], dtype: torch.dtype
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Each tensor's norm (in the work dtype) and its direction (zero for a zero tensor)."""
    norms, units = [], []
    for tensor in tensors:
        norm = torch.linalg.vector_norm(tensor.to(dtype))
        norms.append(norm)
        units.append(torch.zeros_like(tensor) if norm.item() == 0.0 else (tensor / norm).to(tensor.dtype))
    return norms, units


def _initial_mean(
    units: list[torch.Tensor], alphas: list[float], dtype: torch.dtype, tol: float
) -> torch.Tensor:
    mean = torch.zeros_like(units[0])
    for alpha, unit in zip(alphas, units, strict=True):
        mean += alpha * unit
    mean_norm = torch.linalg.vector_norm(mean.to(dtype))
    return units[0].clone() if mean_norm.item() < tol else (mean / mean_norm).to(mean.dtype)


def _step(
    mean: torch.Tensor, units: list[torch.Tensor], alphas: list[float], dtype: torch.dtype, tol: float
) -> torch.Tensor | None:
    """One Riemannian gradient step (log map, average, exp map); None once the gradient is below tol."""
    tangent = torch.zeros_like(mean)
    for alpha, unit in zip(alphas, units, strict=True):
        dot = torch.clamp(torch.dot(mean.flatten(), unit.flatten()), -1.0, 1.0)
        theta = torch.arccos(dot)
        if theta.item() < tol:
            continue
        tangent += alpha * (theta / torch.sin(theta)) * (unit - dot * mean)
    length = torch.linalg.vector_norm(tangent.to(dtype))
    if length.item() < tol:
        return None
    mean = (torch.cos(length) * mean + torch.sin(length) * (tangent / length)).to(mean.dtype)
    unit_norm = torch.linalg.vector_norm(mean.to(dtype))
    return (mean / unit_norm).to(mean.dtype) if unit_norm.item() > tol else mean


def karcher_mean(
    tensors: Sequence[torch.Tensor], alphas: list[float], max_iter: int, tol: float
) -> torch.Tensor:
    """Weighted Karcher mean of whole tensors; models with norm <= tol are left out of the direction."""
    dtype = torch.float64 if tensors[0].dtype == torch.float64 else torch.float32
    norms, units = _units(tensors, dtype)
    valid = [index for index, norm in enumerate(norms) if norm.item() > tol]
    if not valid:
        return torch.zeros_like(tensors[0])
    alpha_sum = sum(alphas[index] for index in valid)
    valid_alphas = [alphas[index] / alpha_sum for index in valid]
    valid_units = [units[index] for index in valid]
    mean = _initial_mean(valid_units, valid_alphas, dtype, tol)
    for _ in range(max_iter):
        stepped = _step(mean, valid_units, valid_alphas, dtype, tol)
        if stepped is None:
            break
        mean = stepped
    scale = norms[0] * alphas[0]
    for alpha, norm in zip(alphas[1:], norms[1:], strict=True):
        scale = scale + alpha * norm
    return scale * mean


def karcher(
    tensors: Sequence[torch.Tensor],
    *,
    base: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    max_iter: int = 10,
    tol: float = 1e-5,
) -> torch.Tensor:
    """Equal-weight Karcher mean of all the models."""
    check_models("karcher", tensors, None)
    if len(tensors) == 1:
        return tensors[0].clone()
    return karcher_mean(tensors, [1.0 / len(tensors)] * len(tensors), max_iter, tol)


register(
    MergeMethod(
        name="karcher",
        kernel=as_kernel(karcher),
        params=(
            ParamSpec("max_iter", kind="int", default=10, per_model=False, low=1, description="iterations"),
            ParamSpec("tol", default=1e-5, per_model=False, low=0.0, description="convergence tolerance"),
        ),
        requires_base=False,
        accepts_base=False,
        min_models=1,
        description="Riemannian (Karcher) mean of the models on the sphere, equal weights.",
    )
)
