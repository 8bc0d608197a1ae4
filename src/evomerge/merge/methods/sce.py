"""SCE (select, calculate, erase), https://arxiv.org/abs/2408.07990.

Select: keep the entries whose task vectors vary most across models (`select_topk` of the entries with
non-zero variance). Calculate: one weight per model, the mean square of its task vector, normalised.
Erase: TIES sign election on the sum of the task vectors. mergekit's version, followed here, elects the
sign on the unweighted sum and divides by the summed weights of the agreeing models.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from evomerge.merge.methods._common import as_kernel, check_models, flag_spec, require_base
from evomerge.merge.registry import MergeMethod, ParamSpec, register


def select_mask(task_vectors: torch.Tensor, fraction: float) -> torch.Tensor:
    """1 at the `int(nonzero * fraction)` entries of largest variance across models, else 0."""
    dtype = task_vectors.dtype
    if fraction <= 0:
        return torch.zeros_like(task_vectors[0])
    if fraction >= 1:
        return torch.ones_like(task_vectors[0])
    variance = torch.var(task_vectors, dim=0, unbiased=False)  # (...)
    k = int(torch.count_nonzero(variance) * fraction)  # mergekit rounds this product in float32
    mask = torch.zeros_like(variance, dtype=dtype)
    if k > 0:
        mask.view(-1)[torch.topk(variance.abs().view(-1), k=k, largest=True).indices] = 1
    return mask


def model_weights(task_vectors: torch.Tensor) -> torch.Tensor:
    """Mean square of each task vector, divided by their sum (uniform when all are ~0), shape (M,)."""
    weights = task_vectors.square().reshape(task_vectors.shape[0], -1).mean(dim=1)
    total = torch.sum(weights).item()
    if abs(total) < 1e-6:
        return torch.ones_like(weights) / weights.shape[0]
    return weights / total


def sce(
    tensors: Sequence[torch.Tensor],
    *,
    base: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    select_topk: float = 1.0,
    int8_mask: bool = False,
) -> torch.Tensor:
    base = require_base("sce", base)
    check_models("sce", tensors, base)
    if not tensors:
        return base.clone()
    task_vectors = torch.stack([tensor - base for tensor in tensors], dim=0)  # (M, ...)
    if select_topk < 1:
        task_vectors = task_vectors * select_mask(task_vectors, select_topk).unsqueeze(0)
    elected = (task_vectors.sum(dim=0) >= 0).to(task_vectors.dtype) * 2 - 1
    erase = task_vectors.sign() == elected  # (M, ...)
    weights = model_weights(task_vectors)
    weights = weights.reshape(-1, *([1] * (task_vectors.dim() - 1)))  # (M, 1, ...)
    erased = weights * erase
    merged = (task_vectors * erased).sum(dim=0)
    return base + merged / torch.sum(erased, dim=0).clamp(min=1e-6)


register(
    MergeMethod(
        name="sce",
        kernel=as_kernel(sce),
        params=(
            ParamSpec(
                "select_topk",
                default=1.0,
                per_model=False,
                low=0.0,
                high=1.0,
                low_open=True,
                description="fraction of high-variance entries kept",
            ),
            flag_spec("int8_mask", False, "mergekit's memory option; accepted and ignored"),
        ),
        requires_base=True,
        accepts_base=True,
        min_models=0,
        description="Select high-variance entries, weight models by energy, erase sign conflicts.",
    )
)
