"""NearSwap (https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001): take the other model's value
where it lies close to the base's, keep the base's where the two are far apart.

    share = clamp(t / max(|base - x|, 1e-6), 0, 1)
    out   = share * x + (1 - share) * base

An entry within `t` of the base moves all the way to the other model; one k times farther away moves by
1/k of the gap. mergekit's `nearswap`: a base and exactly one other model, `t` required.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from evomerge.merge.methods._common import as_kernel, check_models, require_base, require_count
from evomerge.merge.registry import MergeMethod, ParamSpec, register

_MIN_DISTANCE = 1e-6  # equal entries get share 1 (either end is the same value)


def nearswap(
    tensors: Sequence[torch.Tensor],
    *,
    base: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    t: float,
) -> torch.Tensor:
    """The base swapped towards the single other model where their entries are within ~`t` of each other.

    Runs in the inputs' dtype; `t` <= 0 gives the base, a `t` above every gap gives the other model.
    `t` = 0 returns the base outright: mergekit's float16 run gives NaN where the entries are equal
    (1 / 1e-6 overflows to inf, and 0 * inf), and the base everywhere else.
    """
    anchor = require_base("nearswap", base)
    require_count("nearswap", tensors, 1, 1)
    check_models("nearswap", tensors, anchor)
    if t == 0:
        return anchor.clone()
    other = tensors[0]
    gap = (anchor - other).abs().clamp_(min=_MIN_DISTANCE)
    share = (t / gap).clamp_(min=0, max=1)  # python-scalar division: x.reciprocal() * t, as torch does
    return share * other + (1 - share) * anchor


register(
    MergeMethod(
        name="nearswap",
        kernel=as_kernel(nearswap),
        params=(
            ParamSpec(
                "t",
                per_model=False,
                search_range=(0.0, 0.01),
                description="distance below which the other model's value is taken whole",
            ),
        ),
        requires_base=True,
        accepts_base=True,
        min_models=1,
        max_models=1,
        description="Swap in the other model's entries that lie within t of the base's.",
    )
)
