"""Property tests run on every registered merge method, plus each method's defining identities."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import pytest
import torch

from evomerge.errors import ConfigError
from evomerge.merge.registry import MergeMethod, all_methods, get_method
from evomerge.merge.sparsify import (
    bernoulli_,
    della_magprune_,
    della_probabilities,
    kth_largest,
    magnitude_,
    magnitude_outliers_,
    sort_prefix_mask,
    top_k_mask,
    window_mask,
)

EXPECTED = {
    "linear", "task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties",
    "della", "della_linear", "slerp", "nuslerp", "multislerp", "karcher", "model_stock", "sce", "passthrough",
    "nearswap", "arcee_fusion", "ram", "ramplus_tl",
}  # fmt: skip
BEYOND_MERGEKIT = {
    "regmean",
    "regmean_plusplus",
    "prodistill",
    "fisher",
    "tsv",
    "iso_c",
}  # docs/methods.md#beyond-mergekit
METHODS = all_methods()
GTA = [
    "task_arithmetic",
    "ties",
    "dare_ties",
    "dare_linear",
    "breadcrumbs",
    "breadcrumbs_ties",
    "della",
    "della_linear",
]


@pytest.fixture(autouse=True)
def _reproducible_draws() -> Iterator[None]:
    """Tests that draw from torch's global generator draw the same numbers every run (and leave it be)."""
    with torch.random.fork_rng():
        torch.manual_seed(1234)
        yield


def call(
    name: str,
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor | None = None,
    seed: int | None = None,
    lenient: bool = False,
    **overrides: Any,
) -> torch.Tensor:
    """Call a kernel the way the engine does: every declared parameter, defaults filled in.

    `lenient` drops overrides the method does not declare (for tests parametrised over methods)."""
    method = get_method(name)
    params: dict[str, Any] = {}
    for spec in method.params:
        value = overrides.pop(spec.name, spec.default if spec.default is not None else 0.5)
        if spec.per_model and not isinstance(value, list):
            value = [value] * len(tensors)
        params["lambda_" if spec.name == "lambda" else spec.name] = value
    assert lenient or not overrides, f"unknown test overrides {overrides}"
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    assert method.kernel is not None
    return method.kernel(tensors, base=base, generator=generator, **params)


def model_count(method: MergeMethod) -> int:
    return max(method.min_models, min(3, method.max_models or 3))


