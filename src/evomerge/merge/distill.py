"""ProDistill's training of one stage: element-wise merging coefficients fitted by feature distillation.

ProDistill (Xu, Li, Zhang, ICML 2025, "Scalable Model Merging with Progressive Layer-wise Distillation",
https://arxiv.org/abs/2502.12706) merges a stage (a decoder layer, or the final norm + lm_head) as

    theta = theta_0 + sum_i lambda_i * tau_i          # tau_i = theta_i - theta_0, lambda_i as big as tau_i

and trains the coefficients lambda_i with Adam on a few calibration examples per model, with "dual
inputs": the merged stage runs on the merged model's features Z_i (model i's texts through the merged
stages before), and must reproduce model i's own stage on model i's own features X_i,

    min_lambda  sum_i w_i / sum_j w_j * mean_{real tokens} || f(theta; Z_i) - f(theta_i; X_i) ||^2

(the paper's feature MSE; `kl=True` uses the KL divergence from model i's to the merged softmax instead,
for a stage whose outputs are logits). One Adam step per batch (one model's batch of texts), every batch
once per epoch in an order drawn from a seeded generator. The function is pure: the stage is a function
of its parameters and input, the data are tensors, nothing outside is modified.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

StageFn = Callable[[Mapping[str, torch.Tensor], torch.Tensor, Mapping[str, Any]], torch.Tensor]


@dataclass(frozen=True)
class DistillBatch:
    """One batch of one model's calibration texts at the stage's entry.

    `merged`: the stage's input in the merged model (batch, tokens, hidden); `target`: model `model`'s own
    stage output on its own input (same leading shape); `mask`: the real tokens (batch, tokens);
    `kwargs`: what else the stage takes (position embeddings, attention mask)."""

    model: int
    merged: torch.Tensor
    target: torch.Tensor
    mask: torch.Tensor
    kwargs: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class DistillResult:
    """The trained coefficients (per model, per tensor name) and the loss over all batches per epoch
    (`losses[0]`: at the initial coefficients, before any step; `losses[-1]`: after the last epoch)."""

    coefficients: list[dict[str, torch.Tensor]]
    losses: list[float]


def merged_params(
    base: Mapping[str, torch.Tensor],
    deltas: Sequence[Mapping[str, torch.Tensor]],
    coefficients: Sequence[Mapping[str, torch.Tensor]],
) -> dict[str, torch.Tensor]:
    """theta_0 + sum_i lambda_i * tau_i, per tensor name."""
    out = {}
    for name, theta in base.items():
        total = theta
        for delta, coefficient in zip(deltas, coefficients, strict=True):
            total = total + coefficient[name] * delta[name]
        out[name] = total
    return out


def train_coefficients(
    stage: StageFn,
    base: Mapping[str, torch.Tensor],
    deltas: Sequence[Mapping[str, torch.Tensor]],
    batches: Sequence[DistillBatch],
    *,
    weights: Sequence[float],
    init: float,
    lr: float,
    epochs: int,
    seed: int = 0,
    kl: bool = False,
) -> DistillResult:
    """Adam on the element-wise coefficients of one stage (see the module docstring); float32 throughout."""
    generator = torch.Generator().manual_seed(seed)
    coefficients = [
        {name: torch.full_like(theta, init, requires_grad=True) for name, theta in base.items()}
        for _ in deltas
    ]
    optimizer = torch.optim.Adam([c for model in coefficients for c in model.values()], lr=lr)
    share = [w / sum(weights) for w in weights]
    losses = [_total_loss(stage, base, deltas, coefficients, batches, share, kl)]
    for _ in range(epochs):
        for index in torch.randperm(len(batches), generator=generator).tolist():
            batch = batches[index]
            optimizer.zero_grad()
            loss = share[batch.model] * _batch_loss(stage, base, deltas, coefficients, batch, kl)
            loss.backward()
            optimizer.step()
        losses.append(_total_loss(stage, base, deltas, coefficients, batches, share, kl))
    return DistillResult([{n: c.detach() for n, c in model.items()} for model in coefficients], losses)


def _batch_loss(
    stage: StageFn,
    base: Mapping[str, torch.Tensor],
    deltas: Sequence[Mapping[str, torch.Tensor]],
    coefficients: Sequence[Mapping[str, torch.Tensor]],
    batch: DistillBatch,
    kl: bool,
) -> torch.Tensor:
    output = stage(merged_params(base, deltas, coefficients), batch.merged, batch.kwargs)[batch.mask]
    target = batch.target[batch.mask]  # (real tokens, features)
    if kl:
        log_merged = torch.log_softmax(output, dim=-1)
        log_own = torch.log_softmax(target, dim=-1)
        return (log_own.exp() * (log_own - log_merged)).sum(-1).mean()
    return ((output - target) ** 2).mean()


def _total_loss(
    stage: StageFn,
    base: Mapping[str, torch.Tensor],
    deltas: Sequence[Mapping[str, torch.Tensor]],
    coefficients: Sequence[Mapping[str, torch.Tensor]],
    batches: Sequence[DistillBatch],
    share: Sequence[float],
    kl: bool,
) -> float:
    """The objective over every batch (each model's batches averaged, then weighted)."""
    per_model: dict[int, list[float]] = {}
    with torch.no_grad():
        for batch in batches:
            loss = float(_batch_loss(stage, base, deltas, coefficients, batch, kl))
            per_model.setdefault(batch.model, []).append(loss)
    return sum(share[m] * sum(values) / len(values) for m, values in per_model.items())
