"""Model Stock, https://arxiv.org/abs/2403.19522: interpolate between the base and the fine-tunes' average
by a ratio set from the angle between their task vectors, t = M cos / (1 + (M - 1) cos)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from evomerge.merge.methods._common import as_kernel, check_models, flag_spec, require_base, require_count
from evomerge.merge.registry import MergeMethod, register


def _mean_cosine(offsets: list[torch.Tensor]) -> torch.Tensor:
    """Mean pairwise cosine of the task vectors along the last axis, with a trailing axis of 1."""
    cosines = []
    for index, a in enumerate(offsets):
        for b in offsets[index + 1 :]:
            norm_product = torch.norm(a, dim=-1) * torch.norm(b, dim=-1)
            cosines.append(((a * b).sum(dim=-1) / norm_product.clamp(min=1e-6)).clamp(-1, 1))
    return torch.stack(cosines).mean(dim=0).unsqueeze(-1)


def model_stock(
    tensors: Sequence[torch.Tensor],
    *,
    base: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    filter_wise: bool = False,
) -> torch.Tensor:
    """Whole tensors, or with `filter_wise` one ratio per row (the paper's per-filter variant).

    Where 1 + (M - 1) cos is ~0 (opposed updates) the base is kept, as mergekit does.
    """
    w0 = require_base("model_stock", base)
    require_count("model_stock", tensors, 2, None)
    check_models("model_stock", tensors, w0)
    shape = w0.shape
    ws = list(tensors)
    if not filter_wise:
        w0, ws = w0.reshape(-1), [w.reshape(-1) for w in ws]
    elif w0.dim() == 1:
        w0, ws = w0.unsqueeze(0), [w.unsqueeze(0) for w in ws]
    cos_theta = _mean_cosine([w - w0 for w in ws])
    count = len(ws)
    denominator = 1 + (count - 1) * cos_theta
    singular = denominator.abs() < 1e-6
    safe = torch.where(singular, torch.ones_like(denominator), denominator)
    t = torch.where(singular, torch.zeros_like(cos_theta), (count * cos_theta) / safe)
    total = ws[0] + 0
    for w in ws[1:]:
        total = total + w
    return (t * (total / count) + (1 - t) * w0).reshape(shape)


register(
    MergeMethod(
        name="model_stock",
        kernel=as_kernel(model_stock),
        params=(flag_spec("filter_wise", False, "one interpolation ratio per row instead of per tensor"),),
        requires_base=True,
        accepts_base=True,
        min_models=2,
        description="Base-to-average interpolation set by the angle between task vectors.",
    )
)
