"""ProDistill's training loop for one stage (merge/distill.py), on a hand-made linear stage."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from evomerge.merge.distill import DistillBatch, merged_params, train_coefficients


def _linear(
    params: Mapping[str, torch.Tensor], hidden: torch.Tensor, kwargs: Mapping[str, Any]
) -> torch.Tensor:
    return hidden @ params["w"].T  # (batch, tokens, out)


def _problem(models: int = 2, seed: int = 0) -> tuple[dict, list[dict], list[DistillBatch]]:
    """A base and `models` fine-tunes of one (3, 4) linear; per model two batches of (merged, own) inputs."""
    generator = torch.Generator().manual_seed(seed)
    base = {"w": torch.randn(3, 4, generator=generator)}
    deltas = [{"w": 0.5 * torch.randn(3, 4, generator=generator)} for _ in range(models)]
    batches = []
    for index, delta in enumerate(deltas):
        for _ in range(2):
            own = torch.randn(2, 5, 4, generator=generator)  # (batch, tokens, in)
            merged = own + 0.1 * torch.randn(2, 5, 4, generator=generator)
            mask = torch.ones(2, 5, dtype=torch.bool)
            mask[1, 3:] = False  # padding
            target = own @ (base["w"] + delta["w"]).T
            batches.append(DistillBatch(index, merged, target, mask))
    return base, deltas, batches


def test_training_lowers_the_loss_from_the_initial_coefficients() -> None:
    base, deltas, batches = _problem(models=1)
    result = train_coefficients(_linear, base, deltas, batches, weights=[1.0], init=0.5, lr=0.05, epochs=60)
    assert len(result.losses) == 61
    assert result.losses[-1] < 0.1 * result.losses[0]  # one model: its own weights are (nearly) reachable
    assert result.coefficients[0]["w"].shape == (3, 4) and not result.coefficients[0]["w"].requires_grad
    base, deltas, batches = _problem(models=2)  # two models pull apart: a floor, but below the start
    result = train_coefficients(
        _linear, base, deltas, batches, weights=[1.0, 1.0], init=0.5, lr=0.05, epochs=30
    )
    assert result.losses[-1] < 0.85 * result.losses[0]


def test_training_is_deterministic_under_its_seed() -> None:
    base, deltas, batches = _problem()
    runs = [
        train_coefficients(
            _linear, base, deltas, batches, weights=[1.0, 2.0], init=0.3, lr=0.05, epochs=5, seed=s
        )
        for s in (4, 4, 5)
    ]
    for first, second in zip(runs[0].coefficients, runs[1].coefficients, strict=True):
        assert torch.equal(first["w"], second["w"])
    assert not torch.equal(runs[0].coefficients[0]["w"], runs[2].coefficients[0]["w"])  # another batch order


def test_one_model_on_its_own_inputs_stays_at_its_own_weights() -> None:
    """Coefficient 1 reproduces the model exactly: the loss is zero and training leaves it there."""
    base, deltas, batches = _problem(models=1)
    exact = [DistillBatch(0, b.merged, b.merged @ (base["w"] + deltas[0]["w"]).T, b.mask) for b in batches]
    result = train_coefficients(_linear, base, deltas, exact, weights=[1.0], init=1.0, lr=0.1, epochs=5)
    assert result.losses[0] < 1e-10
    torch.testing.assert_close(result.coefficients[0]["w"], torch.ones(3, 4))


def test_padding_is_left_out_of_the_loss() -> None:
    base, deltas, batches = _problem(models=1)
    noisy = [
        DistillBatch(
            0, b.merged, torch.where(b.mask[..., None], b.target, torch.full_like(b.target, 1e6)), b.mask
        )
        for b in batches
    ]
    clean = train_coefficients(_linear, base, deltas, batches, weights=[1.0], init=0.5, lr=0.05, epochs=3)
    padded = train_coefficients(_linear, base, deltas, noisy, weights=[1.0], init=0.5, lr=0.05, epochs=3)
    torch.testing.assert_close(padded.coefficients[0]["w"], clean.coefficients[0]["w"])


def test_kl_loss_is_zero_when_the_softmax_agrees() -> None:
    base, deltas, batches = _problem(models=1)
    same = [
        DistillBatch(0, b.merged, b.merged @ (base["w"] + deltas[0]["w"]).T + 3.0, b.mask) for b in batches
    ]
    result = train_coefficients(
        _linear, base, deltas, same, weights=[1.0], init=1.0, lr=0.1, epochs=1, kl=True
    )
    assert result.losses[0] < 1e-6  # a constant shift of the logits is the same distribution


def test_merged_params_are_base_plus_scaled_task_vectors() -> None:
    base = {"w": torch.ones(2)}
    deltas = [{"w": torch.tensor([1.0, 2.0])}, {"w": torch.tensor([-1.0, 4.0])}]
    coefficients = [{"w": torch.tensor([0.5, 1.0])}, {"w": torch.tensor([2.0, 0.0])}]
    torch.testing.assert_close(merged_params(base, deltas, coefficients)["w"], torch.tensor([-0.5, 3.0]))
