"""The noise-of-the-same-norm control: same norm per tensor, random direction, loads like the source."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from evomerge.errors import TensorMismatchError
from evomerge.runs.controls import noise_like, write_noise_source
from evomerge.zoo.random_models import FamilySpec, build_family


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


def test_noise_has_the_norm_of_the_delta_and_another_direction() -> None:
    delta = torch.randn(64, 32) * 0.01
    noise = noise_like(delta, torch.Generator().manual_seed(0))
    assert noise.shape == delta.shape
    assert torch.isclose(noise.norm(), delta.norm(), rtol=1e-5)
    assert abs(float(torch.nn.functional.cosine_similarity(noise.flatten(), delta.flatten(), dim=0))) < 0.2


def test_noise_of_a_zero_delta_is_zero() -> None:
    assert not noise_like(torch.zeros(8), torch.Generator().manual_seed(0)).any()


def test_noise_source_matches_every_task_vector_norm(tmp_path: Path) -> None:
    family = build_family(tmp_path / "family", FamilySpec())
    out = write_noise_source(family["base"], family["ft0"], tmp_path / "noise", seed=1)
    base, source, noisy = _weights(family["base"]), _weights(family["ft0"]), _weights(out)
    assert noisy.keys() == source.keys()
    for name in source:
        assert noisy[name].dtype == source[name].dtype
        tau, fake = source[name].float() - base[name].float(), noisy[name].float() - base[name].float()
        assert torch.isclose(fake.norm(), tau.norm(), rtol=1e-3, atol=1e-6), name
    assert (out / "config.json").read_text() == (family["ft0"] / "config.json").read_text()
    again = write_noise_source(family["base"], family["ft0"], tmp_path / "again", seed=1)
    assert all(torch.equal(_weights(again)[n], noisy[n]) for n in noisy)  # reproducible from the seed


def test_noise_source_refuses_a_source_of_another_shape(tmp_path: Path) -> None:
    family = build_family(tmp_path / "a", FamilySpec())
    other = build_family(tmp_path / "b", FamilySpec(overrides={"hidden_size": 48}))
    with pytest.raises(TensorMismatchError, match="shape"):
        write_noise_source(family["base"], other["ft0"], tmp_path / "noise", seed=0)
    assert not (tmp_path / "noise").exists()
