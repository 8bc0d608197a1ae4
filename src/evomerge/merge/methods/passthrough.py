"""Passthrough: copy one model's tensor, optionally scaled (layer stacking is built from it)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from evomerge.merge.methods._common import as_kernel, check_per_model, require_count
from evomerge.merge.registry import MergeMethod, ParamSpec, register


def passthrough(
    tensors: Sequence[torch.Tensor],
    *,
    base: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    scale: Sequence[float] = (1.0,),
) -> torch.Tensor:
    """x * scale (a new tensor; mergekit's default scale of None is the same as 1)."""
    require_count("passthrough", tensors, 1, 1)
    (factor,) = check_per_model("passthrough", "scale", scale, 1)
    return tensors[0] * factor


register(
    MergeMethod(
        name="passthrough",
        kernel=as_kernel(passthrough),
        params=(ParamSpec("scale", default=1.0, description="multiplies the tensor"),),
        requires_base=False,
        accepts_base=False,
        min_models=1,
        max_models=1,
        description="Copy the single source's tensor (times `scale`).",
    )
)
