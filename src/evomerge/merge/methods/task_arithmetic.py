"""The task-arithmetic family (mergekit's "generalized task arithmetic"): one kernel, eight methods.

    delta_i = sparsify(x_i - base)                       # TIES trim, DARE drop, Breadcrumbs, DELLA
    delta_i *= w_i
    mask_i  = sign(delta_i) == sign(sum_j delta_j)       # TIES sign election, only with consensus
    merged  = sum_i mask_i delta_i  [/ sum_i mask_i w_i if normalize]
    out     = base + lambda * merged

Differences from the papers, all mergekit's and kept: the sign is elected on the *weighted* (and
already sparsified) deltas, by the sign of their sum; `normalize` divides by the sum of the weights of the
models that agree with the elected sign at each entry; DARE/DELLA `rescale` matches the L1 norm of the
delta instead of multiplying by 1/p.

Work is done in the inputs' dtype (mergekit computes in the base's dtype), on temporaries this module
owns, updated in place, so peak memory is the deltas plus three scratch tensors. Sums over models of
half/bfloat16 deltas accumulate in float32 and round once, which is what torch does for mergekit's
stacked `(M, ...).sum(dim=0)`, so the results agree to the bit without building the stack.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from evomerge.merge.methods._common import (
    as_kernel,
    check_models,
    check_per_model,
    density_spec,
    flag_spec,
    require_base,
    weight_spec,
)
from evomerge.merge.registry import KernelFn, MergeMethod, ParamSpec, register
from evomerge.merge.sparsify import (
    SparsificationName,
    TieBreak,
    check_della,
    magnitude_keep,
    sparsify_,
)
from evomerge.merge.task_vectors import BoundTaskVectors


def _sparse_deltas(
    method: str,
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor,
    sparsification: SparsificationName | None,
    generator: torch.Generator | None,
    per_model: dict[str, list[float]],
    rescale: bool,
    tie_break: TieBreak,
    defer_trim: bool = False,
    task_vectors: BoundTaskVectors | None = None,
) -> tuple[list[torch.Tensor], list[torch.Tensor | None], list[bool]]:
    """sparsify(x_i - base), each a fresh tensor owned by the caller (not yet weighted), and the TIES
    keep masks left to the caller (`defer_trim`, where the weight is 1: mergekit masks before weighting).

    `task_vectors` (the in-memory loop's cache, see merge/task_vectors.py) supplies the raw deltas and the
    deterministically sparsified ones computed for an earlier candidate; those that need no further
    writing are the cache's own tensors, flagged in the third list (shared: the caller must not write to
    them). The result is the same bits."""
    deltas: list[torch.Tensor] = []
    keeps: list[torch.Tensor | None] = []
    shared: list[bool] = []
    for index, tensor in enumerate(tensors):
        density = per_model["density"][index]
        extra = {key: values[index] for key, values in per_model.items() if key in ("gamma", "epsilon")}
        if sparsification == "della_magprune":
            check_della(density, extra["epsilon"], f"{method} (model {index})")
        if task_vectors is not None and sparsification in _DETERMINISTIC and 0 < density < 1:
            # trimmed once per (tensor, model, density, ...): the weights do not change it
            params = (sparsification, density, rescale, tie_break, *sorted(extra.items()))
            delta = task_vectors.sparse(
                index,
                params,
                _trimmer(
                    task_vectors, index, tensor, base, sparsification, density, rescale, tie_break, extra
                ),
                copy=False,
            )
            deltas.append(delta)
            keeps.append(None)
            shared.append(True)
            continue
        written = sparsification is not None and density < 1  # sparsified in place below
        if task_vectors is not None and not written:  # read as it is: no subtraction, no copy
            delta, keep = task_vectors.delta(index, _difference(tensor, base), copy=False), None
        else:  # a random drop writes to it: a copy of a cached delta would cost what this does
            delta, keep = tensor - base, None
        if defer_trim and 0 < density < 1 and delta.numel() > 0 and per_model["weight"][index] == 1:
            keep = magnitude_keep(delta, density, tie_break)
        elif sparsification is not None:
            sparsify_(
                delta, sparsification, density=density, rescale=rescale, generator=generator,
                tie_break=tie_break, **extra,
            )  # fmt: skip
        deltas.append(delta)
        keeps.append(keep)
        shared.append(task_vectors is not None and not written)
    return deltas, keeps, shared


_DETERMINISTIC = ("magnitude", "magnitude_outliers")  # sparsifiers that draw nothing: cacheable results


def _difference(tensor: torch.Tensor, base: torch.Tensor) -> Callable[[], torch.Tensor]:
    return lambda: tensor - base


def _trimmer(
    task_vectors: BoundTaskVectors,
    index: int,
    tensor: torch.Tensor,
    base: torch.Tensor,
    sparsification: SparsificationName,
    density: float,
    rescale: bool,
    tie_break: TieBreak,
    extra: dict[str, float],
) -> Callable[[], torch.Tensor]:
    """Computes the sparsified delta from the (cached) raw one, as the uncached path does in place."""

    def trim() -> torch.Tensor:
        delta = task_vectors.delta(index, _difference(tensor, base))
        return sparsify_(
            delta,
            sparsification,
            density=density,
            rescale=rescale,
            generator=None,
            tie_break=tie_break,
            **extra,
        )

    return trim


def _accumulator(dtype: torch.dtype) -> torch.dtype:
    """torch sums half and bfloat16 tensors in float32 and rounds once; so do we, without stacking."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _as_stored(weights: list[float], dtype: torch.dtype) -> list[float]:
    """The weights as mergekit holds them: a tensor of the work dtype (0.3 becomes 0.30078125 in bf16)."""
    return torch.tensor(weights, dtype=dtype).tolist()


