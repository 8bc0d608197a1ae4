"""Data-free merges in the task matrices' singular bases: TSV-Merge and Iso-C.

Both treat every 2-D tensor (a weight matrix) as a linear map and look at the spectrum of its task
matrix `delta_i = x_i - base`; tensors of any other rank (norms, biases) get the weighted mean of their
task vectors, as both papers do.

    tsv    (Gargiulo et al. 2025, https://arxiv.org/abs/2412.00081), per matrix:
           delta_i ~ U_i S_i V_i^T, keeping each task's top k = min(m, n) // T singular triplets
           U = [U_1 .. U_T] (m, Tk), S = [w_1 S_1 .. w_T S_T], V = [V_1 .. V_T] (n, Tk)
           U_perp, V_perp = the nearest orthonormal matrices (polar factors: P Q^T of svd(U) = P Sigma Q^T)
           out = base + lambda * U_perp diag(S) V_perp^T
    iso_c  (Marczak et al. 2025, https://arxiv.org/abs/2502.04959), per matrix:
           M = sum_i w_i delta_i = U S V^T
           out = base + lambda * mean(S) * U V^T       (every direction the sum spans, the same strength)

Decorrelating the task singular vectors (TSV) removes the interference of tasks whose top directions
overlap; flattening the spectrum (Iso-C) stops a few dominant directions, usually one task's, from
drowning the others. SVDs run in float64 for float64 inputs and float32 otherwise (half precision has no
SVD on CPU); the result comes back in the inputs' dtype.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from evomerge.merge.methods._common import as_kernel, check_models, check_per_model, require_base
from evomerge.merge.registry import MergeMethod, ParamSpec, register


def _work_dtype(tensor: torch.Tensor) -> torch.dtype:
    return torch.float64 if tensor.dtype == torch.float64 else torch.float32


def _deltas(
    method: str, tensors: Sequence[torch.Tensor], base: torch.Tensor | None, weight: Sequence[float]
) -> tuple[torch.Tensor, list[torch.Tensor], list[float]]:
    """(base, task vectors in the work dtype, weights), inputs checked."""
    base = require_base(method, base)
    check_models(method, tensors, base)
    weights = check_per_model(method, "weight", weight, len(tensors))
    dtype = _work_dtype(base)
    reference = base.to(dtype)
    return reference, [tensor.to(dtype) - reference for tensor in tensors], weights


def _weighted_mean(deltas: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """The task-vector mean for tensors without a spectrum: sum_i w_i delta_i / T (uniform weights: the mean)."""
    total = torch.zeros_like(deltas[0])
    for delta, w in zip(deltas, weights, strict=True):
        total.add_(delta, alpha=w)
    return total.div_(len(deltas))


def polar(matrix: torch.Tensor) -> torch.Tensor:
    """The orthonormal matrix nearest to `matrix` in Frobenius norm: P Q^T of its SVD P Sigma Q^T."""
    left, _, right = torch.linalg.svd(matrix, full_matrices=False)
    return left @ right


def tsv(
    tensors: Sequence[torch.Tensor],
    *,
    base: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    weight: Sequence[float],
    lambda_: float = 1.0,
) -> torch.Tensor:
    """TSV-Merge: each task's top 1/T singular triplets, the bases orthogonalised, then summed (see module)."""
    return _merge("tsv", _tsv_matrix, tensors, base, weight, lambda_)


def _merge(
    name: str,
    on_matrix: Callable[[Sequence[torch.Tensor], Sequence[float]], torch.Tensor],
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor | None,
    weight: Sequence[float],
    lambda_: float,
) -> torch.Tensor:
    """The base plus `lambda_` times the merged task vectors: `on_matrix` merges 2-D task matrices, the
    weighted mean every other tensor (norms, biases, empty matrices)."""
    reference, deltas, weights = _deltas(name, tensors, base, weight)
    if reference.dim() != 2 or min(reference.shape) == 0:
        merged = _weighted_mean(deltas, weights)
    else:
        merged = on_matrix(deltas, weights)
    return (reference + lambda_ * merged).to(tensors[0].dtype)


def _tsv_matrix(deltas: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    rank = max(1, min(deltas[0].shape) // len(deltas))  # each task's share of the rank
    lefts, values, rights = [], [], []
    for delta, w in zip(deltas, weights, strict=True):
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)  # (m, r), (r,), (r, n)
        lefts.append(u[:, :rank])
        values.append(w * s[:rank])
        rights.append(vh[:rank])
    u_all = torch.cat(lefts, dim=1)  # (m, T k)
    vh_all = torch.cat(rights, dim=0)  # (T k, n)
    # With T k > min(m, n) (when T does not divide the rank evenly, k >= 1 forces it) the polar factor
    # of the wide block still has orthonormal rows/columns on the side that fits.
    return polar(u_all) @ torch.diag(torch.cat(values)) @ polar(vh_all)


def iso_c(
    tensors: Sequence[torch.Tensor],
    *,
    base: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    weight: Sequence[float],
    lambda_: float = 1.0,
) -> torch.Tensor:
    """Iso-C: the summed task matrix with its singular values all set to their mean (see module)."""
    return _merge("iso_c", _iso_c_matrix, tensors, base, weight, lambda_)


def _iso_c_matrix(deltas: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    total = torch.zeros_like(deltas[0])
    for delta, w in zip(deltas, weights, strict=True):
        total.add_(delta, alpha=w)
    u, s, vh = torch.linalg.svd(total, full_matrices=False)
    return (u * s.mean()) @ vh


def _specs(scale_default: float) -> tuple[ParamSpec, ...]:
    return (
        ParamSpec("weight", default=1.0, low=0.0, description="how much of this model's task matrix"),
        ParamSpec(
            "lambda", default=scale_default, per_model=False, low=0.0,
            description="scale of the merged task matrix added to the base",
        ),
    )  # fmt: skip


TSV = register(
    MergeMethod(
        name="tsv",
        kernel=as_kernel(tsv),
        params=_specs(1.0),
        requires_base=True,
        min_models=1,
        description="TSV-Merge: low-rank task singular vectors, decorrelated before summing.",
    )
)
ISO_C = register(
    MergeMethod(
        name="iso_c",
        kernel=as_kernel(iso_c),
        params=_specs(1.0),
        requires_base=True,
        min_models=1,
        description="Iso-C: the summed task matrix with a flat (isotropic) spectrum.",
    )
)
