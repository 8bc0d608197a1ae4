"""`evomerge zoo build lm --hard`: the flag reaches the build as the hard fine-tune, explicit flags override it."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
from typer.testing import CliRunner

from evomerge.cli import app, register_commands
from evomerge.zoo.build import HARD, Finetune
from evomerge.zoo.manifest import ZooError

register_commands()


def test_cli_hard_passes_the_hard_finetune(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, Finetune] = {}

    def fake(name: str, out: Path, **kwargs: object) -> None:
        seen["finetune"] = kwargs["finetune"]  # type: ignore[assignment]
        raise ZooError("stop here")

    build_module = importlib.import_module("evomerge.zoo.build")  # the package re-exports the function
    monkeypatch.setattr(build_module, "build", fake)
    result = CliRunner().invoke(
        app, ["zoo", "build", "lm", "--out", str(tmp_path), "--hard", "--finetune-steps", "7"]
    )
    assert "stop here" in result.output
    assert seen["finetune"] == Finetune(steps=7, rate=HARD.rate)
