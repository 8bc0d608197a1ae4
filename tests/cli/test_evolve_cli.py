"""`evomerge evolve / resume / report` end to end through the CLI (typer's runner, in process)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from evomerge.cli import app, register_commands
from evomerge.runs.store import RunStore
from runs.fake_problem import build_scoreable_family

register_commands()
runner = CliRunner()


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return build_scoreable_family(tmp_path_factory.mktemp("cli"))


def write_config(path: Path, family: dict[str, Path], **overrides: object) -> Path:
    data = {
        "base_model": str(family["base"]),
        "models": [str(family["ft0"]), str(family["ft1"])],
        "merge_method": "task_arithmetic",
        "search": {"granularity": "model", "parameters": {"weight": [0, 1]}},
        "optimizer": {"population_size": 4},
        "budget": {"max_evaluations": 15},
        "fitness": [
            {"name": "sums", "dev": str(family["dev"]), "test": str(family["test"]), "metric": "perplexity"}
        ],
        **overrides,
    }
    path.write_text(yaml.safe_dump(data))
    return path


def test_evolve_then_resume_with_more_budget(tmp_path: Path, family: dict[str, Path]) -> None:
    config = write_config(tmp_path / "evolve.yaml", family)
    run_dir = tmp_path / "run"
    result = runner.invoke(app, ["evolve", str(config), "--out", str(run_dir), "--no-outputs"])
    assert result.exit_code == 0, result.output
    # the warm start: 2 sources, 4 default merges, the centre; then 2 generations of 4
    assert "15 evaluations in 2 generations" in " ".join(result.output.split())
    result = runner.invoke(app, ["resume", str(run_dir), "--max-evaluations", "19", "--no-outputs"])
    assert result.exit_code == 0, result.output
    with RunStore.in_dir(run_dir) as store:
        assert store.count_evaluations() == 19


@pytest.mark.slow
def test_report_writes_every_output(tmp_path: Path, family: dict[str, Path]) -> None:
    config = write_config(tmp_path / "evolve.yaml", family)
    result = runner.invoke(app, ["evolve", str(config), "--out", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    assert re.search(r"\| evolved[^|]* \| evolved \|", result.output)
    result = runner.invoke(app, ["report", str(tmp_path / "run"), "--no-model"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "run" / "report.html").is_file()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"merge_method": "tiez"}, "unknown method 'tiez'"),
        ({"search": {"parameters": {"weight": [0, 1], "density": [0, 1]}}}, "search.parameters.density"),
        ({"fitness": [{"dev": "/nope/dev.jsonl"}]}, "/nope/dev.jsonl does not exist"),
    ],
)
def test_bad_input_is_one_clean_error(
    tmp_path: Path, family: dict[str, Path], overrides: dict, message: str
) -> None:
    config = write_config(tmp_path / "evolve.yaml", family, **overrides)
    result = runner.invoke(app, ["evolve", str(config), "--out", str(tmp_path / "run")])
    assert result.exit_code == 2
    assert message in result.output and "Traceback" not in result.output
    assert not (tmp_path / "run").exists()


def test_out_dir_with_another_run_is_refused_then_forced(tmp_path: Path, family: dict[str, Path]) -> None:
    run_dir = tmp_path / "run"
    first = write_config(tmp_path / "a.yaml", family, budget={"max_evaluations": 2})
    assert runner.invoke(app, ["evolve", str(first), "--out", str(run_dir), "--no-outputs"]).exit_code == 0
    second = write_config(tmp_path / "b.yaml", family, budget={"max_evaluations": 2}, seed=5)
    refused = runner.invoke(app, ["evolve", str(second), "--out", str(run_dir), "--no-outputs"])
    assert refused.exit_code == 2 and "--force" in refused.output and "evomerge resume" in refused.output
    forced = runner.invoke(app, ["evolve", str(second), "--out", str(run_dir), "--no-outputs", "--force"])
    assert forced.exit_code == 0, forced.output


def test_resume_of_a_dir_that_is_no_run(tmp_path: Path) -> None:
    result = runner.invoke(app, ["resume", str(tmp_path)])
    assert result.exit_code == 2 and "not an evolve run dir" in result.output


@pytest.mark.slow
def test_demo_on_the_tiny_zoo(tmp_path: Path) -> None:
    args = [
        "demo",
        "--out",
        str(tmp_path),
        "--size",
        "tiny",
        "--evaluations",
        "8",
        "--population",
        "4",
        "--limit",
        "8",
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert re.search(r"\| evolved[^|]* \| evolved \|", result.output) and "report:" in result.output
    assert (tmp_path / "run" / "report.html").is_file() and (
        tmp_path / "run" / "best_model" / "config.json"
    ).is_file()


def test_elites_lists_the_best_first_and_export_writes_one(tmp_path: Path, family: dict[str, Path]) -> None:
    config = write_config(tmp_path / "evolve.yaml", family, budget={"max_evaluations": 11})
    run_dir = tmp_path / "run"
    assert runner.invoke(app, ["evolve", str(config), "--out", str(run_dir), "--no-outputs"]).exit_code == 0
    listed = runner.invoke(app, ["elites", str(run_dir)])
    assert listed.exit_code == 0, listed.output
    header, first = listed.output.splitlines()[:2]
    assert header.split("\t")[:4] == ["id", "niche", "what", "dev score"]
    best_id = first.split("\t")[0]
    assert first.split("\t")[1] == "best on dev"
    exported = runner.invoke(app, ["export", str(run_dir), str(tmp_path / "model"), "--elite", best_id])
    assert exported.exit_code == 0, exported.output
    assert (tmp_path / "model" / "mergekit_config.yml").is_file()
    unknown = runner.invoke(app, ["export", str(run_dir), str(tmp_path / "other"), "--elite", "g42c9"])
    assert unknown.exit_code == 2 and "no evaluation 'g42c9'" in unknown.output
    assert not (tmp_path / "other").exists()


def test_the_summary_line_warns_when_a_baseline_beats_the_run(
    tmp_path: Path, family: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    from evomerge.cli import evolve as evolve_cli
    from evomerge.runs import finalize, outputs
    from evomerge.runs.loop import RunSummary

    rows = [outputs.ResultRow("evolved", "evolved", 0.45), outputs.ResultRow("high", "source", 0.5)]
    outputs.write_results(tmp_path, rows)
    monkeypatch.setattr(finalize, "finalize", lambda run_dir: {})
    with RunStore.in_dir(tmp_path) as store:
        store.init_run({}, 0)
    summary = RunSummary(tmp_path, 3, 0, _evaluation(), "max_evaluations")
    printed: list[str] = []
    monkeypatch.setattr(evolve_cli.console, "print", lambda text, **kw: printed.append(str(text)))
    evolve_cli._finish(summary, outputs=True)
    assert "WARNING: the run's best scores 0.450 on test, below high 0.500" in printed[-1]


def _evaluation():  # type: ignore[no-untyped-def]
    import numpy as np

    from evomerge.eval.result import EvalResult
    from evomerge.runs.store import Evaluation

    return Evaluation(0, 0, np.zeros(1), "merge_method: linear\n", 0, EvalResult(0.5), 0.0)
