"""retain_freed_memory: glibc takes the settings on Linux; a no-op elsewhere."""

from __future__ import annotations

import platform
import sys

import pytest
import torch

from evomerge.allocator import retain_freed_memory


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_glibc_accepts_the_settings_and_tensors_still_work() -> None:
    assert retain_freed_memory() is True
    assert retain_freed_memory() is True  # idempotent
    for _ in range(3):  # large blocks are allocated and freed as before, only from the heap
        block = torch.ones(8 << 20)
        assert float(block.sum()) == 8 << 20
        del block


def test_other_platforms_are_a_no_op(monkeypatch: pytest.MonkeyPatch) -> None:
    retain_freed_memory.cache_clear()
    monkeypatch.setattr(sys, "platform", "darwin")
    try:
        assert retain_freed_memory() is False
    finally:
        retain_freed_memory.cache_clear()
