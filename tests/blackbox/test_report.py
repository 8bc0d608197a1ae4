"""report.html for a black-box run: `evomerge report RUN_DIR` reads the run store and result.json."""

from __future__ import annotations

import html
import json
import re
from pathlib import Path
from typing import Any

import pytest
from tests.blackbox.test_evolve import recorded  # noqa: F401 (the module fixture)
from typer.testing import CliRunner

from evomerge.blackbox.combine import Combination
from evomerge.blackbox.config import BlackBoxConfig
from evomerge.blackbox.evolve import RESULT_NAME, evolve
from evomerge.blackbox.report import genes, write_blackbox_report
from evomerge.cli import app, register_commands
from evomerge.runs.loop import RunStateError


def _cells(page: str, first: str) -> list[str]:
    """The cells of the table row whose first cell is `first`."""
    for row in re.findall(r"<tr[^>]*>(.*?)</tr>", page):
        cells = [html.unescape(c) for c in re.findall(r"<td>(.*?)</td>", row)]
        if cells and cells[0] == first:
            return cells
    raise AssertionError(f"no row {first!r}")


def test_cli_report_of_a_nsga2_run(recorded: dict[str, Any], tmp_path: Path) -> None:  # noqa: F811
    optimizer = {"name": "nsga2", "population_size": 8, "objectives": ["score", "behaviour:thrift"]}
    data = {
        **recorded,
        "out": str(tmp_path / "run"),
        "optimizer": optimizer,
        "budget": {"max_evaluations": 32},
    }
    config = BlackBoxConfig.from_dict(data)
    evolve(config)
    register_commands()
    result = CliRunner().invoke(app, ["report", str(config.out)])
    assert result.exit_code == 0, result.output
    page = (config.out / "report.html").read_text()
    assert "Fitness against evaluations" in page and page.count("data:image/png") >= 2  # fitness, stats
    rows = json.loads((config.out / RESULT_NAME).read_text())["rows"]
    assert set(rows) == {"evolved", "member upper", "member reverse", "majority vote"}
    for name, row in rows.items():  # the result table: operator, dev and test score, calls, cost
        cells = _cells(page, name)
        assert cells[1] == row["operator"] and float(cells[3]) == pytest.approx(row["test"], abs=5e-4)
        assert float(cells[2]) == pytest.approx(row["dev"], abs=5e-4) and float(cells[4]) == row["test_calls"]
    assert float(_cells(page, "member upper")[3]) == 0.5  # each expert is right on half the prompts
    assert "Operator <strong>" in page and "dev cost per example" in page


def test_report_refuses_a_dir_that_is_not_a_blackbox_run(tmp_path: Path) -> None:
    with pytest.raises(RunStateError, match="not a black-box run dir"):
        write_blackbox_report(tmp_path)


def test_genes_name_each_member(recorded: dict[str, Any]) -> None:  # noqa: F811
    config = BlackBoxConfig.from_dict(recorded)
    cascade = Combination("cascade", [1.0, 0.0], [1.0, 1.0], -5.0, [[0.0, 0.0]] * 2, [0.7], [1, 0])
    head, rows = genes(config, cascade)
    assert head[-1] == "confidence threshold"
    assert rows == [["1", config.models[1], "0.700"], ["2", config.models[0], "(answers last)"]]
    router = Combination("router", [1.0, 1.0], [1.0, 1.0], -5.0, [[1.0, 0.0, -1.0], [0.0, 0.5, 0.0]], [0.5])
    head, rows = genes(config, router)
    assert head == ["member", "up", "length/100", "bias"]  # the stub config has no confidence member
    assert rows[1] == [config.models[1], "0.00", "0.50", "0.00"]
    head, rows = genes(config, Combination("vote", [0.25, 1.0], [1.0, 1.0], -5.0, [[0.0]] * 2, [0.5]))
    assert rows == [[config.models[0], "0.250"], [config.models[1], "1.000"]]
