"""Export: a model dir transformers loads, with the in-memory path model's logits (fp32, < 1e-5)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from evomerge.dataflow.export import MERGEKIT_FILE, MODELING_FILE, export_path
from evomerge.dataflow.model import path_model
from evomerge.dataflow.path import PathError
from evomerge.dataflow.pool import PoolModel
from evomerge.eval.loading import load_model

from .conftest import SCALED, UNIT, a_path

IDS = torch.tensor([[1, 5, 9, 14, 3, 22, 7], [1, 8, 8, 30, 2, 11, 40]])  # (B, T)


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.inference_mode():
        return model(IDS).logits


def test_a_unit_path_exports_as_a_plain_model_of_the_source_architecture(
    pool: list[PoolModel], live: list[torch.nn.Module], tmp_path: Path
) -> None:
    from transformers import LlamaForCausalLM

    path = a_path(pool, *UNIT)
    out = export_path(path, tmp_path / "unit")
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llama" and config["num_hidden_layers"] == 6 and "auto_map" not in config
    assert not (out / MODELING_FILE).exists()
    exported = LlamaForCausalLM.from_pretrained(out).eval()
    assert (_logits(exported) - _logits(path_model(live, path))).abs().max() < 1e-5


def test_a_scaled_path_exports_with_its_model_class(
    pool: list[PoolModel], live: list[torch.nn.Module], tmp_path: Path
) -> None:
    path = a_path(pool, *SCALED)
    out = export_path(path, tmp_path / "scaled")
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "evomerge_dataflow" and config["dataflow_scales"][2] == 0.8
    exported, tokenizer = load_model(out, dtype=torch.float32)  # evomerge's loader: no remote code
    assert tokenizer is not None
    assert (_logits(exported) - _logits(path_model(live, path))).abs().max() < 1e-5


@pytest.mark.slow  # a fresh interpreter importing transformers: ~10 s
def test_plain_transformers_loads_the_scaled_export_with_trust_remote_code(
    pool: list[PoolModel], live: list[torch.nn.Module], tmp_path: Path
) -> None:
    path = a_path(pool, *SCALED)
    out = export_path(path, tmp_path / "remote")
    torch.save(_logits(path_model(live, path)), tmp_path / "expected.pt")
    script = (
        "import sys, torch; from transformers import AutoModelForCausalLM\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True).eval()\n"
        f"ids = torch.tensor({IDS.tolist()})\n"
        "with torch.inference_mode(): got = m(ids).logits\n"
        f"expected = torch.load({str(tmp_path / 'expected.pt')!r})\n"
        "assert type(m).__name__ == 'DataflowLlamaForCausalLM', type(m)\n"
        "print(float((got - expected).abs().max()))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert float(done.stdout.strip().splitlines()[-1]) < 1e-5


def test_the_mergekit_recipe_of_a_unit_path_rebuilds_the_same_weights(
    pool: list[PoolModel], tmp_path: Path
) -> None:
    from evomerge.merge.api import merge

    out = export_path(a_path(pool, *UNIT), tmp_path / "unit")
    recipe = (out / MERGEKIT_FILE).read_text()
    assert "passthrough" in recipe
    rebuilt = merge(recipe, tmp_path / "rebuilt")
    exported, again = load_file(out / "model.safetensors"), load_file(rebuilt / "model.safetensors")
    assert exported.keys() == again.keys()
    assert all(torch.equal(exported[name], again[name]) for name in exported)


def test_export_refuses_a_broken_path_before_writing(pool: list[PoolModel], tmp_path: Path) -> None:
    with pytest.raises(PathError, match="longer than max_path_length 4"):
        export_path(a_path(pool, *UNIT), tmp_path / "long", max_length=4)
    with pytest.raises(PathError, match="ends with a layer"):
        export_path(a_path(pool, (0, 0, 1.0), (1, 1, 1.0)), tmp_path / "end")
    assert not (tmp_path / "long").exists() and not (tmp_path / "end").exists()


def test_evomerge_eval_scores_a_scaled_export(
    pool: list[PoolModel], family: dict[str, Path], tmp_path: Path
) -> None:
    from typer.testing import CliRunner

    from evomerge.cli import app, register_commands

    register_commands()
    out = export_path(a_path(pool, *SCALED), tmp_path / "scaled")
    args = ["eval", str(out), "--task", str(family["dev"]), "--metric", "perplexity"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "perplexity" in result.output


def test_the_report_draws_each_position_in_its_models_colour(pool: list[PoolModel]) -> None:
    from evomerge.dataflow.draw import PALETTE, path_svg

    drawing = path_svg(a_path(pool, *SCALED), ["ft0", "ft1", "base"])
    assert drawing.count("<rect") == len(SCALED) + 2  # embeddings, the layers, the head
    assert drawing.count(f'fill="{PALETTE[1]}"') == 1 and "x0.80" in drawing and "x1.30" in drawing


@pytest.mark.parametrize("family_name", ["mistral", "qwen2"])
def test_other_llama_family_models_run_and_export_paths(family_name: str, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    from evomerge.dataflow.path import LayerPath, Step
    from evomerge.zoo.random_models import FamilySpec, build_family

    paths = build_family(tmp_path / "f", FamilySpec(family=family_name, delta_scale=0.2))  # type: ignore[arg-type]
    live = [AutoModelForCausalLM.from_pretrained(paths[n]).eval() for n in ("ft0", "ft1")]
    models = (str(paths["ft0"]), str(paths["ft1"]))
    identity = LayerPath(models, 0, tuple(Step(0, layer) for layer in range(4)))
    assert torch.equal(_logits(path_model(live, identity)), _logits(live[0]))
    path = LayerPath(models, 0, (Step(0, 0), Step(1, 1), Step(1, 1), Step(0, 2), Step(0, 3)))
    exported = AutoModelForCausalLM.from_pretrained(export_path(path, tmp_path / "out")).eval()
    assert (_logits(exported) - _logits(path_model(live, path))).abs().max() < 1e-5


def test_evomerge_serve_answers_with_a_scaled_export(pool: list[PoolModel], tmp_path: Path) -> None:
    """A scaled path export is served (through the same loader) with the evaluator's greedy answers."""
    pytest.importorskip("fastapi")
    pytest.importorskip("openai")
    from serve.helpers import client, running_server
    from serve.test_end_to_end import evaluator_answers, greedy

    out = export_path(a_path(pool, *SCALED), tmp_path / "scaled")
    prompts = ["12+7=", "3+4=", "abc", "90+1="]
    with running_server(out, name="path") as url:
        answers = [greedy(client(url, "none"), prompt, model="path") for prompt in prompts]
    assert answers == evaluator_answers(out, prompts)
