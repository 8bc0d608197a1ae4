"""CycleQD's SVD mutation: a low-rank change along the task vector's top singular directions, seeded,
shape- and dtype-preserving, and never touching its inputs."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from evomerge.errors import ConfigError, TensorMismatchError
from evomerge.merge.svd_mutation import svd_mutation


def task_vector(*shape: int, dtype: torch.dtype = torch.float64, seed: int = 0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def mutate(
    tensor: torch.Tensor,
    *,
    seed: int = 1,
    rank: int = 3,
    scale: float = 0.5,
    basis: torch.Tensor | None = None,
) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return svd_mutation(tensor, rank=rank, scale=scale, generator=generator, basis=basis)


@pytest.mark.parametrize("rank", [1, 3, 7])
def test_the_change_has_at_most_rank_components(rank: int) -> None:
    tensor = task_vector(24, 16)
    change = mutate(tensor, rank=rank) - tensor
    assert torch.linalg.matrix_rank(change).item() == rank  # uniform gains are almost surely nonzero


def test_the_change_lies_in_the_top_singular_directions() -> None:
    tensor = task_vector(24, 16)
    u, s, vh = torch.linalg.svd(tensor, full_matrices=False)
    change = mutate(tensor, rank=4) - tensor
    top_u, top_v = u[:, :4], vh[:4].T  # (24, 4), (16, 4)
    torch.testing.assert_close(top_u @ (top_u.T @ change @ top_v) @ top_v.T, change)
    gains = torch.diagonal(u.T @ change @ vh.T)[:4] / s[:4]  # each top singular value stretched by 1 + g
    assert torch.all((gains >= 0) & (gains < 0.5))


def test_a_rank_above_the_matrix_rank_uses_every_component() -> None:
    tensor = task_vector(6, 4)
    change = mutate(tensor, rank=100) - tensor
    assert torch.linalg.matrix_rank(change).item() == 4


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_shape_and_dtype_are_kept(dtype: torch.dtype) -> None:
    tensor = task_vector(12, 8, dtype=dtype)
    mutated = mutate(tensor)
    assert mutated.shape == tensor.shape and mutated.dtype == dtype
    assert not torch.equal(mutated, tensor)


def test_a_higher_dimensional_tensor_is_mutated_as_a_matrix() -> None:
    tensor = task_vector(8, 3, 2, 2)  # e.g. a conv kernel: (out, in, kh, kw) -> (8, 12)
    change = (mutate(tensor, rank=2) - tensor).reshape(8, -1)
    assert torch.linalg.matrix_rank(change).item() == 2


@pytest.mark.parametrize("shape", [(), (16,)])
def test_biases_and_norms_pass_through_unchanged(shape: tuple[int, ...]) -> None:
    tensor = task_vector(*shape)
    mutated = mutate(tensor)
    assert torch.equal(mutated, tensor) and mutated is not tensor


def test_scale_zero_returns_the_input() -> None:
    tensor = task_vector(10, 6, dtype=torch.bfloat16)
    mutated = mutate(tensor, scale=0.0)
    assert torch.equal(mutated, tensor) and mutated is not tensor


def test_a_seeded_generator_decides() -> None:
    tensor = task_vector(10, 6)
    assert torch.equal(mutate(tensor, seed=3), mutate(tensor, seed=3))
    assert not torch.equal(mutate(tensor, seed=3), mutate(tensor, seed=4))


def test_the_inputs_are_not_modified() -> None:
    tensor, basis = task_vector(10, 6), task_vector(10, 6, seed=9)
    kept, kept_basis = tensor.clone(), basis.clone()
    mutate(tensor, basis=basis)
    assert torch.equal(tensor, kept) and torch.equal(basis, kept_basis)


def test_a_basis_gives_the_directions() -> None:
    """CycleQD stretches the quality task's expert directions, whatever the child's own are."""
    child, expert = task_vector(12, 8), task_vector(12, 8, seed=5)
    u, _, vh = torch.linalg.svd(expert, full_matrices=False)
    change = mutate(child, basis=expert, rank=2) - child
    top_u, top_v = u[:, :2], vh[:2].T
    torch.testing.assert_close(top_u @ (top_u.T @ change @ top_v) @ top_v.T, change)


@pytest.mark.parametrize(
    ("params", "error", "message"),
    [
        ({"rank": 0}, ConfigError, r"rank must be an integer >= 1, got 0"),
        ({"scale": -0.1}, ConfigError, r"scale must be finite and >= 0"),
        ({"scale": float("nan")}, ConfigError, r"scale must be finite"),
        ({"basis": torch.zeros(3, 3)}, TensorMismatchError, r"basis has shape \(3, 3\) but the task vector"),
    ],
)
def test_bad_parameters_are_refused(params: dict[str, Any], error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        mutate(task_vector(4, 4), **params)