def _plain_sum(
    deltas: list[torch.Tensor], weights: list[float], normalize: bool, shared: list[bool] | None = None
) -> torch.Tensor:
    """sum_i w_i delta_i, divided by sum_i w_i (summed in the deltas' dtype, ~0 -> 1) when normalizing.

    `shared` deltas (the task-vector cache's) are read, not written: the same products, out of place."""
    dtype = deltas[0].dtype
    stored = _as_stored(weights, dtype)
    shared = shared or [False] * len(deltas)
    first = torch.mul(deltas[0], stored[0]) if shared[0] else deltas[0].mul_(stored[0])
    merged = first.to(_accumulator(dtype))  # no copy for float32
    for delta, weight, read_only in zip(deltas[1:], stored[1:], shared[1:], strict=True):
        merged.add_(torch.mul(delta, weight) if read_only else delta.mul_(weight))
    merged = merged.to(dtype)
    if normalize:
        divisor = torch.tensor(weights, dtype=dtype, device=merged.device).reshape(-1, 1).sum(dim=0)
        divisor[divisor.abs() < 1e-8] = 1
        merged.div_(divisor)
    return merged


def _elected_signs(weighted: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """+1 where sum_i delta_i >= 0 (the sum rounded to the work dtype, as mergekit's is), else -1."""
    total = weighted[0].clone()
    for delta in weighted[1:]:
        total.add_(delta)
    if total.dtype != dtype:  # round as mergekit's sum is rounded; the sign test is exact either way
        total = total.to(dtype).to(total.dtype)
    if total.device.type == "cpu":  # numpy's compare and select beat torch's bool round trip
        signs = np.greater_equal(total.numpy(), 0).astype(total.numpy().dtype)  # 1 or 0
        return torch.from_numpy(np.subtract(np.add(signs, signs, out=signs), 1, out=signs))
    return total.ge(0).to(total.dtype).mul_(2).sub_(1)


def _disjoint_sum(
    weighted: list[torch.Tensor], elected: torch.Tensor, stored: list[float], normalize: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """sum_i mask_i delta_i and sum_i mask_i w_i, mask_i = 1 where w_i delta_i has the elected sign."""
    divisor = torch.zeros_like(elected) if normalize else None
    agree = torch.empty_like(elected)
    merged = torch.zeros_like(elected)
    for delta, weight in zip(weighted, stored, strict=True):
        torch.mul(delta, elected, out=agree).gt_(0)  # 1 where sign(delta) == elected sign; 0 never agrees
        merged.add_(delta.mul_(agree))
        if divisor is not None:
            divisor.add_(agree, alpha=weight)
    return merged, divisor


def _blockwise(tensor: torch.Tensor) -> bool:
    """Does the consensus sum of such tensors run block by block (`_disjoint_mean_chunked`)?"""
    return tensor.device.type == "cpu" and _accumulator(tensor.dtype) in (torch.float32, torch.float64)


def _consensus_sum(
    deltas: list[torch.Tensor],
    weights: list[float],
    normalize: bool,
    keeps: list[torch.Tensor | None] | None = None,
    shared: list[bool] | None = None,
) -> torch.Tensor:
    """TIES disjoint merge: keep each entry's weighted deltas that agree in sign with their sum; add them.

    `keeps` are trimming masks not yet applied (only where the blocks apply them, and the weight is 1).
    `shared` deltas (the task-vector cache's) are read, not written: the same products, out of place;
    the blocks copy what they overwrite, and elsewhere a shared delta of weight 1 is copied."""
    dtype, accumulator = deltas[0].dtype, _accumulator(deltas[0].dtype)
    stored = _as_stored(weights, dtype)
    shared = shared or [False] * len(deltas)
    # w_i delta_i rounded in the work dtype (times 1 is exact: skipped)
    weighted = [
        delta if weight == 1 else torch.mul(delta, weight) if read_only else delta.mul_(weight)
        for delta, weight, read_only in zip(deltas, stored, shared, strict=True)
    ]
    still_shared = [read_only and weight == 1 for read_only, weight in zip(shared, stored, strict=True)]
    del deltas[:]
    if _blockwise(weighted[0]):
        return _disjoint_mean_chunked(weighted, stored, normalize, keeps=keeps)
    assert keeps is None or all(keep is None for keep in keeps)  # deferred only to the blocks
    exact = [  # held exactly in the accumulator dtype (the disjoint sum writes to them)
        delta.to(accumulator, copy=read_only) for delta, read_only in zip(weighted, still_shared, strict=True)
    ]
    merged, divisor = _disjoint_sum(exact, _elected_signs(exact, dtype), stored, normalize)
    return _divided_(merged.to(dtype), None if divisor is None else divisor.to(dtype))


def _divided_(merged: torch.Tensor, divisor: torch.Tensor | None) -> torch.Tensor:
    """merged / divisor where the divisor (the agreeing weights' sum, in the work dtype) is nonzero."""
    if divisor is None:
        return merged
    return merged.div_(divisor.masked_fill_(divisor == 0, 1))


_CHUNK = 1 << 17  # entries per block of the CPU disjoint merge: its float32 scratch stays in cache


def _disjoint_mean_chunked(
    weighted: list[torch.Tensor],
    stored: list[float],
    normalize: bool,
    chunk: int = _CHUNK,
    keeps: list[torch.Tensor | None] | None = None,
) -> torch.Tensor:
    """Sign election, disjoint sum and (if normalizing) division on CPU, block by block.

    Every entry depends only on the same entry of each delta, so blocks of `chunk` entries go through the
    whole computation (upcast, sum, sign, agreement, sums, rounding, division) while their scratch is in
    cache, and no float32 copy of a whole tensor is made. The operations per entry are those of
    `_elected_signs`, `_disjoint_sum` and `_divided_` (IEEE arithmetic in the same order), so the bits
    are too. `keeps` (bool (N,) or None per delta) are trimming masks applied to the upcast blocks: the
    same products (x * 1 or x * 0, exact) as multiplying the whole delta first, one pass less over it.
    """
    dtype, shape = weighted[0].dtype, weighted[0].shape
    flat = [delta.reshape(-1) for delta in weighted]  # (N,) each
    masks = [None if keep is None else keep.reshape(-1).numpy() for keep in keeps or [None] * len(flat)]
    n = flat[0].numel()
    merged_out = torch.empty(n, dtype=dtype)
    scratch = _ChunkScratch(len(flat), min(n, chunk), _accumulator(dtype))
    rounded = torch.empty(min(n, chunk), dtype=dtype)  # the divisor in the work dtype, as mergekit's
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        values = scratch.upcast([delta[start:stop] for delta in flat])
        for upcast, mask in zip(values, masks, strict=True):
            if mask is not None:
                np.multiply(upcast, mask[start:stop], out=upcast)
        merged, divisor = scratch.disjoint(values, stored, normalize)
        block = merged_out[start:stop].copy_(torch.from_numpy(merged))  # rounds to dtype, as mergekit's sum
        if divisor is not None:  # a sum of weights is 0 exactly when its rounding to dtype is: `_divided_`
            np.copyto(divisor, 1, where=divisor == 0)
            block.div_(rounded[: stop - start].copy_(torch.from_numpy(divisor)))
    return merged_out.reshape(shape)


class _ChunkScratch:
    """Reused per-block buffers of `_disjoint_mean_chunked` (a fresh array per block would page-fault)."""

    def __init__(self, models: int, size: int, accumulator: torch.dtype) -> None:
        self.upcasts = [torch.empty(size, dtype=accumulator) for _ in range(models)]
        numpy_dtype = self.upcasts[0].numpy().dtype
        self.total, self.signs, self.product, self.merged, self.divisor = (
            np.empty(size, dtype=numpy_dtype) for _ in range(5)
        )
        self.agree = np.empty(size, dtype=bool)

    def upcast(self, blocks: list[torch.Tensor]) -> list[np.ndarray]:
        """The blocks in the accumulator dtype (exact); float32/float64 blocks are copied too, because
        the disjoint sum overwrites them."""
        return [
            buffer[: block.numel()].copy_(block).numpy()
            for buffer, block in zip(self.upcasts, blocks, strict=True)
        ]

    def disjoint(
        self, values: list[np.ndarray], stored: list[float], normalize: bool
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """sum_i mask_i v_i and sum_i mask_i w_i over one block, mask_i = [v_i has the elected sign]."""
        m = values[0].size
        total, signs, product = self.total[:m], self.signs[:m], self.product[:m]
        merged, agree = self.merged[:m], self.agree[:m]
        np.copyto(total, values[0])
        for block in values[1:]:  # summed in model order, as torch sums the stacked deltas
            np.add(total, block, out=total)
        # elected sign +1 where the sum is >= 0, else -1. mergekit tests the sum rounded to the work
        # dtype; rounding a sum of bf16/f16 values to their dtype keeps its sign and never makes a nonzero
        # sum zero (it is a multiple of their smallest subnormal), so the unrounded sum gives the same signs
        np.greater_equal(total, 0, out=agree)
        np.subtract(np.multiply(agree, 2, out=signs), 1, out=signs)
        divisor = self.divisor[:m] if normalize else None
        merged.fill(0)
        if divisor is not None:
            divisor.fill(0)
        for block, weight in zip(values, stored, strict=True):
            np.greater(np.multiply(block, signs, out=product), 0, out=agree)  # zero never agrees
            np.add(merged, np.multiply(block, agree, out=block), out=merged)  # times 0 or 1, as mergekit
            if divisor is not None:  # w * 1 and w * 0 are exact, as in torch's add with alpha
                np.add(
                    divisor, agree if weight == 1 else np.multiply(agree, weight, out=product), out=divisor
                )
        return merged, divisor


def generalized_task_arithmetic(
    tensors: Sequence[torch.Tensor],
    *,
    base: torch.Tensor | None,
    method: str,
    sparsification: SparsificationName | None,
    consensus: bool,
    generator: torch.Generator | None,
    weight: Sequence[float],
    density: Sequence[float],
    normalize: bool,
    rescale: bool,
    lambda_: float,
    gamma: Sequence[float] | None = None,
    epsilon: Sequence[float] | None = None,
    tie_break: TieBreak = "mergekit",
    task_vectors: BoundTaskVectors | None = None,
) -> torch.Tensor:
    """The shared kernel; see the module docstring for the equations.

    `tie_break` is not a mergekit parameter: how equal magnitudes at the TIES / Breadcrumbs threshold are
    chosen. "mergekit" reproduces mergekit's choice exactly (by replaying its sort, only when such a tie
    exists); "stable" keeps the lowest indices first in linear time. The engine may pass it; configs
    cannot. Nor can they pass `task_vectors`, the in-memory loop's task-vector cache for this tensor.
    """
    base = require_base(method, base)
    check_models(method, tensors, base)
    if not tensors:
        return base.clone()
    count = len(tensors)
    named = {"weight": weight, "density": density, "gamma": gamma, "epsilon": epsilon}
    per_model = {k: check_per_model(method, k, v, count) for k, v in named.items() if v is not None}
    defer_trim = consensus and sparsification == "magnitude" and not rescale and _blockwise(base)
    deltas, keeps, shared = _sparse_deltas(
        method, tensors, base, sparsification, generator, per_model, rescale, tie_break, defer_trim,
        task_vectors,
    )  # fmt: skip
    if consensus:
        merged = _consensus_sum(deltas, per_model["weight"], normalize, keeps, shared)
    else:
        merged = _plain_sum(deltas, per_model["weight"], normalize, shared)
    if lambda_ != 1:
        merged.mul_(lambda_)
    return merged.add_(base)


def _kernel(method: str, sparsification: SparsificationName | None, consensus: bool) -> KernelFn:
    def kernel(
        tensors: Sequence[torch.Tensor],
        *,
        base: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        int8_mask: bool = False,  # mergekit's memory option for the sign mask; no effect on the result
        **params: Any,
    ) -> torch.Tensor:
        if "lambda" in params:  # accept the YAML spelling too, passed as **{"lambda": ...}
            params["lambda_"] = params.pop("lambda")
        return generalized_task_arithmetic(
            tensors, base=base, method=method, sparsification=sparsification, consensus=consensus,
            generator=generator, **params,
        )  # fmt: skip

    kernel.__name__ = kernel.__qualname__ = method
    kernel.__doc__ = (
        f"mergekit's `{method}`: generalized task arithmetic with {sparsification or 'no'} sparsification."
    )
    return kernel


def _params(
    sparsification: SparsificationName | None, normalize: bool, rescale: bool
) -> tuple[ParamSpec, ...]:
    params = [
        weight_spec("scale of this model's task vector"),
        density_spec(),
        flag_spec("normalize", normalize, "divide by the sum of the (agreeing) weights"),
        flag_spec("rescale", rescale, "after dropping, restore the delta's L1 norm"),
        ParamSpec("lambda", default=1.0, per_model=False, description="scale of the merged task vector"),
        flag_spec("int8_mask", False, "mergekit's memory option; accepted and ignored"),
    ]
    if sparsification == "magnitude_outliers":
        params.append(ParamSpec("gamma", default=0.01, low=0.0, high=1.0, description="largest fraction cut"))
    if sparsification == "della_magprune":
        params.append(
            ParamSpec("epsilon", default=0.15, low=0.0, high=1.0, high_open=True, description="p spread")
        )
    return tuple(params)


_FAMILY: tuple[tuple[str, SparsificationName | None, bool, bool, bool, str], ...] = (
    # name, sparsification, consensus, normalize default, rescale default, description
    ("task_arithmetic", None, False, False, False, "base + sum of weighted task vectors"),
    ("ties", "magnitude", True, True, False, "TIES: trim by magnitude, elect sign, disjoint mean"),
    ("dare_ties", "random", True, False, True, "DARE random drop + TIES sign election"),
    ("dare_linear", "random", False, False, True, "DARE random drop, plain weighted sum"),
    ("breadcrumbs", "magnitude_outliers", False, False, False, "drop smallest and largest outliers"),
    ("breadcrumbs_ties", "magnitude_outliers", True, False, False, "Breadcrumbs + TIES sign election"),
    ("della", "della_magprune", True, True, True, "DELLA: rank-based random drop + sign election"),
    ("della_linear", "della_magprune", False, False, True, "DELLA drop, plain weighted sum"),
)

for _name, _sparse, _consensus, _normalize, _rescale, _about in _FAMILY:
    register(
        MergeMethod(
            name=_name,
            kernel=as_kernel(_kernel(_name, _sparse, _consensus)),
            params=_params(_sparse, _normalize, _rescale),
            requires_base=True,
            accepts_base=True,
            min_models=0,  # mergekit accepts the base alone and returns it
            randomized=_sparse in ("random", "della_magprune"),
            description=_about,
            options=("tie_break", "task_vectors"),
        )
    )
