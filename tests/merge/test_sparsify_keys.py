"""The bfloat16 fast paths of TIES: int16 magnitude keys, their histogram threshold, the sort replay on them,
and the block-wise sign election / disjoint sum. Each is checked against the plain torch computation
mergekit runs (`torch.argsort` of the float32 magnitudes; stacked sums), bit for bit."""

from __future__ import annotations

import pytest
import torch

from evomerge.merge.methods.task_arithmetic import (
    _disjoint_mean_chunked,
    _disjoint_sum,
    _divided_,
    _elected_signs,
)
from evomerge.merge.registry import get_method
from evomerge.merge.sparsify import bf16_magnitude_keys, key_threshold, magnitude_, top_k_keys


def bf16_delta(size: int, seed: int, levels: int | None = None) -> torch.Tensor:
    """A task-vector-like bf16 tensor: small values, so its magnitudes tie often (bf16 has 128 values per
    octave; `levels` makes it a few values, for ties in small tensors too)."""
    g = torch.Generator().manual_seed(seed)
    if levels is not None:
        return (torch.randint(-levels, levels + 1, (size,), generator=g) * 1e-3).bfloat16()
    return (torch.randn(size, generator=g) * 2e-3).bfloat16()


def argsort_mask(delta: torch.Tensor, k: int, stable: bool = False) -> torch.Tensor:
    """mergekit's top-k: argsort of |delta| upcast to float32, descending, first k."""
    order = torch.sort(delta.abs().reshape(-1).float(), descending=True, stable=stable).indices
    mask = torch.zeros(delta.numel(), dtype=torch.bool)
    mask[order[:k]] = True
    return mask


def test_keys_order_as_the_float32_magnitudes_do() -> None:
    special = torch.tensor([0.0, -0.0, 1e-40, -1e-40, float("inf"), float("-inf"), 3.0, -3.0])
    values = torch.cat([bf16_delta(5000, 0).float(), special]).bfloat16()
    keys = torch.from_numpy(bf16_magnitude_keys(values))  # type: ignore[arg-type]
    magnitudes = values.abs().float()
    by_key = torch.sort(keys, stable=True).indices
    by_value = torch.sort(magnitudes, stable=True).indices
    assert torch.equal(by_key, by_value)
    assert torch.equal(keys[1:] == keys[:-1], magnitudes[1:] == magnitudes[:-1])


def test_keys_are_only_for_cpu_bfloat16() -> None:
    assert bf16_magnitude_keys(torch.randn(10)) is None
    assert bf16_magnitude_keys(torch.randn(10).half()) is None


@pytest.mark.parametrize("k", [1, 777, 2500, 4999])
def test_histogram_threshold_is_the_kth_largest_and_counts_its_ties(k: int) -> None:
    delta = bf16_delta(5000, k)
    keys = bf16_magnitude_keys(delta)
    assert keys is not None
    found = key_threshold(keys, k)
    assert found is not None
    threshold, above, tied = found
    magnitudes = delta.abs().float()
    kth = torch.kthvalue(magnitudes, 5000 - k + 1).values
    assert int(keys[int(torch.argmax((magnitudes == kth).int()))]) == threshold
    assert above == int((magnitudes > kth).sum()) and tied == int((magnitudes == kth).sum())
    assert above < k <= above + tied


def test_a_nan_key_is_left_to_the_float_path() -> None:
    delta = bf16_delta(1000, 1)
    delta[17] = float("nan")
    keys = bf16_magnitude_keys(delta)
    assert keys is not None and key_threshold(keys, 10) is None and top_k_keys(keys, 10) is None
    kept = (
        magnitude_(delta.clone(), 0.3) != 0
    )  # the float path's real sort ranks the NaN first, as mergekit's
    assert torch.equal(kept | delta.isnan(), argsort_mask(delta, 300) | delta.isnan())


@pytest.mark.parametrize(("size", "levels"), [(1000, 20), (70_001, None), (400_000, None)])
@pytest.mark.parametrize("density", [0.1, 0.5, 0.93])
def test_bf16_top_k_takes_exactly_the_ties_torch_argsort_takes(
    size: int, levels: int | None, density: float
) -> None:
    """The replay on int16 keys must pick mergekit's tied entries; many tie at the threshold here, so a
    replay that differed from torch's sort anywhere (sizes above 65536 use the chunk-located crossing)
    would keep different ones."""
    delta = bf16_delta(size, size, levels)
    k = max(1, int(density * size))
    keys = bf16_magnitude_keys(delta)
    assert keys is not None
    found = key_threshold(keys, k)
    assert found is not None and found[1] + found[2] > k  # a tie straddles the threshold: the hard case
    reference = argsort_mask(delta, k)
    assert torch.equal(torch.from_numpy(top_k_keys(keys, k)), reference)  # type: ignore[arg-type]
    trimmed = magnitude_(delta.clone(), density)
    assert torch.equal(trimmed, delta * reference)


