"""Sparsification of task vectors (deltas from the base), with mergekit 0.1.5's exact semantics.

Every function here with a trailing underscore works IN PLACE on a delta the caller owns (a temporary the
kernel made with `tensor - base`), because a 220M-parameter merge cannot afford a copy per step. None of
them is ever handed a source tensor.

Top-k selection follows mergekit exactly, including which of several equal magnitudes it keeps: mergekit
ranks with an (unstable) `torch.argsort`, so among ties at the threshold the choice is the sort's. The
threshold itself comes from `kth_largest` (a sampled bracket, then `kthvalue` on the few candidates); when
no tie straddles it (most float32 data; bf16 weights tie often) that alone gives mergekit's set. An ambiguous
threshold either falls back to the very sort mergekit runs (`tie_break="mergekit"`, the default, so the
two always agree) or keeps the lowest indices first in linear time (`tie_break="stable"`).
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable
from functools import cache
from typing import Any, Literal

import numpy as np
import torch

from evomerge.errors import ConfigError

SparsificationName = Literal["magnitude", "random", "magnitude_outliers", "della_magprune"]
TieBreak = Literal["mergekit", "stable"]

RESCALE_EPS = 1e-7  # below this L1 norm (before or after masking) mergekit does not rescale


def _work_magnitudes(delta: torch.Tensor) -> torch.Tensor:
    """|delta| flattened, in float32 on CPU as mergekit ranks them (bf16 magnitudes are upcast)."""
    magnitudes = delta.abs().reshape(-1)  # (N,)
    if magnitudes.device.type == "cpu" and magnitudes.dtype != torch.float32:
        magnitudes = magnitudes.float()
    return magnitudes


def _numpy_ready(values: torch.Tensor) -> bool:
    """CPU float32/float64 tensors can be viewed as numpy arrays without a copy."""
    cpu_float = values.device.type == "cpu" and values.dtype in (torch.float32, torch.float64)
    return cpu_float and not values.requires_grad


def _compare(
    values: torch.Tensor, op: Callable[[Any, Any], Any], threshold: torch.Tensor | float
) -> torch.Tensor:
    """`op(values, threshold)` as a bool tensor; numpy compares CPU floats several times faster."""
    if not _numpy_ready(values):
        return op(values, threshold)
    bound = threshold.numpy() if isinstance(threshold, torch.Tensor) else threshold
    return torch.from_numpy(op(values.numpy(), bound))


def _count(mask: torch.Tensor) -> int:
    """Number of True entries (numpy's count is several times faster than torch's on CPU)."""
    if mask.device.type == "cpu":
        return int(np.count_nonzero(mask.numpy()))
    return int(torch.count_nonzero(mask))


def kth_largest(values: torch.Tensor, k: int, sample_size: int = 65536) -> torch.Tensor:
    """The k-th largest entry (1-based) of a 1-D tensor, exactly, 2-3x faster than `torch.kthvalue`.

    A strided sample brackets the answer (about 4 sigma of the sampling error either side); one pass
    counts what lies above the bracket, and only the entries inside it are selected from. If the bracket
    misses (it cannot be wrong, only unlucky) the full selection answers. CPU work runs in numpy, whose
    comparisons and boolean selection are several times faster than torch's here.
    """
    n = values.numel()
    if n <= 4 * sample_size or not _numpy_ready(values):
        return torch.kthvalue(values, n - k + 1).values
    array = values.numpy()
    sample = np.sort(array[:: n // sample_size])  # (S,) ascending
    m = sample.size
    expected = k / n * m  # rank of the answer within the sample, from the top
    margin = 4 * (expected * (1 - k / n)) ** 0.5 + 16
    high = sample[m - max(1, int(expected - margin))]
    low = sample[m - min(m, int(expected + margin) + 1)]
    above = int(np.count_nonzero(array > high))
    band = np.extract((array >= low) & (array <= high), array)  # (B,) the candidates
    need = k - above
    if above >= k or band.size < need:
        return torch.kthvalue(values, n - k + 1).values
    return torch.tensor(np.partition(band, band.size - need)[band.size - need], dtype=values.dtype)


def _first_by_index(tied: torch.Tensor, skip: int, take: int) -> torch.Tensor:
    """Among the True entries of `tied`, in index order, the ones numbered [skip, skip + take)."""
    chosen = torch.zeros_like(tied)
    chosen[tied.nonzero().squeeze(1)[skip : skip + take]] = True
    return chosen


# ---- mergekit's tie order without its sort ------------------------------------------------------------
#
# torch's CPU sort of one float row is libstdc++'s std::sort (introsort: median-of-three pivot moved to the
# front, Hoare partition, insertion sort of blocks of <= 16). Which tied entries end up in the first k
# positions is decided only by the partitions of the segments that contain position k, so replaying those
# partitions (vectorised, ~log n of them, each on a shrinking segment) gives mergekit's set exactly at a
# fraction of the cost of the sort. `_replay_verified` checks the replay against torch.sort once per
# process and otherwise leaves the real sort in charge.

_INSERTION_BLOCK = 16


def _median_of_three(values: np.ndarray, descending: bool) -> int:
    """Index std::__move_median_to_first picks among positions 1, n // 2 and n - 1."""
    a, b, c = 1, values.size // 2, values.size - 1
    va, vb, vc = (values[a], values[b], values[c]) if descending else (-values[a], -values[b], -values[c])
    if va > vb:
        return b if vb > vc else (c if va > vc else a)
    if va > vc:
        return a
    return c if vb > vc else b


