"""TIES on bfloat16 models, block by block from disk: the fast path of `merge_to_dir` at 7B scale.

The torch kernel (`methods/task_arithmetic.py`) holds every input, delta, key and mask of a tensor at
once and spends most of its time replaying mergekit's sort in numpy. Here one tensor is merged in three
passes over blocks read straight from the files (no mapping, so memory is the blocks, the deltas and
the output, never the inputs):

    1. delta_i = bf16(x_i - base) for every model, and a histogram of |delta_i| as 15-bit keys
       (the top-k threshold and its ties, as `sparsify.key_threshold` finds them);
    2. where equal magnitudes straddle the threshold, which of them mergekit's argsort keeps: the sort
       replay (`sparsify._tied_in_prefix`) as one compiled loop over the keys;
    3. trim, elect the sign, disjoint (weighted) mean, add the base, one compiled pass per block.

Every operation is the torch kernel's, in the same order and rounding, so the output bits are the same
(tests/merge/test_streaming.py compares the two on tie-heavy tensors). It needs numba (the `fast`
extra); without it, or for anything but plain TIES on bf16 safetensors (weights, densities and
`normalize` free; `rescale` off, `lambda` 1), `merge_tensor` returns None and the engine runs the kernel.

Deltas of a tensor are kept between the passes when they fit `keep_bytes`; larger tensors (a 7B
model's embeddings) recompute them from the files (the page cache) instead.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import cache
from types import ModuleType

import numpy as np
import torch

from evomerge.merge.plan import TensorTask
from evomerge.merge.registry import MergeMethod
from evomerge.merge.sources import SourceSet
from evomerge.merge.sparsify import TieBreak, _replay_verified, threshold_of_counts

BLOCK = 1 << 17  # entries per block: 256 KB of bf16 per model, so the blocks of all models stay in L2
KEEP_BYTES = 512_000_000  # deltas kept in memory between passes up to this size (per tensor)
_KEYS = 1 << 15
_KEEP_ALL = -1  # a threshold below every key: nothing is trimmed


@cache
def _jit() -> ModuleType | None:
    """The compiled loops, or None without numba (or with EVOMERGE_JIT=0, to compare the two paths)."""
    if os.environ.get("EVOMERGE_JIT", "1") == "0":
        return None
    try:
        from evomerge.merge import _ties_jit
    except ImportError:
        return None
    return _ties_jit


@contextmanager
def small_pages() -> Iterator[None]:
    """numpy's new arrays on ordinary pages, not madvised transparent huge pages, inside the block.

    The merge allocates its deltas, codes and output afresh for every tensor; on huge pages the kernel
    clears (and may compact memory for) 2 MB at a time, which cost about twice the system time of
    ordinary pages at 220M (2.4 against 1.3 s of 7.7 s CPU, `NUMPY_MADVISE_HUGEPAGE`). A process-wide
    numpy setting, restored on exit."""
    try:
        from numpy._core.multiarray import _set_madvise_hugepage  # type: ignore[attr-defined]  # private, numpy >= 2
    except ImportError:  # another numpy layout: leave the setting alone
        yield
        return
    previous = _set_madvise_hugepage(False)
    try:
        yield
    finally:
        _set_madvise_hugepage(previous)


def available() -> bool:
    return _jit() is not None


def supported(task: TensorTask, method: MergeMethod, sources: SourceSet, tie_break: TieBreak) -> bool:
    """Can `merge_tensor` compute this task (else the engine runs the torch kernel)?"""
    params = task.params
    if method.name != "ties" or task.base is None or not task.inputs or not task.floating:
        return False
    if task.vocab is not None:  # rows re-indexed to another vocabulary (tokenizer_source): the kernel's path
        return False
    if task.compute_dtype != torch.bfloat16 or math.prod(task.shape) == 0:
        return False
    if params.get("rescale") or params.get("lambda_", 1.0) != 1.0 or min(params["density"]) <= 0:
        return False
    if any(sources.info(*ref).dtype != torch.bfloat16 for ref in task.refs):
        return False
    return available() and (tie_break == "stable" or _replay_verified())


def merge_tensor(
    task: TensorTask,
    sources: SourceSet,
    tie_break: TieBreak = "mergekit",
    *,
    block: int = BLOCK,
    keep_bytes: int = KEEP_BYTES,
) -> torch.Tensor | None:
    """The TIES merge of one `supported` task in bf16, read block by block from `sources`; None where
    the compiled path cannot answer (a NaN/inf input, the sort's heap-sort fallback, a pickle source)
    and the torch kernel must run (and name the problem)."""
    jit = _jit()
    assert jit is not None
    job = _Job(task, sources, block, keep=2 * len(task.inputs) * math.prod(task.shape) <= keep_bytes)
    counts = job.first_pass(jit)
    if counts is None:
        return None
    trims = [job.trim(jit, i, counts[i], d, tie_break) for i, d in enumerate(task.params["density"])]
    job.codes = None  # the replay's buffer goes before the output is allocated
    if any(trim is None for trim in trims):
        return None
    return job.consensus(jit, [trim for trim in trims if trim is not None])


class _Job:
    """One tensor's inputs as block readers, its buffers, and the deltas when they are kept."""

    def __init__(self, task: TensorTask, sources: SourceSet, block: int, keep: bool) -> None:
        self.task, self.sources = task, sources
        self.n = math.prod(task.shape)
        self.models = len(task.inputs)
        self.block = min(block, self.n)
        self.base_block = np.empty(self.block, dtype=np.int16)
        self.input_blocks = np.empty((self.models, self.block), dtype=np.int16)
        # block-major (blocks, M, block): one block of every model is a C-contiguous (M, block) array
        blocks = -(-self.n // self.block)
        shape = (blocks, self.models, self.block)
        self.deltas = np.empty(shape, dtype=np.int16) if keep else None
        self.codes: np.ndarray | None = None

    def _spans(self) -> range:
        return range(0, self.n, self.block)

    def _read(self, start: int, models: range) -> tuple[np.ndarray, np.ndarray] | None:
        """Base and input blocks at `start` (rows of `models` filled), or None for a pickle source."""
        size = min(self.block, self.n - start)
        base = self.base_block[:size]
        assert self.task.base is not None
        if not self.sources.read_range(*self.task.base, start, base):
            return None
        for i in models:
            if not self.sources.read_range(*self.task.inputs[i], start, self.input_blocks[i, :size]):
                return None
        return base, self.input_blocks[:, :size]

    def first_pass(self, jit: ModuleType) -> np.ndarray | None:
        """Histograms (M, 2^15) of the deltas' magnitude keys; the deltas kept if there is room."""
        counts = np.zeros((self.models, 4, _KEYS), dtype=np.int64)
        scratch = np.empty((self.models, self.block), dtype=np.int16)
        for start in self._spans():
            blocks = self._read(start, range(self.models))
            if blocks is None:
                return None
            base, inputs = blocks
            out = scratch if self.deltas is None else self.deltas[start // self.block]
            for i in range(self.models):  # one model at a time: 1-D contiguous rows (see _ties_jit)
                if not jit.histogram_deltas(base, inputs[i], counts[i], out[i, : base.size]):
                    return None  # NaN/inf: the torch path names the tensor and the model
        return counts.sum(axis=1)

    def deltas_of(self, jit: ModuleType, start: int, models: range) -> np.ndarray | None:
        """The deltas (rows `models`, C-contiguous (M, size)) of the block at `start`: kept ones, or
        recomputed from the files."""
        size = min(self.block, self.n - start)
        if self.deltas is not None:
            return np.ascontiguousarray(self.deltas[start // self.block, :, :size])  # a copy: last block
        blocks = self._read(start, models)
        if blocks is None:
            return None
        base, inputs = blocks
        out = np.empty((self.models, size), dtype=np.int16)
        for i in models:
            jit.deltas_block(base, inputs[i], out[i])
        return out

    def trim(
        self, jit: ModuleType, model: int, counts: np.ndarray, density: float, tie_break: TieBreak
    ) -> tuple[int, np.ndarray] | None:
        """(threshold, kept): delta `model` keeps the keys above the threshold and the entries at the
        sorted tensor positions `kept` (tied at the threshold and chosen as mergekit's sort, or
        `stable`, chooses them); `magnitude_keep`'s set exactly."""
        k = max(1, int(density * self.n))
        if density >= 1 or k >= self.n:
            return _KEEP_ALL, _NONE
        found = threshold_of_counts(counts, k)
        if found is None:
            return None
        threshold, above, tied = found
        if above + tied == k:  # every tied entry is in: keep the keys down to the threshold
            return threshold - 1, _NONE
        positions = np.empty(tied + 1, dtype=np.int64)  # one spare: the scans write one ahead
        if tie_break == "stable":  # the first k - above tied entries in index order
            if not self._scan(
                jit,
                model,
                lambda block, start, rank: jit.tie_positions(
                    block, threshold, start, positions[: k - above + 1], rank
                ),
            ):
                return None
            return threshold, positions[: k - above]
        chosen = np.zeros(tied, dtype=bool)
        if not self._replay(jit, model, k, threshold, tied, positions, chosen):
            return None
        return threshold, positions[:tied][chosen]

    def _scan(self, jit: ModuleType, model: int, step: Callable[[np.ndarray, int, int], int]) -> bool:
        """rank = step(deltas of `model` in the block, block start, rank) over the blocks in order."""
        rank = 0
        for start in self._spans():
            deltas = self.deltas_of(jit, start, range(model, model + 1))
            if deltas is None:
                return False
            rank = step(deltas[model], start, rank)
        return True

    def _replay(
        self,
        jit: ModuleType,
        model: int,
        k: int,
        threshold: int,
        tied: int,
        positions: np.ndarray,
        chosen: np.ndarray,
    ) -> bool:
        if self.codes is None:  # one buffer for every model of the tensor (fresh pages cost faults)
            self.codes = np.empty(self.n, dtype=np.int32 if self.n < (1 << 31) - _KEYS else np.int64)
        codes = self.codes
        if not self._scan(
            jit,
            model,
            lambda block, start, rank: jit.tie_codes(
                block, threshold, tied, codes[start : start + block.size], rank, start, positions
            ),
        ):
            return False
        return bool(jit.replay_top_k(codes, k, threshold, tied, chosen))

    def consensus(self, jit: ModuleType, trims: list[tuple[int, np.ndarray]]) -> torch.Tensor | None:
        """The merged tensor from the trimming thresholds and kept ties, block by block."""
        params = self.task.params
        stored = (
            torch.tensor(params["weight"], dtype=torch.bfloat16).float().numpy()
        )  # as mergekit holds them
        thresholds = np.array([threshold for threshold, _ in trims], dtype=np.int64)
        kept = _stacked([positions for _, positions in trims])
        kept_counts = np.array([positions.size for _, positions in trims], dtype=np.int64)
        scratch = np.empty((3 + self.models, jit.TILE), dtype=np.float32)
        out = np.empty(self.n, dtype=np.int16)
        cursors = np.zeros(self.models, dtype=np.int64)
        normalize = bool(params["normalize"])
        for start in self._spans():
            deltas = self.deltas_of(jit, start, range(self.models))
            if deltas is None:
                return None
            size = deltas.shape[1]
            base = self.base_block[:size]
            if self.deltas is not None:
                assert self.task.base is not None
                self.sources.read_range(*self.task.base, start, base)
            end = start + size
            jit.consensus_block(
                base,
                deltas,
                start,
                thresholds,
                kept,
                kept_counts,
                cursors,
                stored,
                normalize,
                scratch,
                out[start:end],
            )
        self.deltas = None
        return torch.from_numpy(out).view(torch.bfloat16).reshape(self.task.shape)


_NONE = np.zeros(0, dtype=np.int64)  # no tied entry kept beyond the threshold


def _stacked(rows: list[np.ndarray]) -> np.ndarray:
    """Rows of different lengths as one (M, longest) int64 array (the compiled loop takes one 2-D array)."""
    stacked = np.zeros((len(rows), max(1, *(row.size for row in rows))), dtype=np.int64)
    for index, row in enumerate(rows):
        stacked[index, : row.size] = row
    return stacked
