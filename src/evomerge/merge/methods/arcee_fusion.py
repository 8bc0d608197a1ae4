"""Arcee Fusion (mergekit's `arcee_fusion`, https://arcee.ai): keep the base, and take the other model's
value only at the entries whose change is an outlier of importance.

    importance = |x - base| * KL(softmax(x) || softmax(base))        # the KL per row (last axis)
    threshold  = median + 1.5 * (Q3 - Q1)                              # of all the importances
    out        = base + (x - base) * [importance >= threshold]

The quartiles are order statistics at index floor(q * (n - 1)) of the sorted importances, as mergekit
takes them. mergekit estimates them from 10^6 entries drawn with replacement (unseeded) when a tensor is
larger; we take them from every entry with a linear-time selection instead, so the merge is deterministic
and equals mergekit's to the bit on every tensor of up to 10^6 entries.

The mask is float32, as in mergekit, so half-precision inputs give a float32 result (and output tensors,
unless the config sets `out_dtype`): `widens_to_float32` tells the planner.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from evomerge.merge.methods._common import as_kernel, check_models, require_base, require_count
from evomerge.merge.registry import MergeMethod, register

_KL_EPS = 1e-8  # added to both distributions before the log ratio
_OUTLIER_IQR = 1.5  # Tukey's fence


def importance(x: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """|x - base| scaled by the KL divergence of the rows' softmax distributions (one per row)."""
    p = F.softmax(x, dim=-1) + _KL_EPS
    q = F.softmax(base, dim=-1) + _KL_EPS
    divergence = torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)  # (..., 1)
    return (x - base).abs() * divergence


def outlier_threshold(scores: torch.Tensor) -> torch.Tensor:
    """median + 1.5 IQR, each quartile the entry of rank floor(q (n - 1)) (0-based) in sorted order;
    the arithmetic in the scores' dtype, as mergekit's."""
    flat = scores.reshape(-1)
    last = flat.numel() - 1
    ranks = [last // 4, last // 2, 3 * last // 4]
    if flat.device.type == "cpu":  # one selection pass for the three ranks (exact: float32 holds bf16/fp16)
        wide = flat.to(torch.float64 if flat.dtype == torch.float64 else torch.float32).numpy()
        chosen = torch.from_numpy(np.partition(wide, ranks)[ranks]).to(flat.dtype)
        q1, median, q3 = chosen.unbind(0)
    else:
        q1, median, q3 = (flat.kthvalue(rank + 1).values for rank in ranks)
    return median + _OUTLIER_IQR * (q3 - q1)


def arcee_fusion(
    tensors: Sequence[torch.Tensor],
    *,
    base: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The base with the other model's entries of outlying importance swapped in (float32 or wider)."""
    anchor = require_base("arcee_fusion", base)
    require_count("arcee_fusion", tensors, 1, 1)
    check_models("arcee_fusion", tensors, anchor)
    other = tensors[0]
    if other.numel() == 0:
        return anchor.to(torch.promote_types(anchor.dtype, torch.float32), copy=True)
    scores = importance(other, anchor)
    keep = (scores >= outlier_threshold(scores)).float()
    return anchor + (other - anchor) * keep


register(
    MergeMethod(
        name="arcee_fusion",
        kernel=as_kernel(arcee_fusion),
        params=(),
        requires_base=True,
        accepts_base=True,
        min_models=1,
        max_models=1,
        widens_to_float32=True,
        description="Take the other model's entries whose importance is an outlier (median + 1.5 IQR).",
    )
)
