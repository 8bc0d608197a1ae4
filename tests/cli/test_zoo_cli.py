"""`evomerge zoo build` end to end: builds, reports, reuses on a second call, refuses bad input cleanly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from evomerge.cli import app, register_commands

register_commands()  # every command, as `evomerge` itself does
runner = CliRunner()


def test_build_digits_then_reuse(tmp_path: Path) -> None:
    out = tmp_path / "digits"
    first = runner.invoke(app, ["zoo", "build", "digits", "--out", str(out), "--seed", "4"])
    assert first.exit_code == 0, first.output
    manifest = json.loads((out / "zoo.json").read_text())
    assert manifest["name"] == "digits" and manifest["seed"] == 4 and manifest["size"] == "tiny"
    assert (out / manifest["models"]["low"] / "model.safetensors").is_file()
    assert "low: models/low" in first.output
    stamp = (out / "models" / "low" / "model.safetensors").stat().st_mtime_ns
    second = runner.invoke(app, ["zoo", "build", "digits", "--out", str(out), "--seed", "4"])
    assert second.exit_code == 0, second.output
    assert (out / "models" / "low" / "model.safetensors").stat().st_mtime_ns == stamp


@pytest.mark.slow  # ~10 s alone, more on a busy machine; tests/zoo/test_lm_zoo.py covers the lm zoo itself
def test_build_lm_tiny(tmp_path: Path) -> None:
    out = tmp_path / "lm"
    result = runner.invoke(app, ["zoo", "build", "lm", "--out", str(out), "--size", "tiny"])
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "zoo.json").read_text())
    assert set(manifest["models"]) == {"add", "reverse", "translate"}
    assert manifest["targets"] == ["multi", "compose"]
    assert (out / manifest["tasks"]["multi"]["test"]).is_file()


def test_unknown_zoo_is_a_clean_error(tmp_path: Path) -> None:
    result = runner.invoke(app, ["zoo", "build", "imagenet", "--out", str(tmp_path / "x")])
    assert result.exit_code == 2
    assert "unknown zoo 'imagenet'" in result.output and "Traceback" not in result.output


def test_foreign_out_dir_is_refused(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    result = runner.invoke(app, ["zoo", "build", "digits", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "not empty" in result.output
    assert (tmp_path / "notes.txt").read_text() == "mine"
