"""Evolving from the cache: NSGA-II over score and cost, resume equals an uninterrupted run, the CLI."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from tests.blackbox.stubs import stub_config, write_tasks
from tests.blackbox.test_record import stubs
from typer.testing import CliRunner

from evomerge.blackbox.config import BlackBoxConfig
from evomerge.blackbox.evolve import RESULT_NAME, evolve
from evomerge.blackbox.record import record
from evomerge.cli import app, register_commands
from evomerge.runs.store import RunStore


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("recorded")
    with stubs() as urls:
        data = stub_config(urls, write_tasks(tmp / "tasks"), tmp)
        data["members"][1] |= {"price_input": 5e-6, "price_output": 5e-6}  # reverse is dearer
        assert record(BlackBoxConfig.from_dict(data)).complete
    return data  # the servers are gone: everything below replays


def _with(data: dict[str, Any], out: Path, **extra: Any) -> BlackBoxConfig:
    return BlackBoxConfig.from_dict({**data, "out": str(out), **extra})


def test_nsga2_front_is_not_dominated_on_score_and_cost(recorded: dict[str, Any], tmp_path: Path) -> None:
    optimizer = {"name": "nsga2", "population_size": 8, "objectives": ["score", "behaviour:thrift"]}
    config = _with(recorded, tmp_path / "run", optimizer=optimizer, budget={"max_evaluations": 64})
    evolve(config)
    with RunStore.in_dir(config.out) as store:
        points = {(e.result.score, e.result.behaviour["thrift"]) for e in store.evaluations() if e.result.ok}
        front = {(e.result.score, e.result.behaviour["thrift"]) for _, e in store.elites()}
    assert front and len(points) > len(front)
    for score, thrift in front:
        assert not any(s >= score and t >= thrift and (s, t) != (score, thrift) for s, t in points)
    assert max(t for _, t in front) == max(t for _, t in points)  # the cheapest member alone is on it


def test_resumed_run_equals_uninterrupted(recorded: dict[str, Any], tmp_path: Path) -> None:
    straight = _with(recorded, tmp_path / "straight", budget={"max_evaluations": 48})
    evolve(straight)
    evolve(_with(recorded, tmp_path / "resumed", budget={"max_evaluations": 21}))
    evolve(_with(recorded, tmp_path / "resumed", budget={"max_evaluations": 48}))  # same run, bigger budget
    runs = []
    for out in ("straight", "resumed"):
        with RunStore.in_dir(tmp_path / out) as store:
            runs.append([(e.generation, e.index, e.recipe, e.result.score) for e in store.evaluations()])
    assert len(runs[0]) == 48 and runs[0] == runs[1]


def test_cli_record_then_evolve(recorded: dict[str, Any], tmp_path: Path) -> None:
    register_commands()
    path = tmp_path / "blackbox.yaml"
    path.write_text(yaml.safe_dump({**recorded, "out": str(tmp_path / "run")}))
    runner = CliRunner()
    replay = runner.invoke(app, ["blackbox", "record", str(path), "--replay-only"])
    assert replay.exit_code == 0, replay.output
    assert "0 calls" in replay.output and "24 cache hits" in replay.output
    evolved = runner.invoke(app, ["blackbox", "evolve", str(path)])
    assert evolved.exit_code == 0, evolved.output
    assert "evolved" in evolved.output and (tmp_path / "run" / RESULT_NAME).is_file()
    rows = json.loads((tmp_path / "run" / RESULT_NAME).read_text())["rows"]
    assert rows["evolved"]["test"] == 1.0


def test_cli_names_the_unpriced_member(recorded: dict[str, Any], tmp_path: Path) -> None:
    register_commands()
    data = {**recorded, "record_budget": {"max_cost": 0.01}}
    data["members"] = [dict(m) for m in recorded["members"]]
    del data["members"][0]["price_input"]
    path = tmp_path / "blackbox.yaml"
    path.write_text(yaml.safe_dump(data))
    result = CliRunner().invoke(app, ["blackbox", "record", str(path)])
    assert result.exit_code == 2 and "upper" in result.output and "price" in result.output


def test_cli_elites_and_export_read_a_blackbox_run(recorded: dict[str, Any], tmp_path: Path) -> None:
    from evomerge.blackbox.combine import EXPORT_NAME, Combination
    from evomerge.blackbox.serve import load_combination

    register_commands()
    config = _with(recorded, tmp_path / "run")
    evolve(config)
    runner = CliRunner()
    listed = runner.invoke(app, ["elites", str(tmp_path / "run")])
    assert listed.exit_code == 0, listed.output
    best = listed.output.splitlines()[1].split("\t")
    assert best[1] == "best on dev" and float(best[3]) == 1.0, listed.output
    for elite in (best[0], "w1"):  # the best, and any evaluation by its id (w1: the second member alone)
        out = tmp_path / f"export-{elite}"
        exported = runner.invoke(app, ["export", str(tmp_path / "run"), str(out), "--elite", elite])
        assert exported.exit_code == 0, exported.output
        with RunStore.in_dir(tmp_path / "run") as store:
            chosen = next(e for e in store.evaluations() if e.key == elite)
        served_config, served = load_combination(out)
        assert (
            served
            == Combination.from_text(chosen.recipe)
            == Combination.from_text((out / EXPORT_NAME).read_text())
        )
        assert served_config.identity() == config.identity()
    unknown = runner.invoke(app, ["export", str(tmp_path / "run"), str(tmp_path / "x"), "--elite", "g99c0"])
    assert unknown.exit_code != 0 and "g99c0" in unknown.output and not (tmp_path / "x").exists()


def test_serving_a_broken_export_names_the_file(recorded: dict[str, Any], tmp_path: Path) -> None:
    from evomerge.blackbox.combine import EXPORT_NAME, BlackBoxSpace
    from evomerge.blackbox.serve import load_combination
    from evomerge.errors import ConfigError

    config = _with(recorded, tmp_path / "run")
    space = BlackBoxSpace(config)
    out = space.export(space.to_text(space.decode(space.source_genomes()[0])), tmp_path / "export", seed=0)
    assert load_combination(out)[1] == space.decode(space.source_genomes()[0])
    for broken, expected in (
        ("{not json", "not a combination"),
        ('{"operator": "vote"}', "not a combination"),
    ):
        (out / EXPORT_NAME).write_text(broken)
        with pytest.raises(ConfigError, match=expected) as error:
            load_combination(out)
        assert EXPORT_NAME in str(error.value)
    three = json.loads(space.to_text(space.decode(space.source_genomes()[0])))
    three["vote"] = [*three["vote"], 1.0]
    (out / EXPORT_NAME).write_text(json.dumps(three))
    with pytest.raises(ConfigError, match=r"3 members, but blackbox\.yaml beside it lists 2"):
        load_combination(out)
