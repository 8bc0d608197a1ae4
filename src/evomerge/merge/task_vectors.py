"""A task-vector cache for the in-memory loop: each source's `x - base` per tensor, computed once.

The task-arithmetic family (task_arithmetic, ties, dare_*, breadcrumbs*, della*) starts every candidate
with `delta_i = x_i - base` for every source and tensor, and the deterministic sparsifiers (TIES
trimming, Breadcrumbs) then rank those deltas' magnitudes, which depends on the density (and gamma,
rescale, tie-break) but not on the weights. Over an evolution the sources never change, so these are the
same tensors candidate after candidate. `TaskVectorCache` keeps them, keyed by

    (tensor, model, base, "delta")                                          the raw task vector
    (tensor, model, base, "magnitude", density, rescale, tie_break)         a TIES-trimmed one
    (tensor, model, base, "magnitude_outliers", density, gamma, rescale, tie_break)   a Breadcrumbs one

What is exact: a cached tensor is the very tensor the kernel would compute (the same ops on the same
inputs), and the kernel gets a fresh copy where it writes in place, or else reads the cached tensor and
makes the same products out of place, so the merge is bit-identical with and without the cache (tests/merge/test_task_vectors.py checks that per method). Random sparsification (DARE,
DELLA) draws from a per-candidate seed, so only its raw delta is cached and the draw is made as before.

Memory: entries are kept while their bytes fit `budget_bytes`. Raw deltas are never evicted (every
candidate uses them); sparsified ones are evicted oldest-first to make room, since a search that moves
the density makes them stale. `auto_budget()` picks the budget from the free memory (psutil).

Raw deltas are kept only where the budget was given explicitly (`keep_raw`). Under "auto" the cache holds
the trimmed deltas alone: reading a cached raw delta saves one subtraction, which measured no faster than
computing it (plain task_arithmetic, 0.95x; benchmarks/results/fitness.md) while it held one model's size
per source, memory the evaluation may need.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any

import torch

from evomerge.errors import ConfigError

AUTO_FRACTION = 0.5  # of the memory free when the cache is set up (the evaluation needs the rest)


def auto_budget(fraction: float = AUTO_FRACTION, device: torch.device | str = "cpu") -> int:
    """Bytes the cache may hold: `fraction` of the free memory (host RAM, or the GPU's for a GPU device)."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * fraction)
    import psutil

    return int(psutil.virtual_memory().available * fraction)


def is_auto(setting: Any) -> bool:
    """Does a `task_vector_cache` setting leave the budget (and what is kept) to the cache?"""
    return setting == "auto" or setting is True


def resolve_budget(setting: Any, device: torch.device | str = "cpu") -> int:
    """A config's `task_vector_cache` ("auto", "off", or a byte count) as a byte budget (0: off)."""
    if setting is None or setting is False or setting == "off":
        return 0
    if is_auto(setting):
        return auto_budget(device=device)
    if isinstance(setting, int) and setting >= 0:
        return int(setting)
    raise ConfigError(
        f"task_vector_cache: expected 'auto', 'off' or a byte count such as '2GiB', got {setting!r}."
    )


class TaskVectorCache:
    """Task vectors (and deterministic sparsifications of them) kept across candidates, within a budget.

    Thread-safe: the in-memory merge computes several tensors at once."""

    def __init__(self, budget_bytes: int, *, keep_raw: bool = True) -> None:
        if budget_bytes < 0:
            raise ConfigError(f"task_vector_cache: the budget must be >= 0 bytes, got {budget_bytes}.")
        self.budget_bytes = budget_bytes
        self.keep_raw = keep_raw  # False: raw deltas are computed each time, only trimmed ones are kept
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self._raw: dict[Hashable, torch.Tensor] = {}
        self._sparse: OrderedDict[Hashable, torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._raw) + len(self._sparse)

    def bound(self, tensor: str, models: list[str], base: str) -> BoundTaskVectors:
        """The view the kernel of one tensor uses: source `i` of the kernel is `models[i]`."""
        return BoundTaskVectors(self, tensor, tuple(models), base)

    def get(
        self, key: Hashable, compute: Callable[[], torch.Tensor], *, raw: bool, copy: bool = True
    ) -> torch.Tensor:
        """The tensor under `key`, computed by `compute()` and kept if it fits. `copy`: one the caller
        owns (it may write to it); else possibly the cached tensor itself, which the caller only reads."""
        with self._lock:
            table = self._raw if raw else self._sparse
            cached = table.get(key)
            if cached is not None:
                self.hits += 1
                if not raw:
                    self._sparse.move_to_end(key)
        if cached is not None:
            return cached.clone() if copy else cached
        value = compute()
        self._keep(key, value, raw, copy)
        return value

    def _keep(self, key: Hashable, value: torch.Tensor, raw: bool, copy: bool) -> None:
        size = value.numel() * value.element_size()
        with self._lock:
            self.misses += 1
            if key in self._raw or key in self._sparse:
                return  # another thread computed it meanwhile
            while self.bytes + size > self.budget_bytes and self._sparse:
                _, old = self._sparse.popitem(last=False)
                self.bytes -= old.numel() * old.element_size()
            if self.bytes + size > self.budget_bytes:
                return
            # the caller may write to its tensor only when it asked for a copy
            (self._raw if raw else self._sparse)[key] = value.clone() if copy else value
            self.bytes += size

    def clear(self) -> None:
        with self._lock:
            self._raw.clear()
            self._sparse.clear()
            self.bytes = 0

    def describe(self) -> str:
        return (
            f"task-vector cache: {len(self)} tensors, {self.bytes / 2**20:.1f} MiB of "
            f"{self.budget_bytes / 2**20:.1f} MiB, {self.hits} hits, {self.misses} misses"
            + ("" if self.keep_raw else " (trimmed deltas only)")
        )


class BoundTaskVectors:
    """One tensor's slice of a `TaskVectorCache`, as the task-arithmetic kernel asks for it."""

    def __init__(self, cache: TaskVectorCache, tensor: str, models: tuple[str, ...], base: str) -> None:
        self.cache, self.tensor, self.models, self.base = cache, tensor, models, base

    def delta(self, index: int, compute: Callable[[], torch.Tensor], copy: bool = True) -> torch.Tensor:
        """Source `index`'s raw task vector `x - base` (an owned copy, or with copy=False read-only)."""
        if not self.cache.keep_raw:
            return compute()  # a fresh tensor: the caller owns it
        key = (self.tensor, self.models[index], self.base, "delta")
        return self.cache.get(key, compute, raw=True, copy=copy)

    def sparse(
        self,
        index: int,
        params: tuple[Any, ...],
        compute: Callable[[], torch.Tensor],
        copy: bool = True,
    ) -> torch.Tensor:
        """Source `index`'s task vector after a deterministic sparsification described by `params`."""
        key = (self.tensor, self.models[index], self.base, *params)
        return self.cache.get(key, compute, raw=False, copy=copy)