def inputs(
    method: MergeMethod, shape: tuple[int, ...] = (24, 16), seed: int = 0
) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    """Fine-tunes near a shared base, as real merges see them."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    tensors = [base + 0.1 * torch.randn(shape, generator=g) for _ in range(model_count(method))]
    return tensors, base if method.accepts_base else None


def test_every_method_is_registered() -> None:
    assert {m.name for m in METHODS} == EXPECTED | BEYOND_MERGEKIT
    assert {m.name for m in METHODS if m.statistics} == {
        "regmean",
        "regmean_plusplus",
        "prodistill",
        "fisher",
    }
    assert {m.name for m in METHODS if m.sequential} == {"regmean_plusplus", "prodistill"}
    assert {m.name for m in METHODS if m.distill} == {"prodistill"}
    assert {m.name for m in METHODS if m.randomized} == {"dare_ties", "dare_linear", "della", "della_linear"}


@pytest.mark.parametrize("method", METHODS, ids=lambda m: m.name)
@pytest.mark.parametrize("shape", [(24, 16), (40,), (3, 4, 5)], ids=str)
def test_shape_dtype_and_inputs_untouched(method: MergeMethod, shape: tuple[int, ...]) -> None:
    tensors, base = inputs(method, shape)
    before = [t.clone() for t in tensors] + ([base.clone()] if base is not None else [])
    out = call(method.name, tensors, base, seed=0)
    assert out.shape == torch.Size(shape) and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    after = tensors + ([base] if base is not None else [])
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
    assert all(out.data_ptr() != t.data_ptr() for t in after)  # never an alias of an input


@pytest.mark.parametrize("method", METHODS, ids=lambda m: m.name)
def test_deterministic_given_a_seed(method: MergeMethod) -> None:
    tensors, base = inputs(method)
    first = call(method.name, tensors, base, seed=7, density=0.5) if method.randomized else None
    if first is None:
        assert torch.equal(call(method.name, tensors, base), call(method.name, tensors, base))
        return
    assert torch.equal(first, call(method.name, tensors, base, seed=7, density=0.5))
    assert not torch.equal(first, call(method.name, tensors, base, seed=8, density=0.5))


@pytest.mark.parametrize("name", GTA)
def test_zero_weight_gives_the_base(name: str) -> None:
    tensors, base = inputs(get_method(name))
    assert torch.equal(call(name, tensors, base, seed=0, weight=0.0, density=0.5), base)


@pytest.mark.parametrize("name", GTA)
def test_base_alone_gives_the_base(name: str) -> None:
    base = torch.randn(5, 6)
    out = call(name, [], base)
    assert torch.equal(out, base) and out.data_ptr() != base.data_ptr()


def test_linear_of_identical_tensors_is_that_tensor() -> None:
    x = torch.randn(30, 7)
    torch.testing.assert_close(call("linear", [x, x.clone(), x.clone()], weight=[0.2, 0.5, 1.3]), x)


def test_linear_without_normalize_is_the_weighted_sum() -> None:
    a, b = torch.randn(9), torch.randn(9)
    torch.testing.assert_close(call("linear", [a, b], weight=[2.0, -1.0], normalize=False), 2 * a - b)


def test_task_arithmetic_is_base_plus_scaled_deltas() -> None:
    tensors, base = inputs(get_method("task_arithmetic"))
    expected = base + 0.5 * sum(
        (w * (t - base) for w, t in zip([0.3, 0.6, -0.2], tensors, strict=True)), torch.zeros(1)
    )
    out = call("task_arithmetic", tensors, base, weight=[0.3, 0.6, -0.2], **{"lambda": 0.5})
    torch.testing.assert_close(out, expected)


def test_ties_with_full_density_and_one_model_is_base_plus_weighted_delta() -> None:
    x, base = torch.randn(50, 4), torch.randn(50, 4)
    out = call("ties", [x], base, weight=[0.7], density=1.0, normalize=False)
    assert torch.equal(out, (x - base) * 0.7 + base)
    # normalize divides by the weight of the agreeing model: the whole delta again
    torch.testing.assert_close(call("ties", [x], base, weight=[0.7], density=1.0), x)


def test_ties_drops_the_minority_sign() -> None:
    base = torch.zeros(3)
    a, b = torch.tensor([1.0, 1.0, -3.0]), torch.tensor([-2.0, 2.0, 1.0])
    out = call("ties", [a, b], base, weight=[1.0, 1.0], density=1.0, normalize=False)
    # sums: -1 (negative wins: keep -2), 3 (both), -2 (negative wins: keep -3)
    assert torch.equal(out, torch.tensor([-2.0, 3.0, -3.0]))


def test_slerp_ends_are_the_inputs() -> None:
    base, x = torch.randn(20, 3), torch.randn(20, 3)
    assert torch.equal(call("slerp", [x], base, t=0.0), base)
    assert torch.equal(call("slerp", [x], base, t=1.0), x)


def test_slerp_midpoint_keeps_the_norm_of_equal_norm_vectors() -> None:
    base, x = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    torch.testing.assert_close(call("slerp", [x], base, t=0.5), torch.tensor([2**-0.5, 2**-0.5]))


def test_nuslerp_weights_pick_an_end() -> None:
    a, b = torch.randn(6, 5), torch.randn(6, 5)
    torch.testing.assert_close(call("nuslerp", [a, b], weight=[1.0, 0.0]), a)
    torch.testing.assert_close(call("nuslerp", [a, b], weight=[0.0, 1.0], nuslerp_flatten=False), b)


@pytest.mark.parametrize("name", ["karcher", "multislerp", "model_stock"])
def test_identical_models_give_that_model(name: str) -> None:
    x = torch.randn(12, 8)
    base = torch.randn(12, 8) if get_method(name).requires_base else None
    torch.testing.assert_close(call(name, [x, x.clone(), x.clone()], base, lenient=True, weight=1.0), x)


def test_passthrough_scales() -> None:
    x = torch.randn(4, 4)
    assert torch.equal(call("passthrough", [x], scale=[2.0]), x * 2)


def test_sce_of_one_model_is_that_model() -> None:
    x, base = torch.randn(10, 10), torch.randn(10, 10)
    torch.testing.assert_close(call("sce", [x], base), x)


# ---- sparsification: exact counts and the random methods against their definitions


def test_magnitude_keeps_the_largest_fraction() -> None:
    delta = torch.randn(1000)
    kept = magnitude_(delta.clone(), 0.25)
    nonzero = kept != 0
    assert int(nonzero.sum()) == 250
    assert delta.abs()[nonzero].min() > delta.abs()[~nonzero].max()
    assert int((magnitude_(torch.randn(10), 0.01) != 0).sum()) == 1  # at least one survives


def test_breadcrumbs_cuts_outliers_and_small_values() -> None:
    delta = torch.randn(1000)
    kept = magnitude_outliers_(delta.clone(), 0.5, gamma=0.1) != 0
    order = delta.abs().argsort()
    assert int(kept.sum()) == 500
    assert kept[order[400:900]].all() and not kept[order[900:]].any() and not kept[order[:400]].any()


@pytest.mark.parametrize("size", [10, 1000, 20000])
@pytest.mark.parametrize("levels", [3, 50, None])
def test_fast_top_k_equals_mergekits_sort_even_with_ties(size: int, levels: int | None) -> None:
    g = torch.Generator().manual_seed(size)
    values = (
        torch.randn(size, generator=g).abs()
        if levels is None
        else torch.randint(0, levels, (size,), generator=g).float()
    )
    for k in (1, size // 3, size - 1):
        reference = torch.zeros(size, dtype=torch.bool)
        reference[torch.argsort(values, descending=True)[:k]] = True
        assert torch.equal(top_k_mask(values, k), reference)
        window = torch.zeros(size, dtype=torch.bool)
        window[torch.sort(values).indices[k // 2 : k // 2 + k]] = True
        assert torch.equal(window_mask(values, k // 2, k), window)


def test_dare_keeps_density_and_rescales_to_the_l1_norm() -> None:
    delta = torch.randn(200_000)
    g = torch.Generator().manual_seed(0)
    kept = bernoulli_(delta.clone(), 0.3, rescale=False, generator=g)
    nonzero = kept != 0
    assert abs(nonzero.float().mean().item() - 0.3) < 0.005
    assert torch.equal(kept[nonzero], delta[nonzero])
    rescaled = bernoulli_(delta.clone(), 0.3, rescale=True, generator=torch.Generator().manual_seed(0))
    assert torch.equal(rescaled != 0, nonzero)  # same seed, same mask
    torch.testing.assert_close(rescaled.abs().sum(), delta.abs().sum(), rtol=1e-5, atol=0)
    ratio = delta.abs().sum() / kept.abs().sum()
    torch.testing.assert_close(rescaled[nonzero], delta[nonzero] * ratio)


def test_della_probabilities_rise_with_magnitude_rank() -> None:
    magnitudes = torch.tensor([[0.3, 0.1, 0.2, 0.4, 0.0]])
    expected = torch.tensor([[0.55, 0.45, 0.5, 0.6, 0.4]])  # density 0.5 ± 0.1 linear in rank
    torch.testing.assert_close(della_probabilities(magnitudes, 0.5, 0.1), expected)


def test_della_keeps_density_overall_and_more_of_the_large_entries() -> None:
    delta = torch.randn(400, 500)
    kept = della_magprune_(
        delta.clone(), 0.4, epsilon=0.2, rescale=False, generator=torch.Generator().manual_seed(1)
    )
    nonzero = kept != 0
    assert abs(nonzero.float().mean().item() - 0.4) < 0.01
    ranks = delta.abs().argsort(dim=1).argsort(dim=1)  # (R, C) per row, as mergekit ranks
    top, bottom = nonzero[ranks >= 450].float().mean().item(), nonzero[ranks < 50].float().mean().item()
    assert abs(top - 0.59) < 0.02 and abs(bottom - 0.21) < 0.02


# ---- validation


@pytest.mark.parametrize("value", [0.0, -0.1, 1.5, float("nan")])
def test_density_outside_the_unit_interval_is_refused(value: float) -> None:
    with pytest.raises(ConfigError, match="density"):
        get_method("ties").param("density").validate(value, "models[0].parameters.density")


def test_density_one_is_allowed() -> None:
    assert get_method("dare_ties").param("density").validate(1, "x") == 1.0


def test_unknown_parameter_and_method_are_named() -> None:
    with pytest.raises(ConfigError, match=r"takes no parameter 'densty'.*density"):
        get_method("ties").param("densty")
    with pytest.raises(ConfigError, match="unknown method 'tie'"):
        get_method("tie")


def test_della_epsilon_too_wide_for_density_is_refused() -> None:
    tensors, base = inputs(get_method("della"))
    with pytest.raises(ConfigError, match="density ± epsilon"):
        call("della", tensors, base, seed=0, density=0.1, epsilon=0.15)


@pytest.mark.parametrize(
    ("name", "count", "match"),
    [
        ("slerp", 2, "exactly 1"),
        ("nuslerp", 3, "exactly 2"),
        ("model_stock", 1, "at least 2"),
        ("passthrough", 2, "exactly 1"),
    ],
)
def test_wrong_number_of_models_is_refused(name: str, count: int, match: str) -> None:
    tensors = [torch.randn(3) for _ in range(count)]
    with pytest.raises(ConfigError, match=match):
        call(name, tensors, torch.randn(3), lenient=True, weight=1.0)


def test_missing_base_mismatched_shapes_and_list_lengths_are_named() -> None:
    with pytest.raises(ConfigError, match="base_model"):
        call("ties", [torch.randn(3)], None)
    with pytest.raises(ConfigError, match=r"\(4,\).*\(3,\)"):
        call("ties", [torch.randn(4)], torch.randn(3))
    with pytest.raises(ConfigError, match="2 values for 3 models"):
        call("linear", [torch.randn(3)] * 3, weight=[1.0, 2.0])


def test_param_specs_declare_mergekits_names_and_defaults() -> None:
    ties = get_method("ties")
    assert (ties.param("normalize").default, ties.param("rescale").default) == (True, False)
    assert get_method("dare_ties").param("rescale").default is True
    assert get_method("della").param("epsilon").default == 0.15
    assert get_method("breadcrumbs").param("gamma").default == 0.01
    assert ties.param("weight").required and ties.param("weight").per_model
    assert not ties.param("lambda").per_model and ties.param("density").interval() == "(0, 1]"
    assert get_method("nuslerp").param("nuslerp_flatten").default is True
    assert get_method("karcher").param("max_iter").kind == "int"


@pytest.mark.parametrize("levels", [2, 7])
def test_stable_tie_break_keeps_the_lowest_indices_among_ties(levels: int) -> None:
    g = torch.Generator().manual_seed(levels)
    values = torch.randint(0, levels, (5000,), generator=g).float()
    for k in (1, 1234, 4999):
        reference = torch.zeros(5000, dtype=torch.bool)
        reference[torch.sort(values, descending=True, stable=True).indices[:k]] = True
        assert torch.equal(top_k_mask(values, k, "stable"), reference)
        window = torch.zeros(5000, dtype=torch.bool)
        window[torch.sort(values, stable=True).indices[k // 3 : k // 3 + k]] = True
        assert torch.equal(window_mask(values, k // 3, k, "stable"), window)


@pytest.mark.parametrize("size", [300_000, 1_000_003])
def test_kth_largest_is_exact_on_large_tensors(size: int) -> None:
    g = torch.Generator().manual_seed(size)
    for values in (torch.randn(size, generator=g).abs(), torch.randint(0, 9, (size,), generator=g).float()):
        for k in (1, size // 100, size // 2, size - 1):
            assert kth_largest(values, k) == torch.kthvalue(values, size - k + 1).values


def test_stable_tie_break_differs_from_mergekit_only_among_tied_magnitudes() -> None:
    base = torch.zeros(4000)
    g = torch.Generator().manual_seed(3)
    tensors = [0.01 * torch.randint(-4, 5, (4000,), generator=g).float() for _ in range(2)]
    exact = call("ties", tensors, base, weight=1.0, density=0.4)
    stable = get_method("ties").kernel(  # type: ignore[misc]
        tensors, base=base, generator=None, weight=[1.0, 1.0], density=[0.4, 0.4],
        normalize=True, rescale=False, lambda_=1.0, int8_mask=False, tie_break="stable",
    )  # fmt: skip
    assert (exact != stable).any()  # the tie is real and resolved differently
    at_threshold = torch.zeros(4000, dtype=torch.bool)
    for tensor in tensors:
        at_threshold |= tensor.abs() == kth_largest(tensor.abs(), 1600)
    assert not (exact != stable)[~at_threshold].any()  # ... and only where a magnitude ties the threshold


def test_replaying_the_sort_gives_torch_sorts_tie_order() -> None:
    """mergekit's choice among tied magnitudes is its sort's; the replay must reproduce it everywhere."""
    g = torch.Generator().manual_seed(11)
    for trial in range(300):
        size = int(torch.randint(1, 3000 if trial % 3 else 40, (1,), generator=g))
        levels = int(torch.randint(1, 25, (1,), generator=g))
        values = torch.randint(0, levels, (size,), generator=g).float()
        if trial % 5 == 0:
            values = torch.sort(values, descending=trial % 10 == 0).values  # presorted: the hard cases
        k = int(torch.randint(0, size + 1, (1,), generator=g))
        for descending in (True, False):
            reference = torch.zeros(size, dtype=torch.bool)
            reference[torch.sort(values, descending=descending).indices[:k]] = True
            assert torch.equal(sort_prefix_mask(values, k, descending), reference), (trial, size, k)


def test_replaying_the_sort_holds_on_a_large_bf16_like_tensor() -> None:
    values = (
        (torch.randn(300_000, generator=torch.Generator().manual_seed(0)) * 1e-3).bfloat16().float().abs()
    )
    for descending in (True, False):
        reference = torch.zeros(values.numel(), dtype=torch.bool)
        reference[torch.sort(values, descending=descending).indices[:123_457]] = True
        assert torch.equal(sort_prefix_mask(values, 123_457, descending), reference)


def test_task_arithmetic_kernel_accepts_the_yaml_spelling_of_lambda() -> None:
    x, base = torch.randn(6), torch.randn(6)
    kernel = get_method("task_arithmetic").kernel
    assert kernel is not None
    common = {"weight": [1.0], "density": [1.0], "normalize": False, "rescale": False, "int8_mask": False}
    yaml_spelling = kernel([x], base=base, generator=None, **common, **{"lambda": 0.5})
    assert torch.equal(yaml_spelling, kernel([x], base=base, generator=None, lambda_=0.5, **common))


@pytest.mark.parametrize("method", METHODS, ids=lambda m: m.name)
def test_inputs_that_require_grad_are_merged_without_autograd(method: MergeMethod) -> None:
    tensors, base = inputs(method)
    out = call(method.name, [t.requires_grad_() for t in tensors], base, seed=0)
    assert not out.requires_grad


# ---- nearswap, arcee_fusion, ram, ramplus_tl: their defining identities


def test_nearswap_takes_near_entries_whole_and_far_ones_in_part() -> None:
    base = torch.zeros(3)
    other = torch.tensor([0.01, 0.2, -0.4])
    out = call("nearswap", [other], base, t=0.1)
    # |gap| 0.01 <= t: swapped; 0.2: half way (t / gap = 0.5); 0.4: a quarter
    torch.testing.assert_close(out, torch.tensor([0.01, 0.1, -0.1]))
    assert torch.equal(call("nearswap", [other], base, t=0.0), base)
    assert torch.equal(call("nearswap", [other], base, t=10.0), other)


def test_nearswap_at_t_zero_is_the_base_in_float16_too() -> None:
    """mergekit gives NaN where float16 entries are equal at t = 0; the base is the value meant."""
    base = torch.randn(40).half()
    other = base.clone()
    other[:5] += 0.5
    out = call("nearswap", [other], base, t=0.0)
    assert torch.equal(out, base) and out.data_ptr() != base.data_ptr()


def test_arcee_fusion_takes_each_entry_from_one_model() -> None:
    tensors, base = inputs(get_method("arcee_fusion"))
    out = call("arcee_fusion", tensors, base)
    from_base, from_other = out == base, out == tensors[0]
    assert bool((from_base | from_other).all())
    assert 0 < int(from_other.sum()) < out.numel() // 4  # only outliers of importance move
    assert torch.equal(call("arcee_fusion", [base.clone()], base), base)


def test_arcee_fusion_threshold_is_median_plus_one_and_a_half_iqr() -> None:
    from evomerge.merge.methods.arcee_fusion import outlier_threshold

    scores = torch.arange(101.0).flip(0)  # ranks 25, 50, 75 of 0..100
    assert float(outlier_threshold(scores)) == 50 + 1.5 * (75 - 25)
    assert float(outlier_threshold(torch.arange(10.0))) == 4 + 1.5 * (6 - 2)  # floor(q * 9): 2, 4, 6


@pytest.mark.parametrize("name", ["arcee_fusion", "ramplus_tl"])
def test_half_inputs_give_float32_results_as_in_mergekit(name: str) -> None:
    method = get_method(name)
    tensors, base = inputs(method)
    assert base is not None
    out = call(name, [t.bfloat16() for t in tensors], base.bfloat16())
    assert out.dtype == torch.float32 == method.result_dtype(torch.bfloat16)
    assert method.result_dtype(torch.float64) == torch.float64
    assert get_method("ram").result_dtype(torch.bfloat16) == torch.bfloat16


def _sparse_changes() -> tuple[torch.Tensor, list[torch.Tensor]]:
    base = torch.zeros(6)
    a = torch.tensor([1.0, 0.0, 0.0, 2.0, 4.0, 0.0])
    b = torch.tensor([0.0, 3.0, 0.0, 4.0, 0.0, 0.0])
    return base, [a, b]


def test_ram_keeps_lone_changes_and_averages_shared_ones() -> None:
    base, (a, b) = _sparse_changes()
    out = call("ram", [a, b], base)
    assert torch.equal(out, torch.tensor([1.0, 3.0, 0.0, 3.0, 4.0, 0.0]))
    # a change of at most epsilon does not count: then b alone changed entry 3
    assert torch.equal(call("ram", [a, b], base, epsilon=2.5), torch.tensor([0.0, 3.0, 0.0, 4.0, 4.0, 0.0]))


def test_ramplus_tl_boosts_the_lone_changes_of_models_that_overlap() -> None:
    base, (a, b) = _sparse_changes()
    # a: 1 shared, 2 unique -> rho 0.5, clamped to alpha 0.2 -> lambda 1.02; b: 1 shared, 1 unique -> 1.02
    out = call("ramplus_tl", [a, b], base, r=0.1, alpha=0.2)
    expected = torch.tensor([1.0 * 1.02, 3.0 * 1.02, 0.0, 3.0, 4.0 * 1.02, 0.0])
    torch.testing.assert_close(out, expected)
    assert torch.equal(call("ramplus_tl", [a, b], base, r=0.0), call("ram", [a, b], base))
    assert torch.equal(call("ramplus_tl", [a], base), a)  # no overlap: no boost
