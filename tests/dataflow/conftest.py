"""Tiny Llama pools for the data-flow tests: three models of one width sharing the zoo's tokenizer."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from evomerge.dataflow.path import LayerPath, Step
from evomerge.dataflow.pool import PoolModel
from evomerge.zoo.random_models import FamilySpec
from runs.fake_problem import build_scoreable_family


@pytest.fixture(scope="package")
def family(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """base, ft0, ft1 (hidden 32, 4 layers, fp32) with the zoo tokenizer, and dev/test task files."""
    return build_scoreable_family(tmp_path_factory.mktemp("dataflow"), FamilySpec(delta_scale=0.2))


@pytest.fixture(scope="package")
def pool(family: dict[str, Path]) -> list[PoolModel]:
    return [PoolModel.read(family[name]) for name in ("ft0", "ft1", "base")]


@pytest.fixture(scope="package")
def live(family: dict[str, Path]) -> list[torch.nn.Module]:
    from evomerge.eval.loading import load_model

    return [load_model(family[name], dtype=torch.float32)[0] for name in ("ft0", "ft1", "base")]


def a_path(pool: list[PoolModel], *steps: tuple[int, int, float]) -> LayerPath:
    return LayerPath(tuple(m.path for m in pool), 0, tuple(Step(*s) for s in steps))


# Paths over ft0 (owner), ft1 and base that fit r = 2 (slots 0, 1, 5, 10, 13, 15), ft0.1 running twice.
SCALED = ((0, 0, 1.0), (0, 1, 1.0), (1, 1, 0.8), (2, 2, 1.3), (0, 1, 0.9), (0, 3, 1.0))
UNIT = ((0, 0, 1.0), (0, 1, 1.0), (1, 1, 1.0), (1, 2, 1.0), (0, 1, 1.0), (0, 3, 1.0))
