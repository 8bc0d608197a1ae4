"""Session-wide test set-up: one torch thread (2 shared cores), tiny random model families in tmp dirs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from evomerge.zoo.random_models import FamilySpec, build_family

torch.set_num_threads(1)


@pytest.fixture
def tiny_family(tmp_path: Path) -> dict[str, Path]:
    """A tiny Llama base with two fine-tunes, fp32, single-file safetensors."""
    return build_family(tmp_path / "family", FamilySpec())


@pytest.fixture
def make_family(tmp_path: Path):  # type: ignore[no-untyped-def]
    """Factory: `make_family(FamilySpec(...))` builds a family in its own tmp dir."""
    counter = iter(range(1000))

    def _make(spec: FamilySpec | None = None) -> dict[str, Path]:
        return build_family(tmp_path / f"family{next(counter)}", spec or FamilySpec())

    return _make
