"""The shipped example configs stay valid as the settings change (their model dirs need a built zoo, so
only the blocks that need no files are read here)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from evomerge.runs.config import SearchConfig
from evomerge.search.registry import parse_settings

EXAMPLES = sorted((Path(__file__).parents[2] / "examples").glob("*.yaml"))


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_blocks_validate(path: Path) -> None:
    data = yaml.safe_load(path.read_text())
    settings = parse_settings(data["optimizer"])
    settings.check_tasks([task["name"] for task in data["fitness"]])
    SearchConfig.model_validate(data.get("search", {}))


def test_there_are_examples() -> None:
    assert len(EXAMPLES) >= 3
