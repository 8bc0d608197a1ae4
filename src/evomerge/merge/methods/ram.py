"""RAM and RAM+ (Reinforced Agent Merging, https://arxiv.org/abs/2601.13572): merge task vectors entry by
entry according to how many models changed that entry.

    delta_i  = x_i - base,  moved_i = |delta_i| > epsilon,  c = sum_i moved_i      # per entry
    merged   = sum_i moved_i delta_i * ([c == 1] lambda_i + [c > 1] / c)
    out      = base + merged

An entry only one model changed keeps that model's change whole (RL fine-tunes update few parameters, so
averaging would dilute them); one several models changed gets their mean. In `ram`, lambda_i = 1. In
`ramplus_tl` (mergekit's tensor-local RAM+), a model whose changes overlap others' a lot gets its unique
changes boosted:

    rho_i    = #(moved_i and c > 1) / max(#(moved_i and c == 1), epsilon)    # counted over the tensor
    lambda_i = 1 + r * clamp(rho_i, 0, alpha)

Numerics follow mergekit: `ram` works in the inputs' dtype (its sum over models accumulates half
precision in float32 and rounds once, as torch's reduction does); in `ramplus_tl` the float32 lambda
promotes half-precision inputs, so its result is float32 (`widens_to_float32`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from evomerge.merge.methods._common import as_kernel, check_models, require_base
from evomerge.merge.registry import MergeMethod, ParamSpec, register


def _accumulator(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _moved(
    tensors: Sequence[torch.Tensor], base: torch.Tensor, epsilon: float
) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
    """Each model's delta with its unmoved entries zeroed, its moved mask, and how many models moved
    each entry."""
    deltas, masks = [], []
    count = torch.zeros(base.shape, dtype=torch.int64, device=base.device)
    for tensor in tensors:
        delta = tensor - base
        moved = delta.abs() > epsilon
        count += moved
        deltas.append(delta.mul_(moved))
        masks.append(moved)
    return deltas, masks, count


def _boosts(
    masks: list[torch.Tensor], count: torch.Tensor, r: float, alpha: float, epsilon: float
) -> torch.Tensor:
    """lambda_i per model (float32, shape (M,)): 1 + r clamp(shared_i / max(unique_i, epsilon), 0, alpha)."""
    shared = torch.stack([(moved & (count > 1)).sum() for moved in masks])
    unique = torch.stack([(moved & (count == 1)).sum() for moved in masks])
    rho = shared / unique.clamp(min=epsilon)  # int64 counts, float32 ratio
    return 1 + r * rho.clamp(min=0, max=alpha)


def _merge(
    method: str,
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor | None,
    epsilon: float,
    boost: tuple[float, float] | None,
) -> torch.Tensor:
    """ram's sum (inputs checked for `method`); `boost` (r, alpha) scales the unique changes (ramplus_tl)."""
    base = require_base(method, base)
    check_models(method, tensors, base)
    if not tensors:
        return base.clone()
    deltas, masks, count = _moved(tensors, base, epsilon)
    alone, shared = count == 1, count > 1
    divisor = count.clamp(min=1)
    lambdas = None if boost is None else _boosts(masks, count, *boost, epsilon)
    del masks
    dtype = base.dtype if lambdas is None else torch.promote_types(base.dtype, lambdas.dtype)
    merged = torch.zeros(base.shape, dtype=_accumulator(dtype), device=base.device)
    for index, delta in enumerate(deltas):  # summed in model order, as torch sums the stacked terms
        unique_part = delta * alone
        if lambdas is not None:  # (the unique term is exactly 0 or delta, so the order of products is free)
            unique_part = unique_part.to(dtype) * lambdas[index].to(dtype)
        merged += unique_part + delta * shared / divisor
    return base + merged.to(dtype)


def ram(
    tensors: Sequence[torch.Tensor],
    *,
    base: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    epsilon: float = 1e-5,
) -> torch.Tensor:
    """base + (changes one model alone made) + (mean of changes several models made)."""
    return _merge("ram", tensors, base, epsilon, None)


def ramplus_tl(
    tensors: Sequence[torch.Tensor],
    *,
    base: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    r: float = 0.1,
    alpha: float = 0.2,
    epsilon: float = 1e-5,
) -> torch.Tensor:
    """`ram` with each model's unique changes scaled by 1 + r clamp(overlap ratio, 0, alpha)."""
    return _merge("ramplus_tl", tensors, base, epsilon, (r, alpha))


def _epsilon() -> ParamSpec:
    return ParamSpec(
        "epsilon",
        default=1e-5,
        per_model=False,
        low=0.0,
        search_range=(0.0, 1e-3),
        description="a change of at most this size does not count as a change",
    )


register(
    MergeMethod(
        name="ram",
        kernel=as_kernel(ram),
        params=(_epsilon(),),
        requires_base=True,
        accepts_base=True,
        min_models=0,  # mergekit accepts the base alone and returns it
        description="RAM: keep changes one model made alone, average those several made.",
    )
)

register(
    MergeMethod(
        name="ramplus_tl",
        kernel=as_kernel(ramplus_tl),
        params=(
            ParamSpec(
                "r",
                default=0.1,
                per_model=False,
                search_range=(0.0, 1.0),
                description="strength of the boost of a model's unique changes",
            ),
            ParamSpec(
                "alpha",
                default=0.2,
                per_model=False,
                search_range=(0.0, 1.0),
                description="cap on the overlap ratio that sets the boost",
            ),
            _epsilon(),
        ),
        requires_base=True,
        accepts_base=True,
        min_models=0,
        widens_to_float32=True,
        description="RAM+ (tensor-local): RAM with unique changes boosted by the model's overlap ratio.",
    )
)
