"""The example evolve configs in examples/ are valid against a zoo laid out where they expect it."""

from __future__ import annotations

from pathlib import Path

import pytest

from evomerge.runs.config import EvolveConfig, check_inputs
from evomerge.zoo.random_models import FamilySpec, build_family

from .fake_problem import write_task

EXAMPLES = sorted((Path(__file__).parents[2] / "examples").glob("evolve*.yaml"))


@pytest.fixture(scope="module")
def zoo_layout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A dir holding runs/demo/zoo/{models,tasks} as the examples expect (a random family inside)."""
    root = tmp_path_factory.mktemp("examples")
    family = build_family(root / "family", FamilySpec(n_finetunes=3))
    zoo = root / "runs" / "demo" / "zoo"
    (zoo / "models").mkdir(parents=True)
    for link, name in {"base": "base", "add": "ft0", "reverse": "ft1", "translate": "ft2"}.items():
        (zoo / "models" / link).symlink_to(family[name])
    for split in ("dev", "test"):
        write_task(zoo / "tasks" / "multi" / f"{split}.jsonl")
    return root


@pytest.mark.parametrize("example", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_config_is_valid(example: Path, zoo_layout: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(zoo_layout)
    config = EvolveConfig.from_yaml(example)
    assert check_inputs(config).dim > 0


def test_there_are_examples() -> None:
    assert len(EXAMPLES) >= 2
