"""`evomerge merge CONFIG OUT_DIR` end to end: success output, options, and one clean error line with exit 2."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import typer
from safetensors.torch import load_file
from typer.testing import CliRunner

from evomerge.cli import app, register_commands
from evomerge.cli.merge import parse_size
from evomerge.zoo.random_models import FamilySpec, build_family


def write_config(directory: Path, text: str) -> Path:
    path = directory / "merge.yaml"
    path.write_text(text)
    return path


def load_state(model_dir: Path) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for file in sorted(model_dir.glob("*.safetensors")):
        state.update(load_file(file))
    return state


register_commands()
runner = CliRunner()


@pytest.fixture(scope="module")
def fam(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return build_family(tmp_path_factory.mktemp("family"), FamilySpec(n_finetunes=2))


def _dare(fam: dict[str, Path]) -> str:
    return (
        f"merge_method: dare_ties\nbase_model: {fam['base']}\nmodels:\n"
        f"  - {{model: {fam['ft0']}, parameters: {{weight: 0.5, density: 0.5}}}}\n"
        f"  - {{model: {fam['ft1']}, parameters: {{weight: 0.5, density: 0.5}}}}\n"
    )


def test_merge_command(tmp_path: Path, fam: dict[str, Path]) -> None:
    config = write_config(tmp_path, _dare(fam))
    args = [
        "merge",
        str(config),
        str(tmp_path / "a"),
        "--random-seed",
        "3",
        "--shard-size",
        "20KB",
        "--threads",
        "2",
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "dare_ties" in result.output and "seed 3" in result.output
    assert (tmp_path / "a" / "model.safetensors.index.json").is_file()
    again = runner.invoke(app, ["merge", str(config), str(tmp_path / "b"), "--random-seed", "3"])
    assert again.exit_code == 0, again.output
    first, second = load_state(tmp_path / "a"), load_state(tmp_path / "b")
    assert all(first[k].equal(second[k]) for k in first)


def test_dtype_overrides(tmp_path: Path, fam: dict[str, Path]) -> None:
    config = write_config(tmp_path, _dare(fam))
    result = runner.invoke(
        app, ["merge", str(config), str(tmp_path / "o"), "--out-dtype", "bfloat16", "--tie-break", "stable"]
    )
    assert result.exit_code == 0, result.output
    assert {str(t.dtype) for t in load_state(tmp_path / "o").values()} == {"torch.bfloat16"}


def test_errors_are_one_line_and_exit_2(tmp_path: Path, fam: dict[str, Path]) -> None:
    config = write_config(tmp_path, _dare(fam) + "parameters: {density: 2}\n")
    result = runner.invoke(app, ["merge", str(config), str(tmp_path / "out")])
    assert result.exit_code == 2
    assert "parameters.density" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "out").exists()


def test_existing_out_dir_needs_force(tmp_path: Path, fam: dict[str, Path]) -> None:
    config = write_config(tmp_path, _dare(fam))
    (tmp_path / "out").mkdir()
    refused = runner.invoke(app, ["merge", str(config), str(tmp_path / "out")])
    assert refused.exit_code == 2 and "--force" in refused.output
    forced = runner.invoke(app, ["merge", str(config), str(tmp_path / "out"), "--force"])
    assert forced.exit_code == 0, forced.output


@pytest.mark.parametrize(
    ("text", "size"), [("5GB", 5_000_000_000), ("500MB", 500_000_000), ("1.5KiB", 1536), ("1000", 1000)]
)
def test_parse_size(text: str, size: int) -> None:
    assert parse_size(text) == size


def test_parse_size_rejects_garbage() -> None:
    with pytest.raises(typer.BadParameter, match="5GB"):
        parse_size("five gigs")
