"""Every kernel against mergekit 0.1.5's own tensor-level implementation (`merge_tensors`).

Tolerance: none. Deterministic methods must give mergekit's tensor bit for bit (`torch.equal`), in float32
and in bfloat16 (where mergekit computes in bf16), including magnitude ties at the TIES / Breadcrumbs
threshold, where mergekit's choice comes from its unstable sort. Random methods are compared with
mergekit's sparsifiers through their definition: the kept fraction and the L1 rescale.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch

from .test_methods import call

mergekit_methods = pytest.importorskip("mergekit.merge_methods", reason="needs the 'oracle' extra (mergekit)")
mergekit_sparsify = pytest.importorskip("mergekit.sparsify")

pytestmark = pytest.mark.oracle

W3 = [0.3, 0.55, 0.9]
CASES: list[tuple[str, int, bool, dict[str, Any]]] = [
    # name, non-base models, base given, parameters
    ("linear", 3, False, {"weight": W3}),
    ("linear", 3, False, {"weight": [0.3, -0.5, 0.9], "normalize": False}),
    ("task_arithmetic", 3, True, {"weight": W3}),
    ("task_arithmetic", 3, True, {"weight": W3, "normalize": True, "lambda": 0.7}),
    ("ties", 3, True, {"weight": W3, "density": [0.5, 0.3, 0.7]}),
    (
        "ties",
        3,
        True,
        {"weight": [0.3, -0.5, 0.9], "density": [0.5, 0.3, 0.7], "rescale": True, "normalize": False},
    ),
    ("ties", 2, True, {"weight": [1.0, 1.0], "density": [0.2, 0.2], "lambda": 1.3}),
    ("breadcrumbs", 3, True, {"weight": W3, "density": [0.5, 0.3, 0.7], "gamma": [0.01, 0.1, 0.4]}),
    ("breadcrumbs_ties", 3, True, {"weight": W3, "density": [0.5, 0.9, 0.7], "gamma": [0.01, 0.1, 0.2]}),
    ("breadcrumbs_ties", 2, True, {"weight": [1.0, 0.5], "density": [0.8, 0.8], "normalize": True}),
    ("slerp", 1, True, {"t": 0.3}),
    ("slerp", 1, True, {"t": 0.85}),
    ("nuslerp", 2, True, {"weight": [0.3, 0.6]}),
    ("nuslerp", 2, False, {"weight": [0.3, 0.6], "nuslerp_flatten": False}),
    ("nuslerp", 2, False, {"weight": [0.3, 0.6], "nuslerp_flatten": False, "nuslerp_row_wise": True}),
    ("multislerp", 3, False, {"weight": [0.3, 0.6, 0.2]}),
    ("multislerp", 3, True, {"weight": [0.3, 0.6, 0.2], "normalize_weights": False}),
    ("karcher", 3, False, {}),
    ("karcher", 2, False, {"max_iter": 3, "tol": 1e-3}),
    ("model_stock", 3, True, {}),
    ("model_stock", 3, True, {"filter_wise": True}),
    ("sce", 3, True, {}),
    ("sce", 3, True, {"select_topk": 0.3}),
    ("passthrough", 1, False, {"scale": [0.5]}),
    ("nearswap", 1, True, {"t": 0.05}),
    ("nearswap", 1, True, {"t": 0.003}),
    ("arcee_fusion", 1, True, {}),
    ("ram", 3, True, {}),
    ("ram", 2, True, {"epsilon": 0.02}),
    ("ramplus_tl", 3, True, {}),
    ("ramplus_tl", 3, True, {"r": 0.5, "alpha": 0.9, "epsilon": 0.01}),
]


@pytest.fixture(autouse=True)
def _reproducible_draws() -> Iterator[None]:
    """Tests that draw from torch's global generator draw the same numbers every run (and leave it be)."""
    with torch.random.fork_rng():
        torch.manual_seed(1234)
        yield


