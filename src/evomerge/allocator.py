"""Keep freed tensor memory in the process, for loops that allocate the same large temporaries again and again.

Merging a candidate into the live model allocates a few temporaries per tensor (task vectors, sums) and
frees them at once. glibc serves every block above its mmap threshold (128 KiB at first, at most 32 MiB
by its own adaptive rule) with a fresh `mmap` and gives it back with `munmap` on free, so every
candidate page-faults all of its temporaries in again: for a 134M-parameter model that made
`merge_into` about 2x slower (`benchmarks/merge_into_alloc.py`). Raising the mmap threshold and the heap's trim
threshold makes glibc reuse freed heap memory instead; the process's resident memory then stays at its
high-water mark, which a long-lived search process reaches after its first candidate anyway.

Only glibc has `mallopt`; elsewhere (macOS, musl, Windows) this is a no-op that reports False.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys

M_TRIM_THRESHOLD = -1  # glibc's malloc.h parameter numbers
M_MMAP_THRESHOLD = -3
_INT_MAX = 2**31 - 1  # mallopt takes a C int


@functools.cache
def retain_freed_memory(mmap_threshold: int = 1 << 30) -> bool:
    """Ask glibc to serve blocks below `mmap_threshold` from its heap and not trim it; True if it agreed.

    Call once in a process that merges many candidates (the evolve backends do); idempotent.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    mmap_ok = mallopt(M_MMAP_THRESHOLD, min(mmap_threshold, _INT_MAX))
    trim_ok = mallopt(M_TRIM_THRESHOLD, _INT_MAX)
    return bool(mmap_ok and trim_ok)
