"""Sparsification of task vectors (deltas from the base), with mergekit 0.1.5's exact semantics.

Every function here with a trailing underscore works IN PLACE on a delta the caller owns (a temporary the
kernel made with `tensor - base`), because a 220M-parameter merge cannot afford a copy per step. None of
them is ever handed a source tensor.

Top-k selection follows mergekit exactly, including which of several equal magnitudes it keeps: mergekit
ranks with an (unstable) `torch.argsort`, so among ties at the threshold the choice is the sort's. The
threshold itself comes from `kth_largest` (a sampled bracket, then `kthvalue` on the few candidates), or for
bfloat16 on CPU from a histogram of the magnitudes' 2^15 possible bit patterns (`key_threshold`, one pass,
exact); when no tie straddles it (most float32 data; bf16 weights tie often) that alone gives mergekit's
set. An ambiguous threshold is resolved by replaying mergekit's sort on the tied entries' side only
(`tie_break="mergekit"`, the default, so the two always agree; the real sort runs where the replay cannot
answer) or keeps the lowest indices first in linear time (`tie_break="stable"`).
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from itertools import pairwise
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


@dataclass(frozen=True)
class _Stops:
    """The stops of both scans around their crossing: left[j] is left stop number left_rank + j (rising
    positions), right[j] right stop number right_rank + j (falling positions)."""

    left: np.ndarray
    right: np.ndarray
    left_rank: int = 0
    right_rank: int = 0

    def crossing(self) -> int | None:
        """The number of swaps (the first rank whose stops cross), or None if it is not inside the lists."""
        low = max(self.left_rank, self.right_rank)
        high = min(self.left_rank + self.left.size, self.right_rank + self.right.size)
        if low > high:
            return None
        left = self.left[low - self.left_rank : high - self.left_rank]
        right = self.right[low - self.right_rank : high - self.right_rank]
        step = _first_crossed(left, right)
        full = self.left_rank == 0 and self.right_rank == 0
        return low + step if full or 0 < step < left.size else None

    def left_at(self, rank: int) -> int:
        """Left stop number `rank`; -1 where the list ends before it."""
        j = rank - self.left_rank
        return int(self.left[j]) if j < self.left.size else -1

    def right_at(self, rank: int) -> int:
        return int(self.right[rank - self.right_rank])


def _stops_near_cut(left_hits: np.ndarray, right_hits: np.ndarray) -> tuple[_Stops, int]:
    """Left stops (rising) and right stops (falling) around their crossing, and the number of swaps.

    On a long segment per-chunk counts locate the crossing first and only the stops of the three chunks
    around it are listed (with their ranks, from the counts); if the crossing is not among them, every
    stop is listed.
    """
    n = left_hits.size
    if n >= 16 * 4096:
        size = -(-n // _CHUNKS)
        below = [np.count_nonzero(left_hits[i : i + size]) for i in range(0, n, size)]
        above = [np.count_nonzero(right_hits[i : i + size]) for i in range(0, n, size)]
        # the first chunk whose left stops up to its end outnumber the right stops from its start
        chunk = int(np.argmax(np.cumsum(below) >= np.cumsum(above[::-1])[::-1]))
        first, last = max(0, chunk - 1), min(len(below), chunk + 2)
        low, high = first * size, min(n, last * size)
        left, right = (
            np.flatnonzero(left_hits[low:high]) + low,
            (np.flatnonzero(right_hits[low:high]) + low)[::-1],
        )
        stops = _Stops(left, right, int(sum(below[:first])), int(sum(above[last:])))
        swaps = stops.crossing()
        if swaps is not None:
            return stops, swaps
    stops = _Stops(np.flatnonzero(left_hits), np.flatnonzero(right_hits)[::-1])
    swaps = stops.crossing()
    assert swaps is not None  # full lists always hold the crossing
    return stops, swaps


@dataclass(frozen=True)
class _Partition:
    """One std::__unguarded_partition of a segment of n = `size`, as boolean masks: the left part is
    values[:cut]; the swapped left stops are `left_swapped` over values[1 : 1 + left_swapped.size], the
    swapped right stops `right_swapped` over values[n - right_swapped.size :], paired first with last."""

    size: int
    cut: int
    left_swapped: np.ndarray
    right_swapped: np.ndarray


def _partition(values: np.ndarray, descending: bool) -> _Partition:
    """std::__unguarded_partition of values[1:] around values[0], without listing every swap.

    The left scan stops at entries not ordered before the pivot, the right scan at entries the pivot is
    not ordered before; the i-th stops swap while they have not crossed. Every left position lies below
    the cut and every right one at or above it.
    """
    rest, pivot = values[1:], values[0]
    left_hits, right_hits = (rest <= pivot, rest >= pivot) if descending else (rest >= pivot, rest <= pivot)
    stops, swaps = _stops_near_cut(left_hits, right_hits)
    if swaps == 0:
        return _Partition(values.size, stops.left_at(0) + 1, left_hits[:0], right_hits[:0])
    last_left, last_right, next_left = (
        stops.left_at(swaps - 1),
        stops.right_at(swaps - 1),
        stops.left_at(swaps),
    )
    cut = min(next_left, last_right) if next_left >= 0 else last_right
    return _Partition(values.size, cut + 1, left_hits[: last_left + 1], right_hits[last_right:])


_SWAP_BLOCK = 1 << 18  # positions per block of `_swap_into`: its index lists stay small and in cache


def _swap_into(values: np.ndarray, part: _Partition, right_side: bool) -> tuple[np.ndarray, np.ndarray]:
    """Carry out the partition's swaps on the side the replay goes on with (the other is dropped).

    Returns the positions written (rising) and the values sent to them in source order (rising source
    positions; the i-th source goes to the i-th target from the end). Gathers use `np.compress` and the
    scatter index lists: numpy's boolean-mask indexing is several times slower on masks this irregular.
    Both go block by block, so no list of a quarter of the segment's positions is ever allocated.
    """
    n = values.size
    left_swapped, right_swapped = part.left_swapped, part.right_swapped
    lefts, rights = values[1 : 1 + left_swapped.size], values[n - right_swapped.size :]
    source, source_mask = (lefts, left_swapped) if right_side else (rights, right_swapped)
    target, target_mask = (rights, right_swapped) if right_side else (lefts, left_swapped)
    sent = np.compress(source_mask, source)
    incoming = sent[::-1].copy()  # a reversed view as the scatter's source would make it 2x slower
    targets = [np.zeros(0, dtype=np.intp)]
    done = 0
    for start in range(0, target_mask.size, _SWAP_BLOCK):
        block = np.flatnonzero(target_mask[start : start + _SWAP_BLOCK])  # (B,) rising, within the block
        target[start : start + _SWAP_BLOCK][block] = incoming[done : done + block.size]
        done += block.size
        targets.append(block + (start + (n - target.size if right_side else 1)))
    return np.concatenate(targets), sent


@dataclass(frozen=True)
class _Tied:
    """The entries equal to the boundary in the current segment: positions there (rising) and indices in
    the input. Only they need tracking (everything else is in or out whatever its index), so the replay
    moves 2-byte keys, not keys plus an index per entry."""

    boundary: float
    position: np.ndarray  # (T,) rising
    index: np.ndarray  # (T,)

    @staticmethod
    def of(values: np.ndarray, boundary: float) -> _Tied:
        position = np.flatnonzero(values == boundary)
        return _Tied(boundary, position, position)

    def moved_to(self, position: np.ndarray, index: np.ndarray) -> _Tied:
        """The same entries at new positions (kept rising; timsort merges a few rising runs in one pass)."""
        order = np.argsort(position, kind="stable")
        return _Tied(self.boundary, position[order], index[order])

    def joined(self, pieces: list[tuple[np.ndarray, np.ndarray]]) -> _Tied:
        """Entries from (rising positions, indices) pieces; sorted only where the pieces interleave."""
        position = np.concatenate([piece for piece, _ in pieces])
        index = np.concatenate([piece for _, piece in pieces])
        ends = [(piece[0], piece[-1]) for piece, _ in pieces if piece.size]
        if all(last < first for (_, last), (first, _) in pairwise(ends)):
            return _Tied(self.boundary, position, index)
        return self.moved_to(position, index)

    def exchanged(self, a: int, b: int) -> _Tied:
        """After the entries at positions a and b trade places (mostly neither is tied: nothing to do)."""
        slots = np.searchsorted(self.position, (a, b))
        found = [
            int(slot)
            for slot, at in zip(slots, (a, b), strict=True)
            if slot < self.position.size and self.position[slot] == at
        ]
        if len(found) == 1:
            position = np.where(self.position == a, b, np.where(self.position == b, a, self.position))
            return self.moved_to(position, self.index)
        if len(found) == 2:  # both tied: the positions stay, the indices trade
            index = self.index.copy()
            index[found] = index[found[::-1]]
            return _Tied(self.boundary, self.position, index)
        return self


def _follow_ties(
    tied: _Tied,
    part: _Partition,
    moved: tuple[np.ndarray, np.ndarray],
    right_side: bool,
    stops: tuple[bool, bool],
) -> tuple[_Tied, np.ndarray]:
    """The tied entries of the side the replay goes on with, renumbered from its start, and (going right)
    the indices of those the head keeps: the ones staying there and the ones the right stops send over.

    `stops` says whether tied entries are left stops and right stops (which depends only on how the
    boundary compares with the pivot), so the swapped ones are ranges of the rising positions: found by
    bisection, no mask lookups. `moved` is `_swap_into`'s answer; the tied entries among the sent values
    come in the same rising source order as the tied sources, which pairs them up.
    """
    targets, sent = moved
    position, index = tied.position, tied.index
    n_left, first_right = part.left_swapped.size, part.size - part.right_swapped.size
    head_end = int(np.searchsorted(position, part.cut))
    left_from, left_to = np.searchsorted(position, (1, n_left + 1)) if stops[0] else (0, 0)
    right_from = int(np.searchsorted(position, first_right)) if stops[1] else position.size
    # the j-th sent entry (rising source) lands on the j-th target from the end; listed rising here
    arrived = targets[targets.size - 1 - np.flatnonzero(sent == tied.boundary)[::-1]]
    if right_side:
        assert arrived.size == left_to - left_from
        head = np.concatenate((index[:left_from], index[left_to:head_end], index[right_from:]))
        staying = (position[head_end:right_from] - part.cut, index[head_end:right_from])
        return tied.joined([staying, (arrived - part.cut, index[left_from:left_to][::-1])]), head
    assert arrived.size == position.size - right_from
    pieces = [
        (position[:left_from], index[:left_from]),
        (arrived, index[right_from:][::-1]),
        (position[left_to:head_end], index[left_to:head_end]),
    ]
    return tied.joined(pieces), index[:0]


def _tied_in_prefix(keys: np.ndarray, k: int, descending: bool, boundary: float) -> np.ndarray | None:
    """Indices of the entries equal to `boundary` (the k-th in sort order) that std::sort puts at
    positions [0, k); None where it would fall back to heap sort. Entries ordered strictly before the
    boundary are in whatever the ties do, so only tied entries are ever followed (`_Tied`). Each
    partition's swaps are written only into the side the replay goes on with."""
    chosen = []
    values, offset = keys.copy(), 0
    tied = _Tied.of(values, boundary)
    depth = 2 * math.floor(math.log2(max(keys.size, 1)))
    while values.size > _INSERTION_BLOCK and offset < k < offset + values.size:
        if depth == 0:
            return None
        depth -= 1
        pick = _median_of_three(values, descending)
        values[[0, pick]] = values[[pick, 0]]
        tied = tied.exchanged(0, pick)
        part = _partition(values, descending)
        right_side = offset + part.cut <= k  # the left part is all in; carry on in the right part
        pivot = values[0]
        stops = (
            (boundary <= pivot, boundary >= pivot) if descending else (boundary >= pivot, boundary <= pivot)
        )
        moved = _swap_into(values, part, right_side)
        tied, head = _follow_ties(tied, part, moved, right_side, stops)
        chosen.append(head)
        if right_side:
            values, offset = values[part.cut :], offset + part.cut
        else:
            values = values[: part.cut]
    if offset < k:  # the last block is insertion-sorted, which is stable
        order = np.argsort(-values if descending else values, kind="stable")[: k - offset]
        first = order[values[order] == boundary]
        chosen.append(tied.index[np.searchsorted(tied.position, first)])
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


