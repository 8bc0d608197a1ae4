"""CycleQD's SVD-based mutation of a task vector (Kuroki et al. 2024, arXiv:2410.14735): a pure kernel.

CycleQD mutates a child model by growing its task vector along the principal directions of a task's
expert: with tau = U diag(s) V^T the SVD of that expert's task vector (per weight matrix), the child gets

    child + U diag(g * s) V^T,    g_i ~ U(0, scale) independently,

so the child moves further along each of the expert's components s_i u_i v_i^T, by a random fraction
g_i of it (for the expert itself: its singular values stretched by 1 + g_i). CycleQD's released code draws these uniform gains (its `SVDUniformMutator`, mutation rate 0.1 in its configs) for
every component and skips normalisation weights; the paper presents the mutation as a way to explore
beyond the convex region the parents span, along the expert's own directions, without overfitting.
Here only the top `rank` components are used (rank >= min(shape) is CycleQD's full version), so the
change has rank <= `rank`.
"""

from __future__ import annotations

import math

import torch

from evomerge.errors import ConfigError, TensorMismatchError


@torch.no_grad()
def svd_mutation(
    task_vector: torch.Tensor,
    *,
    rank: int,
    scale: float,
    generator: torch.Generator,
    basis: torch.Tensor | None = None,
) -> torch.Tensor:
    """`task_vector` + U_r diag(g * s_r) V_r^T, g_i ~ U(0, scale), from the top-`rank` SVD of `basis`.

    `basis` is the task vector whose singular directions are stretched (CycleQD: the quality task's
    expert); by default `task_vector` itself, whose top components then grow by factors in [1, 1 + scale).
    Tensors of two or more dims are treated as matrices (shape[0], rest); 0-D and 1-D tensors (biases,
    norms) are returned unchanged, as CycleQD leaves normalisation weights alone. Works in float32
    (float64 for float64 inputs) and returns the input's dtype; never modifies its inputs.
    """
    _check(task_vector, rank, scale, basis)
    if task_vector.dim() < 2 or task_vector.numel() == 0 or scale == 0:
        return task_vector.clone()
    work = torch.float64 if task_vector.dtype == torch.float64 else torch.float32
    matrix = (task_vector if basis is None else basis).reshape(task_vector.shape[0], -1).to(work)  # (m, n)
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)  # (m, k), (k,), (k, n)
    r = min(rank, s.shape[0])
    gains = torch.rand(r, generator=generator, device=generator.device, dtype=work).to(s.device) * scale
    change = (u[:, :r] * (gains * s[:r])) @ vh[:r]  # (m, r) * (r,) @ (r, n) -> (m, n)
    mutated = task_vector.reshape(change.shape).to(work) + change
    return mutated.reshape(task_vector.shape).to(task_vector.dtype)


def _check(task_vector: torch.Tensor, rank: int, scale: float, basis: torch.Tensor | None) -> None:
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ConfigError(f"svd_mutation: rank must be an integer >= 1, got {rank!r}.")
    if not (math.isfinite(scale) and scale >= 0):
        raise ConfigError(f"svd_mutation: scale must be finite and >= 0, got {scale!r} (CycleQD uses 0.1).")
    if basis is not None and basis.shape != task_vector.shape:
        raise TensorMismatchError(
            f"svd_mutation: basis has shape {tuple(basis.shape)} but the task vector has "
            f"{tuple(task_vector.shape)}; give the same weight's task vector of the expert."
        )
