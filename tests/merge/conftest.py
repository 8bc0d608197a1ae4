"""Fixtures shared by the engine's tests: the tiny families most of them merge (built once per session)."""

from __future__ import annotations

from pathlib import Path

import pytest

from evomerge.zoo.random_models import FamilySpec

from .engine_helpers import family


@pytest.fixture(scope="module")
def fam(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """fp32 Llama base + 3 fine-tunes, untied, one file each."""
    return family(tmp_path_factory.getbasetemp() / "families", "fp32", FamilySpec(n_finetunes=3))


@pytest.fixture(scope="module")
def tied(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The same with tied embeddings (no lm_head tensor)."""
    spec = FamilySpec(n_finetunes=3, tie_word_embeddings=True, seed=2)
    return family(tmp_path_factory.getbasetemp() / "families", "fp32_tied", spec)
