"""The open + closed case: a merge of the lm zoo's specialists (a local model dir) beside the hetero zoo's
served members. The two zoos share the task format and the world, not the tokenizer or architecture."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from tests.blackbox.conftest import config_dict, served_members

from evomerge.blackbox.config import BlackBoxConfig
from evomerge.blackbox.evolve import RESULT_NAME, evolve
from evomerge.blackbox.record import record
from evomerge.zoo import ZooManifest, build

pytestmark = pytest.mark.slow


def test_a_merge_joins_the_endpoints_as_a_free_member(hetero_zoo: ZooManifest, tmp_path: Path) -> None:
    from evomerge.merge.api import merge

    lm = build("lm", tmp_path / "lm", size="tiny", seed=0)
    recipe = {
        "merge_method": "task_arithmetic",
        "base_model": str(lm.base),
        "models": [{"model": str(path), "parameters": {"weight": 0.5}} for path in lm.models.values()],
        "dtype": "float32",
    }
    merged = merge(yaml.safe_dump(recipe), tmp_path / "merge")
    with served_members(hetero_zoo) as urls:
        data = config_dict(hetero_zoo, urls, tmp_path, budget={"max_evaluations": 48})
        config = BlackBoxConfig.from_dict(
            {**data, "members": [*data["members"], {"name": "merge", "model_dir": str(merged)}]}
        )
        report = record(config)
    assert report.complete and report.members["merge"].spent.calls > 0
    assert report.members["merge"].spent.cost == 0.0
    evolve(config)  # the servers are gone: replay only
    rows = json.loads((config.out / RESULT_NAME).read_text())["rows"]
    assert rows["member merge"]["test_cost_per_example"] == 0.0 and rows["member merge"]["test_calls"] > 0
    alone = [rows[f"member {name}"]["dev"] for name in [*hetero_zoo.models, "merge"]]
    assert rows["evolved"]["dev"] >= max(alone)  # each member alone is in the start population