# ---- bfloat16 magnitudes as int16 keys ---------------------------------------------------------------
#
# The bit pattern of a non-negative bfloat16, read as int16, orders exactly as the value does (and as its
# float32 upcast, which mergekit sorts). |x| is the pattern with the sign bit cleared, so the keys take at
# most 2^15 values: counting them finds the k-th largest and its ties in one pass, and the sort replay
# compares 2-byte keys instead of 4-byte floats. Patterns above +inf's are NaN.

_KEY_COUNT = 1 << 15
_INF_KEY = 0x7F80


def bf16_magnitude_keys(delta: torch.Tensor) -> np.ndarray | None:
    """|delta| flattened as int16 keys (see above), or None unless delta is a CPU bfloat16 tensor."""
    if delta.dtype != torch.bfloat16 or delta.device.type != "cpu" or delta.requires_grad:
        return None
    return np.bitwise_and(delta.reshape(-1).view(torch.int16).numpy(), 0x7FFF)  # (N,)


def key_threshold(keys: np.ndarray, k: int) -> tuple[int, int, int] | None:
    """(t, above, tied): the k-th largest key, how many keys exceed it and how many equal it, exactly,
    from a histogram of all 2^15 keys; None where a NaN key (above +inf) is present."""
    counts = torch.bincount(torch.from_numpy(keys), minlength=_KEY_COUNT).numpy()  # (2^15,)
    return threshold_of_counts(counts, k)