def family(
    shape: tuple[int, ...], count: int, dtype: torch.dtype, tied: bool, seed: int = 0
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """A base and fine-tunes; `tied` makes deltas from a few levels so magnitudes tie at every threshold."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    if tied:
        deltas = [0.01 * torch.randint(-6, 7, shape, generator=g).float() for _ in range(count)]
    else:
        deltas = [0.1 * torch.randn(shape, generator=g) for _ in range(count)]
    return base.to(dtype), [(base + d).to(dtype) for d in deltas]


def mergekit_result(
    name: str, tensors: list[torch.Tensor], base: torch.Tensor | None, params: dict[str, Any]
) -> torch.Tensor:
    if base is None:
        return mergekit_methods.merge_tensors(tensors, name, parameters=params)
    return mergekit_methods.merge_tensors([base, *tensors], name, parameters=params, base_index=0)


@pytest.mark.parametrize(
    ("name", "count", "with_base", "params"), CASES, ids=lambda v: v if isinstance(v, str) else None
)
@pytest.mark.parametrize(
    ("dtype", "shape", "tied"),
    [
        (torch.float32, (48, 40), False),
        (torch.float32, (3, 5, 40), True),
        (torch.bfloat16, (64, 36), False),
        (torch.bfloat16, (300,), True),
        (torch.float16, (40, 30), True),
        (torch.float64, (20, 30), False),
    ],
    ids=["fp32", "fp32-ties-3d", "bf16", "bf16-ties-1d", "fp16-ties", "fp64"],
)
def test_equal_to_mergekit(
    name: str,
    count: int,
    with_base: bool,
    params: dict[str, Any],
    dtype: torch.dtype,
    shape: tuple[int, ...],
    tied: bool,
) -> None:
    base, tensors = family(shape, count, dtype, tied)
    given_base = base if with_base else None
    try:
        expected = mergekit_result(name, tensors, given_base, params)
    except ValueError:  # mergekit finds the inputs degenerate (e.g. multislerp of cancelling vectors)
        with pytest.raises(ValueError):
            call(name, tensors, given_base, **params)
        return
    out = call(name, tensors, given_base, **params)
    assert out.dtype == expected.dtype
    assert torch.equal(out, expected), f"max abs diff {(out.float() - expected.float()).abs().max().item()}"


@pytest.mark.parametrize("name", ["slerp", "nuslerp", "multislerp", "ties"])
def test_equal_to_mergekit_beyond_one_reduction_chunk(name: str) -> None:
    """> 2**20 entries: slerp's norms and dots are summed per chunk of 2**20, as in mergekit."""
    base, tensors = family((1030, 1024), 2 if name != "slerp" else 1, torch.float32, tied=False)
    params: dict[str, Any] = {"t": 0.4} if name == "slerp" else {"weight": [0.4, 0.7]}
    if name == "ties":
        params["density"] = [0.4, 0.6]
    assert torch.equal(call(name, tensors, base, **params), mergekit_result(name, tensors, base, params))


def test_every_parameter_and_default_matches_mergekit() -> None:
    from evomerge.merge.registry import all_methods

    from .test_methods import BEYOND_MERGEKIT

    for method in all_methods():
        if method.name in BEYOND_MERGEKIT:  # evomerge's own: no mergekit method to match
            with pytest.raises(RuntimeError, match="Unimplemented"):
                mergekit_methods.get(method.name)
            continue
        theirs = {p.name: p for p in mergekit_methods.get(method.name).spec.parameters}
        assert {p.name for p in method.params} == set(theirs), method.name
        for spec in method.params:
            default = theirs[spec.name].default
            if spec.name == "scale":  # mergekit's None (no scaling) is our 1.0
                assert default is None and spec.default == 1.0
            elif theirs[spec.name].required:
                assert spec.required, f"{method.name}.{spec.name}"
            else:
                assert spec.default == default, f"{method.name}.{spec.name}"


# ---- random sparsifiers: same definition as mergekit's, checked statistically


@pytest.mark.parametrize("density", [0.1, 0.5, 0.9])
def test_dare_kept_fraction_and_rescale_match_mergekit(density: float) -> None:
    delta = torch.randn(300, 400, generator=torch.Generator().manual_seed(1))
    with torch.random.fork_rng():  # mergekit draws from the global generator; leave it as it was
        torch.manual_seed(0)
        theirs = mergekit_sparsify.bernoulli(delta, density, rescale_norm=mergekit_sparsify.RescaleNorm.l1)
    ours = call("dare_linear", [delta], torch.zeros_like(delta), seed=0, weight=1.0, density=density)
    for result in (ours, theirs):
        assert abs((result != 0).float().mean().item() - density) < 0.01
        torch.testing.assert_close(result.abs().sum(), delta.abs().sum(), rtol=1e-5, atol=0)
        kept = result != 0
        ratio = result[kept] / delta[kept]  # one common factor: the L1 ratio
        torch.testing.assert_close(ratio, torch.full_like(ratio, ratio[0].item()))


def test_della_kept_fraction_by_rank_matches_mergekit() -> None:
    delta = torch.randn(500, 400, generator=torch.Generator().manual_seed(2))
    with torch.random.fork_rng():
        torch.manual_seed(0)
        theirs = mergekit_sparsify.della_magprune(delta, 0.5, 0.2, rescale_norm=None) != 0
    ours = (
        call(
            "della_linear",
            [delta],
            torch.zeros_like(delta),
            seed=0,
            weight=1.0,
            density=0.5,
            epsilon=0.2,
            rescale=False,
        )
        != 0
    )
    ranks = delta.abs().argsort(dim=1).argsort(dim=1)
    for band in [(0, 40), (180, 220), (360, 400)]:
        in_band = (ranks >= band[0]) & (ranks < band[1])
        expected = 0.3 + 0.4 * (sum(band) / 2 - 0.5) / 399  # density - eps + 2 eps * rank / (C - 1)
        for kept in (ours, theirs):
            assert abs(kept[in_band].float().mean().item() - expected) < 0.02


@pytest.mark.parametrize("name", ["ties", "breadcrumbs", "breadcrumbs_ties"])
def test_equal_to_mergekit_on_a_large_tied_bf16_tensor(name: str) -> None:
    """Past the sampled-threshold and sort-replay size limits, with thousands of tied magnitudes."""
    g = torch.Generator().manual_seed(5)
    base32 = 0.02 * torch.randn(600, 1024, generator=g)
    tensors = [(base32 + 0.002 * torch.randn(600, 1024, generator=g)).bfloat16() for _ in range(3)]
    params: dict[str, Any] = {"weight": [0.5, 0.3, 0.2], "density": [0.5, 0.3, 0.7]}
    if name != "ties":
        params["gamma"] = [0.01, 0.05, 0.1]
    base = base32.bfloat16()
    assert torch.equal(call(name, tensors, base, **params), mergekit_result(name, tensors, base, params))


def _sparse_family(
    shape: tuple[int, ...], count: int, dtype: torch.dtype, seed: int = 3
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Fine-tunes that each change ~40% of the entries (as RL fine-tunes do), overlapping by chance."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    changes = [
        0.1 * torch.randn(shape, generator=g) * (torch.rand(shape, generator=g) < 0.4) for _ in range(count)
    ]
    return base.to(dtype), [(base + change).to(dtype) for change in changes]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize(
    ("name", "count", "params"),
    [
        ("ram", 3, {}),
        ("ram", 4, {"epsilon": 0.05}),
        ("ramplus_tl", 3, {}),
        ("ramplus_tl", 4, {"r": 0.7, "alpha": 2.0, "epsilon": 0.01}),
        ("ramplus_tl", 2, {"r": 0.3, "alpha": 0.5, "epsilon": 0.0}),
        ("nearswap", 1, {"t": 0.01}),
        ("arcee_fusion", 1, {}),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_equal_to_mergekit_on_sparse_changes(
    name: str, count: int, params: dict[str, Any], dtype: torch.dtype
) -> None:
    """Entries changed by no model, one model or several: every branch of RAM's rule, in every dtype."""
    base, tensors = _sparse_family((64, 48), count, dtype)
    expected = mergekit_result(name, tensors, base, params)
    out = call(name, tensors, base, **params)
    assert out.dtype == expected.dtype
    assert torch.equal(out, expected), f"max abs diff {(out.double() - expected.double()).abs().max().item()}"


def test_nearswap_at_t_zero_in_float16_differs_from_mergekit_only_where_it_gives_nan() -> None:
    base, tensors = _sparse_family((40, 30), 1, torch.float16)
    expected = mergekit_result("nearswap", tensors, base, {"t": 0.0})
    out = call("nearswap", tensors, base, t=0.0)
    nan = expected.isnan()
    assert bool(nan.any()) and torch.equal(out[~nan], expected[~nan]) and torch.equal(out, base)


def test_arcee_fusion_beyond_mergekit_sample_size_uses_exact_quartiles() -> None:
    """mergekit samples 10^6 entries (unseeded) past that size; we take every entry: a few boundary
    entries differ, and ours is the rule applied exactly."""
    from evomerge.merge.methods.arcee_fusion import importance

    g = torch.Generator().manual_seed(4)
    base = torch.randn(1030, 1000, generator=g)
    other = base + 0.01 * torch.randn(1030, 1000, generator=g)
    out = call("arcee_fusion", [other], base)
    scores = importance(other, base).reshape(-1)
    ranked = scores.sort().values
    n = ranked.numel() - 1
    threshold = ranked[n // 2] + 1.5 * (ranked[3 * n // 4] - ranked[n // 4])
    assert torch.equal(out, torch.where((scores >= threshold).reshape(base.shape), other, base))
    theirs = mergekit_result("arcee_fusion", [other], base, {})
    assert float((out != theirs).float().mean()) < 0.01