@pytest.mark.parametrize("size", [1000, 300_000])
def test_bf16_stable_tie_break_keeps_the_lowest_indices(size: int) -> None:
    delta = bf16_delta(size, 7)
    keys = bf16_magnitude_keys(delta)
    assert keys is not None
    for k in (1, size // 3, size - 1):
        kept = torch.from_numpy(top_k_keys(keys, k, "stable"))  # type: ignore[arg-type]
        assert torch.equal(kept, argsort_mask(delta, k, stable=True))


def test_bf16_replay_order_differs_from_the_stable_order() -> None:
    """Guards the test above against passing vacuously: torch's order among ties is not index order."""
    delta = bf16_delta(300_000, 3)
    keys = bf16_magnitude_keys(delta)
    assert keys is not None
    exact, stable = top_k_keys(keys, 150_000), top_k_keys(keys, 150_000, "stable")
    assert exact is not None and stable is not None and (exact != stable).any()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("normalize", [True, False])
def test_blockwise_disjoint_mean_equals_the_whole_tensor_one(dtype: torch.dtype, normalize: bool) -> None:
    g = torch.Generator().manual_seed(5)
    weights = [1.0, 0.55, -0.3]
    stored = torch.tensor(weights, dtype=dtype).tolist()
    deltas = [(torch.randn(1001, 7, generator=g) * 1e-2).to(dtype) for _ in weights]
    for delta in deltas:
        delta[torch.rand(delta.shape, generator=g) < 0.5] = 0  # trimmed entries never agree
        delta[:3] = 0  # no model agrees: the divisor is 0 and counts as 1
    accumulator = torch.float32 if dtype != torch.float32 else dtype
    exact = [delta.to(accumulator) for delta in deltas]
    merged, divisor = _disjoint_sum(
        [e.clone() for e in exact], _elected_signs(exact, dtype), stored, normalize
    )
    whole = _divided_(merged.to(dtype), None if divisor is None else divisor.to(dtype))
    blocked = _disjoint_mean_chunked([d.clone() for d in deltas], stored, normalize, chunk=1000)
    assert blocked.dtype == dtype and blocked.shape == deltas[0].shape
    assert torch.equal(blocked.view(torch.uint8), whole.view(torch.uint8))  # signed zeros too


def plain_ties(
    tensors: list[torch.Tensor], base: torch.Tensor, weights: list[float], densities: list[float]
) -> torch.Tensor:
    """TIES as mergekit 0.1.5 computes it, on whole stacked tensors: argsort trim, weight, sign of the sum,
    disjoint sum over the agreeing models divided by their weights."""
    trimmed = []
    for tensor, density in zip(tensors, densities, strict=True):
        delta = tensor - base
        mask = torch.zeros_like(delta)
        mask.view(-1)[argsort_mask(delta, int(density * delta.numel()))] = 1
        trimmed.append(delta * mask)
    stacked = torch.stack(trimmed)  # (M, ...)
    w = torch.tensor(weights, dtype=stacked.dtype).reshape(-1, *([1] * base.dim()))
    weighted = stacked * w
    majority = (weighted.sum(dim=0) >= 0).to(stacked.dtype) * 2 - 1
    agree = weighted.sign() == majority
    merged = (weighted * agree).sum(dim=0)
    divisor = (w * agree).sum(dim=0)
    divisor[divisor == 0] = 1
    return base + merged / divisor


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_ties_with_the_trim_folded_into_the_blocks_equals_plain_ties(dtype: torch.dtype) -> None:
    """Models of weight 1 are trimmed inside the block-wise disjoint mean (the others before weighting);
    over two blocks (160000 entries > 2^17) the result must be plain TIES's, bit for bit."""
    g = torch.Generator().manual_seed(9)
    base = torch.randn(400, 400, generator=g).to(dtype)
    tensors = [(base.float() + 2e-3 * torch.randn(400, 400, generator=g)).to(dtype) for _ in range(3)]
    weights, densities = [1.0, 0.5, 1.0], [0.5, 0.3, 0.7]
    ours = get_method("ties").kernel(  # type: ignore[misc]
        tensors, base=base, weight=weights, density=densities, normalize=True, rescale=False, lambda_=1.0
    )
    assert torch.equal(ours, plain_ties(tensors, base, weights, densities))
