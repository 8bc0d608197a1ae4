"""Linear (model soup): a weighted average of whole models, https://arxiv.org/abs/2203.05482."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from evomerge.merge.methods._common import as_kernel, check_models, check_per_model, flag_spec, weight_spec
from evomerge.merge.registry import MergeMethod, register


def linear(
    tensors: Sequence[torch.Tensor],
    *,
    base: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    weight: Sequence[float],
    normalize: bool = True,
) -> torch.Tensor:
    """sum_i w_i x_i, divided by sum_i w_i when `normalize`.

    Accumulates in float32 (float64 for float64 inputs) in model order, with the weights rounded to that
    dtype first, exactly as mergekit does, and returns the inputs' dtype. A zero weight sum with
    `normalize` gives inf/NaN in mergekit too. The base, if any, is not special: list it among `tensors`.
    """
    check_models("linear", tensors, None)
    weights = check_per_model("linear", "weight", weight, len(tensors))
    first = tensors[0]
    dtype = torch.float64 if first.dtype == torch.float64 else torch.float32
    coefficients = torch.tensor([weights], dtype=dtype, device=first.device)  # (1, M)
    result = torch.zeros_like(first, dtype=dtype)
    for tensor, coefficient in zip(tensors, coefficients[0].unbind(0), strict=True):
        result.addcmul_(tensor, coefficient)
    if normalize:
        result.div_(coefficients.sum(dim=1))
    return result.to(first.dtype)


LINEAR = register(
    MergeMethod(
        name="linear",
        kernel=as_kernel(linear),
        params=(weight_spec(), flag_spec("normalize", True, "divide by the sum of the weights")),
        requires_base=False,
        accepts_base=False,
        min_models=1,
        description="Weighted average of the models (a base_model is just one more model).",
    )
)
