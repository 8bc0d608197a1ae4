"""A data-aware method is evolvable: the evolve config's calibration block reaches every decoded recipe."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from evomerge.errors import ConfigError
from evomerge.merge.config import MergeConfig
from evomerge.zoo.random_models import FamilySpec, build_family
from evomerge.zoo.tokenizer import build_tokenizer, save_tokenizer

from .fake_problem import make_config


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    paths = build_family(tmp_path_factory.mktemp("data_aware_evolve") / "family", FamilySpec())
    for path in paths.values():  # a data-aware merge tokenises its calibration texts with each model's own
        save_tokenizer(build_tokenizer(), path)
    return paths


def _prompts(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    path = root / "prompts.jsonl"
    path.write_text(json.dumps({"prompt": "what is 1 plus 2? ", "answer": "3"}) + "\n")
    return path


def test_decoded_regmean_recipes_carry_the_calibration(tmp_path: Path, family: dict[str, Path]) -> None:
    prompts = _prompts(tmp_path)
    search = {"granularity": "model", "parameters": {"weight": [0.1, 1.0], "alpha": [0.0, 1.0]}}
    config = make_config(
        tmp_path, family, merge_method="regmean", search=search,
        calibration={"models": {str(family["ft0"]): str(prompts), str(family["ft1"]): str(prompts)}, "limit": 4},
    )  # fmt: skip
    space = config.search_space()
    assert space.dim == 3  # a weight per model and alpha
    recipe = space.decode(np.full(space.dim, 0.5))
    assert isinstance(recipe, MergeConfig) and recipe.calibration is not None
    assert recipe.calibration.limit == 4
    assert set(recipe.calibration.models or {}) == {
        str(family["ft0"].resolve()),
        str(family["ft1"].resolve()),
    }


def test_evolving_a_data_aware_method_without_calibration_is_refused(
    tmp_path: Path, family: dict[str, Path]
) -> None:
    with pytest.raises(ConfigError, match=r"'fisher' is data-aware: it needs calibration data"):
        make_config(tmp_path, family, merge_method="fisher", search={"parameters": {"weight": [0.1, 1.0]}})