def threshold_of_counts(counts: np.ndarray, k: int) -> tuple[int, int, int] | None:
    """`key_threshold` from the histogram (2^15,) of the keys, e.g. one gathered block by block."""
    if counts[_INF_KEY + 1 :].any():
        return None
    at_least = np.cumsum(counts[::-1])  # at_least[j]: keys >= 2^15 - 1 - j
    j = int(np.searchsorted(at_least, k))  # the first j with at_least[j] >= k
    threshold = _KEY_COUNT - 1 - j
    return threshold, int(at_least[j - 1]) if j else 0, int(counts[threshold])


def top_k_keys(keys: np.ndarray, k: int, tie_break: TieBreak = "mergekit") -> np.ndarray | None:
    """`top_k_mask` on int16 magnitude keys (bool, (N,)); None where it cannot answer (NaN, or this torch
    build's sort is not the one the replay models), so the caller falls back to the float32 path."""
    found = key_threshold(keys, k)
    if found is None:
        return None
    threshold, above, tied = found
    if above + tied == k:  # no tie straddles the threshold
        return np.greater_equal(keys, threshold)
    if tie_break == "stable":
        chosen: np.ndarray | None = np.flatnonzero(keys == threshold)[: k - above]
    else:
        chosen = _tied_in_prefix(keys, k, True, threshold) if _replay_verified() else None
    if chosen is None:
        return None
    keep = np.greater(keys, threshold)
    keep[chosen] = True
    return keep


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
    return _apply_mask_(delta, magnitude_keep(delta, density, tie_break), rescale)


