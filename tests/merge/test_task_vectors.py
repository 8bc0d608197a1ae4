"""The task-vector cache: merge_into gives the same bits with and without it, within its memory cap."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from tests.merge.test_methods import GTA

from evomerge.errors import ConfigError
from evomerge.merge.config import MergeConfig
from evomerge.merge.engine import merge_into
from evomerge.merge.sources import SourceSet
from evomerge.merge.task_vectors import TaskVectorCache, resolve_budget


def _config(fam: dict[str, Path], method: str, weights: tuple[float, float], density: float) -> MergeConfig:
    extra = ", epsilon: 0.1" if method.startswith("della") else ""
    return MergeConfig.from_yaml(
        f"merge_method: {method}\nbase_model: {fam['base']}\nmodels:\n"
        f"  - {{model: {fam['ft0']}, parameters: {{weight: {weights[0]}, density: {density}{extra}}}}}\n"
        f"  - {{model: {fam['ft1']}, parameters: {{weight: {weights[1]}, density: 0.7{extra}}}}}\n"
        f"  - {{model: {fam['ft2']}, parameters: {{weight: [1.0, 0.2], density: 0.4{extra}}}}}\n"
    )


# weights change, then the density of one model, then back: hits for raw and trimmed deltas, and a
# weight of exactly 1 (the TIES path that defers its trim mask into the disjoint sum)
CANDIDATES = [((0.6, 0.4), 0.5), ((1.0, 1.0), 0.5), ((0.3, -0.2), 0.5), ((0.6, 0.4), 0.3), ((0.2, 0.9), 0.5)]


def _model(path: Path) -> Any:
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(path).eval()


def _states(
    fam: dict[str, Path], method: str, cache: TaskVectorCache | None, dtype: torch.dtype
) -> list[dict[str, torch.Tensor]]:
    model = _model(fam["base"]).to(dtype)
    states = []
    with SourceSet.load(_config(fam, method, *CANDIDATES[0]), dtype=dtype) as sources:
        for seed, (weights, density) in enumerate(CANDIDATES):
            config = _config(fam, method, weights, density)
            merge_into(model, config, sources, seed=seed, task_vectors=cache, threads=2)
            states.append({name: t.clone() for name, t in model.state_dict().items()})
    return states


def _assert_same_bits(left: list[dict[str, torch.Tensor]], right: list[dict[str, torch.Tensor]]) -> None:
    for number, (a, b) in enumerate(zip(left, right, strict=True)):
        for name, tensor in a.items():
            same = torch.equal(tensor.view(torch.uint8), b[name].view(torch.uint8))  # signed zeros too
            assert same, f"candidate {number}: {name}"


@pytest.mark.parametrize("method", GTA)
def test_bit_identical_with_and_without_the_cache(fam: dict[str, Path], method: str) -> None:
    cache = TaskVectorCache(1 << 30)
    _assert_same_bits(_states(fam, method, cache, torch.float32), _states(fam, method, None, torch.float32))
    if method.startswith(("dare", "della")):  # random drops: x - base afresh (a copy costs the same)
        assert len(cache) == 0
        return
    assert cache.hits > 0 and len(cache) > 0
    if method in ("ties", "breadcrumbs", "breadcrumbs_ties"):  # trimmed deltas cached per density
        assert any(len(key) > 4 for key in cache._sparse)


@pytest.mark.parametrize("method", ["ties", "breadcrumbs_ties", "dare_ties"])
def test_bit_identical_in_bfloat16(fam: dict[str, Path], method: str) -> None:
    # bf16 magnitudes tie often: the trimmed set's tie-break must be the same with the cache
    cache = TaskVectorCache(1 << 30)
    cached = _states(fam, method, cache, torch.bfloat16)
    _assert_same_bits(cached, _states(fam, method, None, torch.bfloat16))


def test_respects_its_memory_cap(fam: dict[str, Path]) -> None:
    tensor_bytes = 4 * 64 * 64  # a few of the family's bigger tensors fit, not all
    budget = 10 * tensor_bytes
    cache = TaskVectorCache(budget)
    capped = _states(fam, "ties", cache, torch.float32)
    assert 0 < cache.bytes <= budget
    assert cache.bytes == sum(
        t.numel() * t.element_size() for t in [*cache._raw.values(), *cache._sparse.values()]
    )
    _assert_same_bits(capped, _states(fam, "ties", None, torch.float32))
    empty = TaskVectorCache(0)
    _states(fam, "task_arithmetic", empty, torch.float32)
    assert len(empty) == 0 and empty.bytes == 0


def test_sparse_entries_make_room_for_task_vectors() -> None:
    cache = TaskVectorCache(3 * 400)
    for density in (0.1, 0.2, 0.3):  # three trimmed deltas fill the budget
        cache.get(("w", "m", "b", "magnitude", density), lambda: torch.zeros(100), raw=False)
    cache.get(("w", "m", "b", "delta"), lambda: torch.ones(100), raw=True)
    assert cache.bytes == 3 * 400
    assert ("w", "m", "b", "magnitude", 0.1) not in cache._sparse  # the oldest made room
    assert ("w", "m", "b", "delta") in cache._raw
    owned = cache.get(("w", "m", "b", "delta"), lambda: torch.full((100,), 7.0), raw=True)
    owned.zero_()  # the caller's copy: the cached tensor is untouched
    assert torch.equal(cache._raw[("w", "m", "b", "delta")], torch.ones(100))


def test_budget_settings() -> None:
    assert resolve_budget("off") == 0
    assert resolve_budget(0) == 0
    assert resolve_budget(123) == 123
    assert resolve_budget("auto") > 0
    with pytest.raises(ConfigError, match="task_vector_cache"):
        resolve_budget("lots")


@pytest.mark.parametrize("method", ["ties", "task_arithmetic"])
def test_without_raw_deltas_only_trimmed_ones_are_kept(fam: dict[str, Path], method: str) -> None:
    # what "auto" builds: a raw delta is computed each time (no faster to read), a trimmed one is kept
    cache = TaskVectorCache(1 << 30, keep_raw=False)
    _assert_same_bits(_states(fam, method, cache, torch.float32), _states(fam, method, None, torch.float32))
    assert not cache._raw
    if method == "ties":
        assert cache._sparse and cache.hits > 0
    else:
        assert len(cache) == 0 and cache.bytes == 0