def _first_crossed(left: np.ndarray, right: np.ndarray) -> int:
    """The first i with left[i] >= right[i] (left stops rise, right stops fall), by bisection: no
    difference array over the whole segment."""
    low, high = 0, min(left.size, right.size)
    while low < high:
        middle = (low + high) // 2
        if left[middle] >= right[middle]:
            high = middle
        else:
            low = middle + 1
    return low


_CHUNKS = 64


def _stops_near_cut(left_hits: np.ndarray, right_hits: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """Left stops (rising) and right stops (falling), and the first pair that crosses.

    Only left stops below the crossing and right stops above it matter, so on a long segment per-chunk
    counts locate it first and only the two halves are listed. The lists are then prefixes of the full
    ones; a crossing found inside both is the full lists' crossing, anything else lists everything.
    """
    n = left_hits.size
    if n >= 16 * 4096:
        size = -(-n // _CHUNKS)
        below = np.cumsum([np.count_nonzero(left_hits[i : i + size]) for i in range(0, n, size)])
        above = np.cumsum([np.count_nonzero(right_hits[i : i + size]) for i in range(0, n, size)][::-1])[::-1]
        chunk = int(
            np.argmax(below >= above)
        )  # left stops below its end outnumber right stops from its start
        low, high = max(0, (chunk - 1) * size), min(n, (chunk + 2) * size)
        left = np.flatnonzero(left_hits[:high])
        right = (np.flatnonzero(right_hits[low:]) + low)[::-1]
        swaps = _first_crossed(left, right)
        if swaps < min(left.size, right.size):
            return left, right, swaps
    left, right = np.flatnonzero(left_hits), np.flatnonzero(right_hits)[::-1]
    return left, right, _first_crossed(left, right)


def _partition(values: np.ndarray, descending: bool) -> tuple[int, np.ndarray, np.ndarray]:
    """std::__unguarded_partition of values[1:] around values[0]: (cut, left swap positions, right ones).

    The left scan stops at entries not ordered before the pivot, the right scan at entries the pivot is
    not ordered before; the i-th stops swap while they have not crossed. Every left position lies below
    the cut and every right one at or above it.
    """
    rest, pivot = values[1:], values[0]
    left_hits, right_hits = (rest <= pivot, rest >= pivot) if descending else (rest >= pivot, rest <= pivot)
    left, right, swaps = _stops_near_cut(left_hits, right_hits)
    if swaps < left.size:
        cut = int(left[swaps]) if swaps == 0 else min(int(left[swaps]), int(right[swaps - 1]))
    else:
        cut = int(right[swaps - 1])
    return cut + 1, left[:swaps] + 1, right[:swaps] + 1


def _head_ties(
    values: np.ndarray, index: np.ndarray, cut: int, swap: tuple[np.ndarray, np.ndarray], boundary: float
) -> np.ndarray:
    """Indices of the entries equal to `boundary` in values[:cut] once the swaps are done, read before
    doing them (the head is dropped, so it is never written): the tied entries that stay, and the tied
    entries that the right positions send over."""
    left, right = swap
    staying = values[:cut] == boundary
    staying[left] = False
    arriving = right[values[right] == boundary]
    return np.concatenate((index[:cut][staying], index[arriving]))


def _tied_in_prefix(keys: np.ndarray, k: int, descending: bool, boundary: float) -> np.ndarray | None:
    """Indices of the entries equal to `boundary` (the k-th in sort order) that std::sort puts at
    positions [0, k); None where it would fall back to heap sort. Entries ordered strictly before the
    boundary are in whatever the ties do, so only tied entries are ever collected. Each partition's swaps
    are written only into the side the replay goes on with (a gather and a scatter, not a full swap)."""
    chosen = []
    values, offset = keys.copy(), 0
    index = np.arange(keys.size, dtype=np.int32 if keys.size < 2**31 else np.int64)
    depth = 2 * math.floor(math.log2(max(keys.size, 1)))
    while values.size > _INSERTION_BLOCK and offset < k < offset + values.size:
        if depth == 0:
            return None
        depth -= 1
        pick = _median_of_three(values, descending)
        values[[0, pick]], index[[0, pick]] = values[[pick, 0]], index[[pick, 0]]
        cut, left, right = _partition(values, descending)
        if offset + cut <= k:  # the left part is all in; carry on in the right part
            chosen.append(_head_ties(values, index, cut, (left, right), boundary))
            values[right], index[right] = values[left], index[left]
            values, index, offset = values[cut:], index[cut:], offset + cut
        else:
            values[left], index[left] = values[right], index[right]
            values, index = values[:cut], index[:cut]
    if offset < k:  # the last block is insertion-sorted, which is stable
        order = np.argsort(-values if descending else values, kind="stable")[: k - offset]
        chosen.append(index[order][values[order] == boundary])
    return np.concatenate(chosen) if chosen else np.zeros(0, dtype=np.int64)


@cache
def _replay_verified() -> bool:
    """Does replaying std::sort reproduce this torch build's sort? Checked once on tie-heavy data."""
    keys = torch.randint(0, 7, (3001,), generator=torch.Generator().manual_seed(0)).float()
    for descending in (True, False):
        order = torch.sort(keys, descending=descending).indices
        for k in (1, 700, 1500, 2999):
            expected = torch.zeros(keys.numel(), dtype=torch.bool)
            expected[order[:k]] = True
            replayed = _replayed_prefix(keys, k, descending)
            if replayed is None or not torch.equal(replayed, expected):
                return False
    return True


def _replayed_prefix(
    values: torch.Tensor, k: int, descending: bool, boundary: torch.Tensor | None = None
) -> torch.Tensor | None:
    if boundary is None:  # the k-th entry in sort order
        boundary = kth_largest(values, k if descending else values.numel() - k + 1)
    tied = _tied_in_prefix(values.numpy(), k, descending, float(boundary))
    if tied is None:
        return None
    mask = _compare(values, operator.gt if descending else operator.lt, boundary)
    mask[torch.from_numpy(tied).long()] = True
    return mask


def _may_hold_nan(values: torch.Tensor) -> bool:
    """A NaN makes the sum NaN (so does +inf meeting -inf: then the real sort runs, still exact), in one
    pass without the bool temporary `isnan(values).any()` builds."""
    return bool(torch.isnan(values.sum()))


def sort_prefix_mask(
    values: torch.Tensor, k: int, descending: bool, boundary: torch.Tensor | None = None
) -> torch.Tensor:
    """Mask of the entries `torch.sort(values, descending=...)` puts first k, ties exactly as it does.

    `boundary`, if known, is the k-th entry in that order (saves finding it again)."""
    n = values.numel()
    if k <= 0 or k >= n:
        return torch.full((n,), k > 0, dtype=torch.bool, device=values.device)
    mask = None
    if _numpy_ready(values) and not _may_hold_nan(values) and _replay_verified():
        mask = _replayed_prefix(values, k, descending, boundary)
    if mask is None:
        mask = torch.zeros(n, dtype=torch.bool, device=values.device)
        mask[torch.sort(values, descending=descending).indices[:k]] = True
    return mask


def top_k_mask(magnitudes: torch.Tensor, k: int, tie_break: TieBreak = "mergekit") -> torch.Tensor:
    """Bool mask of the k largest entries of a 1-D tensor.

    Entries equal to the k-th largest that do not all fit are chosen as mergekit's argsort chooses them
    (`tie_break="mergekit"`, replaying its sort, see `sort_prefix_mask`) or lowest index first
    (`"stable"`, linear time).
    """
    n = magnitudes.numel()
    if k >= n:
        return torch.ones(n, dtype=torch.bool, device=magnitudes.device)
    threshold = kth_largest(magnitudes, k)
    mask = _compare(magnitudes, operator.ge, threshold)
    if _count(mask) == k:  # no tie straddles the threshold: any top-k agrees
        return mask
    if tie_break == "stable":
        above = _compare(magnitudes, operator.gt, threshold)
        tied = _compare(magnitudes, operator.eq, threshold)
        return above | _first_by_index(tied, 0, k - _count(above))
    return sort_prefix_mask(magnitudes, k, descending=True, boundary=threshold)


def window_mask(
    magnitudes: torch.Tensor, start: int, count: int, tie_break: TieBreak = "mergekit"
) -> torch.Tensor:
    """Bool mask of the entries at ascending-sorted positions [start, start + count), as mergekit picks them
    (ties at either edge: see `top_k_mask`)."""
    n = magnitudes.numel()
    count = min(count, n - start)  # a window past the end is cut there, as slicing a sort would
    if count <= 0:
        return torch.zeros(n, dtype=torch.bool, device=magnitudes.device)
    low = kth_largest(magnitudes, n - start)  # the (start+1)-th smallest
    high = kth_largest(magnitudes, n - start - count + 1)  # the (start+count)-th smallest
    mask = (magnitudes >= low) & (magnitudes <= high)
    if int(torch.count_nonzero(mask)) == count:  # both edges fall between distinct values
        return mask
    if tie_break == "stable":
        return _stable_window(magnitudes, start, count, low, high)
    return _sorted_upto(magnitudes, start + count, high) & ~_sorted_upto(magnitudes, start, None)


def _sorted_upto(magnitudes: torch.Tensor, end: int, edge: torch.Tensor | None) -> torch.Tensor:
    """The first `end` entries of mergekit's ascending sort; `edge` (the end-th smallest, if known)
    spares the replay when no tie straddles it."""
    if edge is not None:
        upto = _compare(magnitudes, operator.le, edge)
        if _count(upto) == end:
            return upto
    return sort_prefix_mask(magnitudes, end, descending=False, boundary=edge)


def _stable_window(
    magnitudes: torch.Tensor, start: int, count: int, low: torch.Tensor, high: torch.Tensor
) -> torch.Tensor:
    """The window of a stable ascending sort: tied entries take consecutive positions in index order."""
    mask = (magnitudes > low) & (magnitudes < high)
    for edge in (low,) if bool(low == high) else (low, high):
        below = int(torch.count_nonzero(magnitudes < edge))  # sorted position of the first tied entry
        skip = max(0, start - below)
        mask |= _first_by_index(magnitudes == edge, skip, start + count - below - skip)
    return mask


def rescale_l1_(masked: torch.Tensor, l1_before: torch.Tensor) -> torch.Tensor:
    """Scale `masked` so its L1 norm equals the unmasked delta's (mergekit's rescale, not DARE's 1/p)."""
    l1_after = masked.abs().sum()
    if l1_before < RESCALE_EPS or l1_after < RESCALE_EPS:
        return masked
    return masked.mul_(l1_before / l1_after)


def _as_factor(keep: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The mask as 0/1 bytes for a floating delta: the product is the same (both promote to the delta's
    dtype) and torch multiplies by uint8 several times faster than by bool."""
    return keep.view(torch.uint8) if dtype.is_floating_point and keep.dtype == torch.bool else keep


def _apply_mask_(delta: torch.Tensor, keep: torch.Tensor, rescale: bool) -> torch.Tensor:
    """delta *= keep (multiplying, like mergekit, so dropped entries become signed zeros), then rescale."""
    l1_before = delta.abs().sum() if rescale else None
    delta.mul_(_as_factor(keep, delta.dtype).reshape(delta.shape))
    if l1_before is not None:
        rescale_l1_(delta, l1_before)
    return delta


def magnitude_(
    delta: torch.Tensor, density: float, *, rescale: bool = False, tie_break: TieBreak = "mergekit"
) -> torch.Tensor:
    """TIES trimming: keep the `max(1, int(density * N))` largest magnitudes, zero the rest."""
    if density >= 1:
        return delta
    if density <= 0 or delta.numel() == 0:
        return delta.zero_()
    k = max(1, int(density * delta.numel()))
    return _apply_mask_(delta, top_k_mask(_work_magnitudes(delta), k, tie_break), rescale)


def magnitude_outliers_(
    delta: torch.Tensor,
    density: float,
    *,
    gamma: float = 0.01,
    rescale: bool = False,
    tie_break: TieBreak = "mergekit",
) -> torch.Tensor:
    """Model Breadcrumbs: drop the `int(gamma * N)` largest magnitudes, then the smallest, to keep
    `int(density * N)` entries. When density + gamma > 1 mergekit shrinks the outlier cut, not density."""
    if density >= 1:
        return delta
    n = delta.numel()
    keep_count, top_count = int(density * n), int(gamma * n)
    bottom_count = max(0, n - keep_count - top_count)
    keep = window_mask(_work_magnitudes(delta), bottom_count, keep_count, tie_break)
    return _apply_mask_(delta, keep, rescale)


def bernoulli_(
    delta: torch.Tensor, density: float, *, rescale: bool = True, generator: torch.Generator | None = None
) -> torch.Tensor:
    """DARE: keep each entry independently with probability `density`.

    mergekit's rescale matches the L1 norm of the kept entries to the full delta's (the paper multiplies
    by 1/density); with rescale off the kept entries are left as they are.
    """
    if density >= 1:
        return delta
    keep = torch.rand(delta.shape, generator=generator, device=delta.device) < density
    return _apply_mask_(delta, keep, rescale)


def della_probabilities(magnitudes: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """Keep probabilities rising linearly with magnitude rank within each row: density ± epsilon.

    `magnitudes` is (R, C); rank 0 (smallest) gets density - epsilon, rank C-1 gets density + epsilon.
    A single-column row (where mergekit divides 0 by 0) gets exactly `density`.
    """
    rows, cols = magnitudes.shape
    order = torch.argsort(magnitudes, dim=1)  # (R, C) column of the j-th smallest
    ranks = torch.empty(rows, cols, dtype=torch.float32, device=magnitudes.device)
    positions = torch.arange(cols, dtype=torch.float32, device=magnitudes.device).expand(rows, cols)
    ranks.scatter_(1, order, positions)  # (R, C) rank of each entry, 0 = smallest
    rank_norm = ranks.div_(cols - 1) if cols > 1 else ranks.fill_(0.5)
    return rank_norm.mul_(2 * epsilon).add_(density - epsilon)


def check_della(density: float, epsilon: float, where: str = "della") -> None:
    """mergekit refuses density ± epsilon outside (0, 1) (only when density < 1, where it is used)."""
    if 0 < density < 1 and (density + epsilon >= 1 or density - epsilon <= 0):
        raise ConfigError(
            f"{where}: density ± epsilon must lie inside (0, 1), got density={density}, "
            f"epsilon={epsilon}; lower epsilon below min(density, 1 - density)."
        )


def della_magprune_(
    delta: torch.Tensor,
    density: float,
    *,
    epsilon: float = 0.15,
    rescale: bool = True,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """DELLA MagPrune: Bernoulli drop with per-entry probabilities from magnitude rank within each row.

    mergekit ranks along axis 1 (the input features of a 2-D weight; a 1-D tensor is one row) and
    rescales by the L1 norm, not by 1/p_i per entry as the paper does.
    """
    if density >= 1:
        return delta
    if density <= 0:
        return delta.zero_()
    check_della(density, epsilon)
    matrix = delta if delta.dim() >= 2 else delta.reshape(1, -1)
    magnitudes = matrix.abs().float().movedim(1, -1)  # (..., C): mergekit ranks along axis 1
    rows = magnitudes.reshape(-1, magnitudes.shape[-1])  # (R, C)
    probabilities = della_probabilities(rows, density, epsilon).reshape(magnitudes.shape).movedim(-1, 1)
    keep = torch.rand(probabilities.shape, generator=generator, device=delta.device) < probabilities
    return _apply_mask_(delta, keep, rescale)


def sparsify_(
    delta: torch.Tensor,
    method: SparsificationName,
    *,
    density: float,
    rescale: bool,
    gamma: float = 0.01,
    epsilon: float = 0.15,
    generator: torch.Generator | None = None,
    tie_break: TieBreak = "mergekit",
) -> torch.Tensor:
    """Dispatch to one sparsifier by mergekit's name for it."""
    if method == "magnitude":
        return magnitude_(delta, density, rescale=rescale, tie_break=tie_break)
    if method == "magnitude_outliers":
        return magnitude_outliers_(delta, density, gamma=gamma, rescale=rescale, tie_break=tie_break)
    if method == "random":
        return bernoulli_(delta, density, rescale=rescale, generator=generator)
    return della_magprune_(delta, density, epsilon=epsilon, rescale=rescale, generator=generator)
