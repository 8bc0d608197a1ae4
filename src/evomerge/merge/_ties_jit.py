"""Compiled (numba) inner loops of the streaming TIES merge: bf16 bit patterns in, bf16 bit patterns out.

Each function restates, entry by entry, the arithmetic the torch/numpy path performs, so the bits agree:
bf16 operands are widened to float32 exactly, every operation runs in float32 and rounds to bf16 the way
torch does (round to nearest even, `_to_bf16`). The sort replay is `sparsify._tied_in_prefix` as one
loop: libstdc++'s introsort, followed only down the segment that holds position k.

Speed rules the loops follow (each measured, see benchmarks/results/merge.md): they take 1-D C-contiguous
arrays (loops over rows of strided 2-D views do not vectorise), index slices rather than `a[offset + j]`
(numba's negative-index check on an offset index stops vectorisation), and collect positions with
`llvm.masked.compressstore` (`_left_stops`, `_right_stops`, `_tied_positions`, `_band_codes`: one vector
compare per 16 entries, the hits stored packed; vpcompress on AVX-512, emulated by LLVM elsewhere).

Imported only when numba is installed (`pip install evomerge[fast]`); `merge.streaming` falls back to
the torch kernel otherwise.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

_INSERTION_BLOCK = 16


@intrinsic
def _f32_of_bits(typingctx: Any, bits: Any) -> Any:
    """The float32 whose bit pattern is the uint32 `bits`."""
    signature = types.float32(types.uint32)

    def codegen(context: Any, builder: Any, sig: Any, args: Any) -> Any:
        return builder.bitcast(args[0], ir.FloatType())

    return signature, codegen


@intrinsic
def _bits_of_f32(typingctx: Any, value: Any) -> Any:
    """The bit pattern (uint32) of the float32 `value`."""
    signature = types.uint32(types.float32)

    def codegen(context: Any, builder: Any, sig: Any, args: Any) -> Any:
        return builder.bitcast(args[0], ir.IntType(32))

    return signature, codegen


@njit(inline="always")
def _f32(bf16: Any) -> Any:
    """bf16 bits (int16) -> float32, exact."""
    return _f32_of_bits(np.uint32(np.int32(bf16) << 16))  # type: ignore[call-arg]  # numba intrinsic


@njit(inline="always")
def _to_bf16(value: Any) -> Any:
    """float32 -> bf16 bits (int16), rounded to nearest even as torch's c10::BFloat16 does."""
    bits: Any = _bits_of_f32(value)  # type: ignore[call-arg]  # numba intrinsic
    bias = ((bits >> np.uint32(16)) & np.uint32(1)) + np.uint32(0x7FFF)
    return np.int16((bits + bias) >> np.uint32(16)) if value == value else np.int16(0x7FC0)


# ---- pass 1: deltas, their magnitude histograms, finiteness ----------------------------------------


@njit(inline="always")
def _delta(tensor: Any, base: Any) -> Any:
    """bf16(tensor - base): torch's bf16 subtraction, for finite operands (no NaN to round)."""
    bits: Any = _bits_of_f32(_f32(tensor) - _f32(base))  # type: ignore[call-arg]  # numba intrinsic
    bias = ((bits >> np.uint32(16)) & np.uint32(1)) + np.uint32(0x7FFF)
    return np.int16((bits + bias) >> np.uint32(16))


@njit(nogil=True, cache=True, error_model="numpy")
def _any_non_finite(values: Any) -> bool:
    """Does a bf16 entry (int16 bits) of `values` hold NaN or inf? A max of the magnitude bits: one
    vectorised pass."""
    largest = np.int16(0)
    for j in range(values.size):
        largest = max(largest, np.int16(values[j] & 0x7FFF))
    return bool(largest >= 0x7F80)


# The kernels below take one model's block as 1-D C-contiguous arrays: rows of a 2-D slice such as
# inputs[:, :size] are strided views ('A' layout), and loops over them do not vectorise (7x slower).