def magnitude_keep(delta: torch.Tensor, density: float, tie_break: TieBreak = "mergekit") -> torch.Tensor:
    """The bool mask (N,) of the entries TIES trimming keeps (0 < density < 1, N > 0), for a caller
    that applies it later (the block-wise disjoint mean folds it into its own pass over the delta)."""
    return _top_k_of(delta, max(1, int(density * delta.numel())), tie_break)


def _top_k_of(delta: torch.Tensor, k: int, tie_break: TieBreak) -> torch.Tensor:
    """Mask of delta's k largest magnitudes: from int16 keys for bfloat16 on CPU, else from float32."""
    keys = bf16_magnitude_keys(delta) if k < delta.numel() else None
    keep = top_k_keys(keys, k, tie_break) if keys is not None else None
    if keep is not None:
        return torch.from_numpy(keep)
    return top_k_mask(_work_magnitudes(delta), k, tie_break)


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


def _uniform(shape: torch.Size, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """U[0, 1) draws from a CPU generator, moved to `device`: a seed gives the same mask on every device,
    so a recipe evolved on a GPU rebuilds bit for bit in a CPU merge to disk (and a CPU generator could
    not draw on a GPU anyway)."""
    return torch.rand(shape, generator=generator).to(device)


def bernoulli_(
    delta: torch.Tensor, density: float, *, rescale: bool = True, generator: torch.Generator | None = None
) -> torch.Tensor:
    """DARE: keep each entry independently with probability `density`.

    mergekit's rescale matches the L1 norm of the kept entries to the full delta's (the paper multiplies
    by 1/density); with rescale off the kept entries are left as they are.
    """
    if density >= 1:
        return delta
    keep = _uniform(delta.shape, generator, delta.device) < density
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
    keep = _uniform(probabilities.shape, generator, delta.device) < probabilities
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
