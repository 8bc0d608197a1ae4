"""Record the hetero zoo's served members once, evolve their combination twice (the second with no HTTP)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tests.blackbox.conftest import config_dict, served_members

from evomerge.blackbox.config import BlackBoxConfig
from evomerge.blackbox.evolve import RESULT_NAME, evolve
from evomerge.blackbox.record import record
from evomerge.zoo import ZooManifest

pytestmark = pytest.mark.slow


def test_recorded_once_then_evolved_offline_never_below_a_member(
    hetero_zoo: ZooManifest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with served_members(hetero_zoo) as urls:
        config = BlackBoxConfig.from_dict(config_dict(hetero_zoo, urls, tmp_path, concurrency=1))
        report = record(config)
        assert report.complete and all(m.spent.calls > 0 for m in report.members.values())
        again = record(config)  # everything cached: no new call
        assert all(m.spent.calls == 0 and m.hits > 0 for m in again.members.values())
        assert again.members["llama"].hit_value == pytest.approx(report.members["llama"].spent.cost)
    # The servers are gone, and no client may even be built: evolving is replay only.
    import evomerge.eval.endpoint as endpoint

    def no_client(*args: object, **kwargs: object) -> None:
        raise AssertionError("evolve built an endpoint client")

    monkeypatch.setattr(endpoint.EndpointClient, "__init__", no_client)
    first = evolve(config)
    rows = json.loads((tmp_path / "run" / RESULT_NAME).read_text())["rows"]
    # Each member alone is in the warm start, so on dev (what the search sees) the evolved combination is
    # never below one. The tiny zoo's 8 test prompts per skill are too few for a claim on test: the small
    # zoo's benchmark (benchmarks/blackbox.py) and the stub members of test_evolve.py make that one.
    best_member = max(rows[f"member {name}"]["dev"] for name in hetero_zoo.models)
    assert rows["evolved"]["dev"] >= best_member, rows
    second = evolve(config)  # the same run: every evaluation comes from the store
    assert second.evaluations == first.evaluations
    assert json.loads((tmp_path / "run" / RESULT_NAME).read_text())["rows"] == rows


def test_local_model_dir_member_answers_as_its_endpoint(hetero_zoo: ZooManifest, tmp_path: Path) -> None:
    with served_members(hetero_zoo) as urls:
        data = config_dict(hetero_zoo, urls, tmp_path)
        local = {"name": "llama_dir", "model_dir": str(hetero_zoo.models["llama"])}
        config = BlackBoxConfig.from_dict({**data, "members": [*data["members"], local]})
        report = record(config)
    assert report.complete and report.members["llama_dir"].spent.cost == 0.0
    import sqlite3

    with sqlite3.connect(config.cache) as db:
        rows = db.execute(
            "SELECT member, request, response FROM responses WHERE member LIKE 'llama%'"
        ).fetchall()
    texts: dict[str, dict[str, str]] = {}
    for member, request, response in rows:
        texts.setdefault(member, {})[json.loads(request)["prompt"]] = json.loads(response)["text"]
    assert texts["llama"] == texts["llama_dir"] and len(texts["llama"]) == 48
