"""ProDistill (Xu, Li, Zhang, ICML 2025, "Scalable Model Merging with Progressive Layer-wise Distillation",
https://arxiv.org/abs/2502.12706): task arithmetic with element-wise coefficients trained stage by stage.

Every tensor is merged as

    x = base + sum_i lambda_i * (x_i - base)                 # lambda_i: same shape as x_i

and the coefficients come from the sequential pass (`evomerge.merge.sequential`), which trains them per
stage with Adam on the calibration texts (`evomerge.merge.distill`): a decoder layer at a time, then the
final norm + lm_head, each stage on the merged model's features of the stages before it (the paper's dual
inputs). They reach the kernel as `statistics` (one tensor per model, the shape of the merged tensor).

The token embedding is a lookup table: on one-hot inputs the dual-input objective is
sum_i sum_t c_i[t] ||E[t] - E_i[t]||^2 (c_i[t]: the share of model i's calibration tokens that are t), whose
minimiser is the per-row mean weighted by token counts, lambda_i[t] = w_i c_i[t] / sum_j w_j c_j[t]; it is
taken in that closed form from the cached token counts (RegMean's embedding rule), and a row no model's
texts use keeps `init`. A tensor the pass gave no coefficients gets `init` for every model.
`distill_ends: false` is the authors' handling of the ends (their LLM code merges the embedding, final
norm and lm_head by task arithmetic at a fixed coefficient): only the decoder layers are trained.

The kernel itself is pure; `lr`, `epochs`, `kl_head`, `seed` and `distill_ends` are read by the pass.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from evomerge.errors import ConfigError
from evomerge.merge.calibration import with_statistics
from evomerge.merge.methods._common import check_models, check_per_model, flag_spec
from evomerge.merge.registry import MergeMethod, ParamSpec, register

INIT = 0.5  # the authors' code starts every coefficient at 0.5 (their LLM merges)
LR = 0.1  # Adam's learning rate in the authors' LLM merges (0.01 for ViT and BERT-sized models)
EPOCHS = 100  # passes over the calibration batches per stage (100 in the LLM and ViT merges, 50 for BERT)


def prodistill(
    tensors: Sequence[torch.Tensor],
    *,
    base: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    weight: Sequence[float] | None = None,
    init: float = INIT,
    lr: float = LR,
    epochs: int = EPOCHS,
    kl_head: bool = False,
    seed: int = 0,
    distill_ends: bool = True,
    statistics: Sequence[torch.Tensor | None] | None = None,
) -> torch.Tensor:
    """base + sum_i lambda_i (x_i - base), lambda_i = statistics[i] (trained coefficients), token-count
    rows for an embedding (statistics 1-D, one entry per row), else `init`."""
    if base is None:
        raise ConfigError("prodistill: merges task vectors from a base; add base_model.")
    check_models("prodistill", tensors, base)
    weights = check_per_model(
        "prodistill", "weight", weight if weight is not None else [1.0] * len(tensors), len(tensors)
    )
    dtype = torch.float64 if tensors[0].dtype == torch.float64 else torch.float32
    reference = base.to(dtype)
    coefficients = _coefficients(tensors, statistics, weights, init, dtype)
    merged = reference.clone()
    for tensor, coefficient in zip(tensors, coefficients, strict=True):
        merged.add_(coefficient * (tensor.to(dtype) - reference))
    return merged.to(tensors[0].dtype)


def _coefficients(
    tensors: Sequence[torch.Tensor],
    statistics: Sequence[torch.Tensor | None] | None,
    weights: Sequence[float],
    init: float,
    dtype: torch.dtype,
) -> list[torch.Tensor]:
    shape = tuple(tensors[0].shape)
    given = list(statistics) if statistics is not None else [None] * len(tensors)
    if any(s is None for s in given):
        return [torch.full(shape, init, dtype=dtype) for _ in tensors]
    present = [s for s in given if s is not None]
    if all(tuple(s.shape) == shape for s in present):
        return [s.to(dtype) for s in present]
    if len(shape) == 2 and all(tuple(s.shape) == shape[:1] for s in present):
        return token_count_coefficients(present, weights, init, dtype, shape)
    raise ConfigError(
        f"prodistill: coefficients of shape {[list(s.shape) for s in present]} for a tensor of shape "
        f"{list(shape)}; the statistics belong to another model: delete the calibration cache entry and "
        "merge again."
    )


def token_count_coefficients(
    counts: Sequence[torch.Tensor],
    weights: Sequence[float],
    init: float,
    dtype: torch.dtype,
    shape: tuple[int, ...],
) -> list[torch.Tensor]:
    """lambda_i[t] = w_i c_i[t] / sum_j w_j c_j[t] on every row some model's texts use, `init` elsewhere:
    the minimiser of the dual-input objective for a lookup table."""
    shares = [count.to(dtype) * w for count, w in zip(counts, weights, strict=True)]
    total = torch.stack(shares).sum(0)  # (rows,)
    seen = total > 0
    out = []
    for share in shares:
        row = torch.where(
            seen, share / total.clamp_min(torch.finfo(dtype).tiny), torch.full_like(share, init)
        )
        out.append(row[:, None].expand(shape).clone())
    return out


PRODISTILL = register(
    MergeMethod(
        name="prodistill",
        kernel=with_statistics(prodistill),
        params=(
            ParamSpec(
                "weight",
                default=1.0,
                low=0.0,
                search_range=(0.05, 1.0),
                description="how much this model's features count in the distillation loss",
            ),
            ParamSpec(
                "init",
                default=INIT,
                per_model=False,
                search_range=(0.1, 1.0),
                description="every coefficient's start (and the value where a tensor has no data)",
            ),
            ParamSpec(
                "lr",
                default=LR,
                per_model=False,
                low=0.0,
                low_open=True,
                search_range=(0.005, 0.2),
                description="Adam's learning rate for the coefficients",
            ),
            ParamSpec(
                "epochs",
                kind="int",
                default=EPOCHS,
                per_model=False,
                low=1,
                description="passes over the calibration batches per stage",
            ),
            flag_spec(
                "kl_head", False, "final stage: match the models' softmax (KL) instead of logits (MSE)"
            ),
            flag_spec(
                "distill_ends",
                True,
                "the embedding (token counts) and final norm + lm_head fitted too (false: `init` for them)",
            ),
            ParamSpec(
                "seed",
                kind="int",
                default=0,
                per_model=False,
                low=0,
                description="seeds the order of the calibration batches in each epoch",
            ),
        ),
        requires_base=True,
        min_models=1,
        description=(
            "ProDistill: task arithmetic with element-wise coefficients trained layer by layer (Adam) to "
            "reproduce each model's layer outputs from the merged model's features."
        ),
        statistics="gram",
        sequential=True,
        distill=True,
    )
)
