"""A tiny random model family that evaluators can run (every model dir holds the zoo's tokenizer)."""

from __future__ import annotations

from pathlib import Path

import pytest

from runs.fake_problem import build_scoreable_family


@pytest.fixture(scope="module")
def scoreable_family(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return build_scoreable_family(tmp_path_factory.mktemp("scoreable"))