@njit(nogil=True, cache=True, error_model="numpy")
def histogram_deltas(base: Any, tensor: Any, counts: Any, deltas: Any) -> bool:
    """deltas = bf16(tensor - base) over a block of one model (bf16 bits as int16, all 1-D) and
    counts[j % 4, |delta| key] += 1 (counts (4, 2^15); sum over axis 0). False if an input is NaN or
    inf (then nothing is counted: the caller falls back to the path that names the tensor)."""
    size = tensor.size
    if _any_non_finite(base) or _any_non_finite(tensor):
        return False
    for j in range(size):
        deltas[j] = _delta(tensor[j], base[j])
    # four interleaved histograms: runs of equal keys (common in bf16 deltas) would otherwise
    # wait on each other's increment of one counter; unsigned keys and a slice per four entries
    # spare numba's negative-index checks
    first, second, third, fourth = counts[0], counts[1], counts[2], counts[3]
    magnitude = np.uint16(0x7FFF)
    for quad in range(size // 4):
        four = deltas[4 * quad : 4 * quad + 4]
        first[np.uint16(four[0]) & magnitude] += 1
        second[np.uint16(four[1]) & magnitude] += 1
        third[np.uint16(four[2]) & magnitude] += 1
        fourth[np.uint16(four[3]) & magnitude] += 1
    for j in range(size - size % 4, size):
        first[np.uint16(deltas[j]) & magnitude] += 1
    return True


@njit(nogil=True, cache=True, error_model="numpy")
def deltas_block(base: Any, tensor: Any, deltas: Any) -> None:
    """deltas = bf16(tensor - base) over a block of one model (1-D; inputs checked finite before)."""
    for j in range(tensor.size):
        deltas[j] = _delta(tensor[j], base[j])


# ---- the sort replay -------------------------------------------------------------------------------
#
# The replay sorts codes, not keys: a code maps a magnitude key to an integer so that codes order as
# their keys do while every entry tied at the boundary key stays recognisable by its rank. With T tied
# entries, keys below the boundary keep their value, the tied ones take boundary + their rank (index
# order), keys above it move up by T. The tied codes fill the band [boundary, boundary + T), and a
# comparison with a pivot is one integer compare against the band's ends (a tied pivot) or the pivot's
# code (any other): no decoding inside the partition loops.


def _tied_codegen(context: Any, builder: Any, sig: Any, args: Any) -> Any:
    """Code for `_tied_positions`: one vector compare of _LANES magnitude keys with the boundary, the
    positions of the equal ones written packed (llvm.masked.compressstore)."""
    deltas = context.make_array(sig.args[0])(context, builder, args[0])
    positions = context.make_array(sig.args[3])(context, builder, args[3])
    at, boundary, count, start = args[1], args[2], args[4], args[5]
    i16, i64 = ir.IntType(16), ir.IntType(64)
    keys_vector, positions_vector = ir.VectorType(i16, _LANES), ir.VectorType(i64, _LANES)
    pointer = builder.bitcast(builder.gep(deltas.data, [at]), keys_vector.as_pointer())
    keys = builder.and_(builder.load(pointer, align=2), ir.Constant(keys_vector, [0x7FFF] * _LANES))
    mask = builder.icmp_signed("==", keys, _splat(builder, _resized(builder, boundary, 16)))
    first = _splat(builder, _resized(builder, builder.add(start, at), 64))
    lanes = builder.add(first, ir.Constant(positions_vector, list(range(_LANES))))
    return _append_packed(builder, lanes, positions, count, mask)


@intrinsic
def _tied_positions(
    typingctx: Any, deltas: Any, at: Any, boundary: Any, positions: Any, count: Any, start: Any
) -> Any:
    """Append to positions[count:] (int64) start + j for j in at, ..., at + _LANES - 1 where the key of
    deltas[j] (int16) is `boundary`, in order; returns the new count."""
    signature = types.intp(deltas, types.intp, boundary, positions, types.intp, types.intp)
    return signature, _tied_codegen


@njit(nogil=True, cache=True, error_model="numpy")
def tie_codes(
    deltas: Any, boundary: int, tied: int, codes: Any, first_rank: int, start: int, positions: Any
) -> int:
    """codes[j] for the |delta_j| keys of a block at `start` (`tied` keys equal to `boundary` in the
    whole tensor, this block's first one having rank `first_rank`), and positions[rank] = the tensor
    position of each tied entry; returns the next rank. Three loops without branches: every code as if
    untied, the tied entries' positions (vector compares, packed stores), then the tied codes."""
    size = deltas.size
    for j in range(size):
        key = deltas[j] & 0x7FFF
        codes[j] = key + (key > boundary) * tied
    rank = first_rank
    whole = size - size % _LANES
    for j in range(0, whole, _LANES):
        rank = _tied_positions(deltas, j, boundary, positions, rank, start)  # type: ignore[call-arg]  # numba intrinsic
    for j in range(whole, size):
        positions[rank] = start + j
        rank += (deltas[j] & 0x7FFF) == boundary
    for r in range(first_rank, rank):
        codes[positions[r] - start] = boundary + r
    return rank


@njit(nogil=True, cache=True, error_model="numpy")
def tie_positions(deltas: Any, boundary: int, start: int, positions: Any, first_rank: int) -> int:
    """positions[rank] = the tensor position of each entry whose key is `boundary`, in a block at
    `start` (`positions` may be shorter than the ties: the last entry takes every later rank);
    returns the next rank."""
    rank, last = first_rank, positions.size - 1
    for j in range(deltas.size):
        if (deltas[j] & 0x7FFF) == boundary:
            positions[min(rank, last)] = start + j
            rank += 1
    return rank


@njit(inline="always")
def _key(code: Any, boundary: int, tied: int) -> Any:
    """The magnitude key of a code."""
    if code < boundary:
        return code
    return boundary if code < boundary + tied else code - tied


_LANES = 16  # codes compared per vector instruction (AVX-512: 16 x int32)


def _splat(builder: Any, value: Any) -> Any:
    """An LLVM vector of _LANES copies of `value`."""
    vector = ir.VectorType(value.type, _LANES)
    one = builder.insert_element(ir.Constant(vector, ir.Undefined), value, ir.Constant(ir.IntType(32), 0))
    lanes = ir.Constant(ir.VectorType(ir.IntType(32), _LANES), [0] * _LANES)
    return builder.shuffle_vector(one, ir.Constant(vector, ir.Undefined), lanes)


def _resized(builder: Any, value: Any, width: int) -> Any:
    if value.type.width == width:
        return value
    return (
        builder.trunc(value, ir.IntType(width))
        if value.type.width > width
        else builder.sext(value, ir.IntType(width))
    )


def _append_packed(builder: Any, values: Any, destination: Any, count: Any, mask: Any) -> Any:
    """Write the lanes of `values` where `mask` is set, packed and in lane order, at destination[count:]
    (llvm.masked.compressstore: vpcompress on AVX-512); returns count + the number written."""
    element = values.type.element
    store = cgutils.get_or_insert_function(
        builder.module,
        ir.FunctionType(
            ir.VoidType(), [values.type, element.as_pointer(), ir.VectorType(ir.IntType(1), _LANES)]
        ),
        f"llvm.masked.compressstore.v{_LANES}i{element.width}",
    )
    builder.call(store, [values, builder.gep(destination.data, [count]), mask])
    bits = ir.IntType(_LANES)
    popcount = cgutils.get_or_insert_function(
        builder.module, ir.FunctionType(bits, [bits]), f"llvm.ctpop.i{_LANES}"
    )
    return builder.add(count, builder.zext(builder.call(popcount, [builder.bitcast(mask, bits)]), count.type))


def _stops_codegen(downward: bool) -> Any:
    """Code for `_left_stops` / `_right_stops`: one vector compare of _LANES codes, and the positions of
    those that stop the scan written packed (llvm.masked.compressstore: vpcompress on AVX-512)."""

    def codegen(context: Any, builder: Any, sig: Any, args: Any) -> Any:
        codes = context.make_array(sig.args[0])(context, builder, args[0])
        stops = context.make_array(sig.args[3])(context, builder, args[3])
        at, bound, count = args[1], args[2], args[4]
        code_type = ir.IntType(sig.args[0].dtype.bitwidth)
        stop_type = ir.IntType(sig.args[3].dtype.bitwidth)
        codes_vector = ir.VectorType(code_type, _LANES)
        stops_vector = ir.VectorType(stop_type, _LANES)
        lane = list(range(_LANES))
        first = builder.sub(at, ir.Constant(at.type, _LANES)) if downward else at
        pointer = builder.bitcast(builder.gep(codes.data, [first]), codes_vector.as_pointer())
        values = builder.load(pointer, align=code_type.width // 8)
        limit = _splat(builder, _resized(builder, bound, code_type.width))
        if downward:  # positions at - 1, at - 2, ..., at - _LANES in lane order
            reverse = ir.Constant(ir.VectorType(ir.IntType(32), _LANES), lane[::-1])
            values = builder.shuffle_vector(values, ir.Constant(codes_vector, ir.Undefined), reverse)
            mask = builder.icmp_signed(">=", values, limit)
            last = _splat(
                builder, _resized(builder, builder.sub(at, ir.Constant(at.type, 1)), stop_type.width)
            )
            positions = builder.sub(last, ir.Constant(stops_vector, lane))
        else:
            mask = builder.icmp_signed("<=", values, limit)
            positions = builder.add(
                _splat(builder, _resized(builder, at, stop_type.width)), ir.Constant(stops_vector, lane)
            )
        return _append_packed(builder, positions, stops, count, mask)

    return codegen


@intrinsic
def _left_stops(typingctx: Any, codes: Any, at: Any, bound: Any, stops: Any, count: Any) -> Any:
    """Append to stops[count:] the positions at, ..., at + _LANES - 1 whose code is <= bound, in order;
    returns the new count (codes and stops: 1-D C arrays of one integer width each)."""
    return types.intp(codes, types.intp, bound, stops, types.intp), _stops_codegen(downward=False)


@intrinsic
def _right_stops(typingctx: Any, codes: Any, at: Any, bound: Any, stops: Any, count: Any) -> Any:
    """Append to stops[count:] the positions at - 1, ..., at - _LANES whose code is >= bound, in that
    order; returns the new count."""
    return types.intp(codes, types.intp, bound, stops, types.intp), _stops_codegen(downward=True)


def _band_codegen(context: Any, builder: Any, sig: Any, args: Any) -> Any:
    """Code for `_band_codes`: one vector test of _LANES codes for boundary <= code < boundary + tied,
    the codes that pass written packed (llvm.masked.compressstore)."""
    codes = context.make_array(sig.args[0])(context, builder, args[0])
    found = context.make_array(sig.args[4])(context, builder, args[4])
    at, boundary, tied, count = args[1], args[2], args[3], args[5]
    code_type = ir.IntType(sig.args[0].dtype.bitwidth)
    vector = ir.VectorType(code_type, _LANES)
    pointer = builder.bitcast(builder.gep(codes.data, [at]), vector.as_pointer())
    values = builder.load(pointer, align=code_type.width // 8)
    offsets = builder.sub(values, _splat(builder, _resized(builder, boundary, code_type.width)))
    mask = builder.icmp_unsigned("<", offsets, _splat(builder, _resized(builder, tied, code_type.width)))
    return _append_packed(builder, offsets, found, count, mask)


@intrinsic
def _band_codes(typingctx: Any, codes: Any, at: Any, boundary: Any, tied: Any, found: Any, count: Any) -> Any:
    """Append to found[count:] (the codes' dtype) code - boundary for the codes at, ...,
    at + _LANES - 1 in the tied band [boundary, boundary + tied); returns the new count."""
    return types.intp(codes, types.intp, boundary, tied, found, types.intp), _band_codegen


_SCAN = 256  # positions per block of stops (BlockQuicksort's idea: find stops without branches)


@njit(nogil=True, cache=True, error_model="numpy")
def _partition(
    codes: Any, low: int, high: int, lowest: int, highest: int, left_stops: Any, right_stops: Any
) -> int:
    """std::__unguarded_partition(first + 1, last, first) of codes[low:high] (descending keys), exactly,
    for a pivot whose codes span [lowest, highest] (one code, or the tied band): returns the cut. The
    i-th left stop (an entry not greater than the pivot, scanning up) swaps with the i-th right stop (not
    less, scanning down) while they have not crossed. Stops are listed a block at a time without
    branches while the scanned blocks cannot meet; the last stretch runs the plain loop from the state
    the swaps left."""
    left_scan, right_scan = low + 1, high  # unscanned: [left_scan, right_scan)
    n_left = used_left = n_right = used_right = 0
    left, right = low + 1, high  # the plain loop's state: next left candidate, last right stop
    while True:
        if used_left == n_left:
            if right_scan - left_scan < _SCAN:
                break
            n_left = used_left = 0
            for t in range(0, _SCAN, _LANES):  # vector compares, positions stored packed
                n_left = _left_stops(codes, left_scan + t, highest, left_stops, n_left)  # type: ignore[call-arg]
            left_scan += _SCAN
        if used_right == n_right:
            if right_scan - left_scan < _SCAN:
                break
            n_right = used_right = 0
            for t in range(0, _SCAN, _LANES):
                n_right = _right_stops(codes, right_scan - t, lowest, right_stops, n_right)  # type: ignore[call-arg]
            right_scan -= _SCAN
        pairs = min(n_left - used_left, n_right - used_right)
        lefts = left_stops[used_left : used_left + pairs]
        rights = right_stops[used_right : used_right + pairs]
        for t in range(pairs):  # unsigned positions: no negative-index checks (a third of the replay)
            a, b = np.uint64(lefts[t]), np.uint64(rights[t])
            codes[a], codes[b] = codes[b], codes[a]
        if pairs:
            used_left += pairs
            used_right += pairs
            left, right = left_stops[used_left - 1] + 1, right_stops[used_right - 1]
    while True:
        while codes[left] > highest:
            left += 1
        right -= 1
        while lowest > codes[right]:
            right -= 1
        if left >= right:
            return left
        codes[left], codes[right] = codes[right], codes[left]
        left += 1


@njit(nogil=True, cache=True, error_model="numpy")
def replay_top_k(codes: Any, k: int, boundary: int, tied: int, chosen: Any) -> bool:
    """Mark chosen[rank] for the tied entries that a descending std::sort of the keys puts first k.

    `codes` (from `tie_codes`) is permuted in place as the sort would permute the keys. False where the
    sort would switch to heap sort (depth limit): the caller then lets torch.sort answer.
    """
    n = codes.size
    low, high = 0, n
    depth = 2 * math.floor(math.log2(max(n, 1)))
    left_stops = np.empty(_SCAN, dtype=codes.dtype)  # positions fit the codes' width (see streaming)
    right_stops = np.empty(_SCAN, dtype=codes.dtype)
    band_end = boundary + tied - 1  # the tied codes: [boundary, band_end]
    while high - low > _INSERTION_BLOCK and low < k < high:
        if depth == 0:
            return False
        depth -= 1
        # std::__move_median_to_first(first, first + 1, mid, last - 1), comp = greater
        a, b, c = low + 1, low + (high - low) // 2, high - 1
        ka, kb, kc = (
            _key(codes[a], boundary, tied),
            _key(codes[b], boundary, tied),
            _key(codes[c], boundary, tied),
        )
        if ka > kb:
            pick = b if kb > kc else (c if ka > kc else a)
        elif ka > kc:
            pick = a
        else:
            pick = c if kb > kc else b
        codes[low], codes[pick] = codes[pick], codes[low]
        pivot = codes[low]
        lowest, highest = (boundary, band_end) if boundary <= pivot <= band_end else (pivot, pivot)
        cut = _partition(codes, low, high, lowest, highest, left_stops, right_stops)
        if cut <= k:  # the left part is all in; go on in the right part
            low = cut
        else:
            high = cut
    # everything before the segment is in: the tied ranks there, found by vector tests, then marked
    found = np.empty(tied + _LANES, dtype=codes.dtype)
    count = 0
    whole = low - low % _LANES
    for j in range(0, whole, _LANES):
        count = _band_codes(codes, j, boundary, tied, found, count)  # type: ignore[call-arg]
    for j in range(whole, low):
        if boundary <= codes[j] <= band_end:
            found[count] = codes[j] - boundary
            count += 1
    for j in range(count):
        chosen[found[j]] = True
    if low < k:  # the last block is insertion-sorted: stable, so ties keep their order
        block = codes[low:high].copy()
        for j in range(1, block.size):
            item, key = block[j], _key(block[j], boundary, tied)
            i = j
            while i > 0 and key > _key(block[i - 1], boundary, tied):
                block[i] = block[i - 1]
                i -= 1
            block[i] = item
        for j in range(k - low):
            if boundary <= block[j] <= band_end:
                chosen[block[j] - boundary] = True
    return True


# ---- pass 3: trim, elect, disjoint mean, add the base -------------------------------------------------


@njit(inline="always")
def _trim(deltas: Any, threshold: Any, values: Any) -> None:
    """values = delta as float32 where its key is above `threshold`, else delta * 0 (a signed zero, as
    mergekit's mask product): the sign bit alone."""
    for j in range(deltas.size):
        value = deltas[j]
        values[j] = _f32(value if (value & 0x7FFF) > threshold else value & np.int16(-32768))


TILE = _TILE = 2048  # entries per tile of `consensus_block`: its float32 rows stay in the L1 cache


@njit(nogil=True, cache=True, error_model="numpy")
def consensus_block(
    base: Any,
    deltas: Any,
    offset: int,
    thresholds: Any,
    kept: Any,
    kept_counts: Any,
    cursors: Any,
    weights: Any,
    normalize: bool,
    scratch: Any,
    out: Any,
) -> None:
    """out = bf16(bf16(merged / divisor) + base) over one block of deltas (M, m) at tensor position
    `offset`: delta i keeps the keys above thresholds[i] and the tied entries at the sorted positions
    kept[i, :kept_counts[i]] (cursors (M,) point at the first not yet reached, advanced), then is
    weighted, elected and averaged with the operations of `_ChunkScratch.disjoint` and
    `_disjoint_mean_chunked`, in their order. Tile by tile, so the float32 rows stay in cache; the
    steps are loops the compiler vectorises."""
    models, size = deltas.shape
    for begin in range(0, size, _TILE):
        end = min(size, begin + _TILE)
        width = end - begin
        for i in range(models):
            values, row = scratch[3 + i, :width], deltas[i, begin:end]
            _trim(row, np.int16(thresholds[i]), values)
            cursor, stop = cursors[i], offset + end
            while cursor < kept_counts[i] and kept[i, cursor] < stop:
                values[kept[i, cursor] - offset - begin] = _f32(row[kept[i, cursor] - offset - begin])
                cursor += 1
            cursors[i] = cursor
            weight = weights[i]
            if weight != 1:  # times the weight rounded to bf16
                for j in range(width):
                    values[j] = _f32(_to_bf16(values[j] * weight))
        total, merged, divisor = scratch[0, :width], scratch[1, :width], scratch[2, :width]
        first = scratch[3, :width]
        for j in range(width):
            total[j] = first[j]
        for i in range(1, models):
            row = scratch[3 + i, :width]
            for j in range(width):
                total[j] = total[j] + row[j]
        for j in range(width):  # the elected sign, +1 where the sum is >= 0
            total[j] = np.float32(1) if total[j] >= 0 else np.float32(-1)
            merged[j] = np.float32(0)
            divisor[j] = np.float32(0)
        for i in range(models):
            row, weight = scratch[3 + i, :width], weights[i]
            for j in range(width):
                agree = np.float32(1) if row[j] * total[j] > 0 else np.float32(0)  # zero never agrees
                merged[j] = merged[j] + row[j] * agree
                divisor[j] = divisor[j] + agree * weight
        # slices, not out[begin + j]: an offset index gets numba's negative-index check, which stops
        # vectorisation (4x slower)
        tile_out, tile_base = out[begin:end], base[begin:end]
        if normalize:
            for j in range(width):
                share = divisor[j] if divisor[j] != 0 else np.float32(1)
                result = _to_bf16(_f32(_to_bf16(merged[j])) / _f32(_to_bf16(share)))
                tile_out[j] = _to_bf16(_f32(result) + _f32(tile_base[j]))
        else:
            for j in range(width):
                tile_out[j] = _to_bf16(_f32(_to_bf16(merged[j])) + _f32(tile_base[j]))
