"""mergekit-evolve configs read unchanged: the documented example runs, the rest maps or is refused by name."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from evomerge.errors import ConfigError
from evomerge.runs.mergekit_evolve import from_mergekit_evolve, load_evolve_config
from evomerge.runs.store import RunStore
from evomerge.zoo.random_models import FamilySpec

from .fake_problem import build_scoreable_family

# mergekit's docs/evolve.md "Configuration" example, its model names substituted by the fixture's dirs
# (its `filters: ...` line is a placeholder there, and its `model_n` an ellipsis, so both are left out).
DOCUMENTED = """genome:
    models:
       - {ft0}
       - {ft1}
    merge_method: dare_ties
    base_model: {base}
    tokenizer_source: null # optional
    layer_granularity: 8

    # optional:
    normalize: false
    allow_negative_weights: false
    smooth: false
tasks:
  - name: {task}
    weight: 1.0 # optional
    metric: "acc,none" # defaults to acc,none
"""

MC_YAML = """task: evomerge_mergekit_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{prompt}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: 0
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    spec = FamilySpec(delta_scale=0.05, overrides={"num_hidden_layers": 8})
    return build_scoreable_family(tmp_path_factory.mktemp("mergekit_evolve"), spec)


def documented(root: Path, family: dict[str, Path], task: str = "evomerge_mergekit_mc") -> Path:
    path = root / "evol_config.yml"
    path.write_text(DOCUMENTED.format(task=task, **{k: family[k] for k in ("base", "ft0", "ft1")}))
    return path


def task_folder(root: Path, family: dict[str, Path]) -> Path:
    folder = root / "tasks"
    folder.mkdir()
    lines = [json.loads(line) for line in family["dev"].read_text().splitlines()]
    records = [{"prompt": x["prompt"], "choices": [x["answer"], x["answer"] + "0"]} for x in lines]
    (folder / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (folder / "mc.yaml").write_text(MC_YAML.format(data=folder / "data.jsonl"))
    return folder


def test_the_documented_example_maps_onto_an_evomerge_config(tmp_path: Path, family: dict[str, Path]) -> None:
    config = load_evolve_config(documented(tmp_path, family), task_search_path=tmp_path)
    assert (config.merge_method, config.base_model, config.models) == (
        "dare_ties",
        family["base"].resolve(),
        [family["ft0"].resolve(), family["ft1"].resolve()],
    )
    assert (config.search.granularity, config.search.group_size) == ("group", 8)
    assert config.search.parameters == {"weight": (0.0, 1.0), "density": None}
    assert config.search.fixed == {"normalize": False}
    (task,) = config.fitness
    assert (task.lm_eval, task.weight, task.lm_eval_metric, task.include_path) == (
        "evomerge_mergekit_mc",
        1.0,
        "acc",
        tmp_path.resolve(),
    )


@pytest.mark.slow
def test_the_documented_example_runs(
    tmp_path: Path, family: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    from evomerge.cli import app, register_commands

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    register_commands()
    folder = task_folder(tmp_path, family)
    args = [
        "evolve", str(documented(tmp_path, family)), "--out", str(tmp_path / "run"),
        "--task-search-path", str(folder), "--max-evaluations", "3", "--no-outputs",
    ]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    with RunStore.in_dir(tmp_path / "run") as store:
        evaluations = store.evaluations()
    assert len(evaluations) == 3 and all(e.result.ok for e in evaluations)
    assert all(e.result.tasks["evomerge_mergekit_mc"].n_examples == 12 for e in evaluations)


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"genome": {"tokenizer_source": "base"}}, "genome.tokenizer_source"),
        ({"genome": {"filters": ["self_attn", "mlp"]}}, "genome.filters"),
        ({"genome": {"smooth": True}}, "genome.smooth"),
        ({"random_init": True}, "random_init"),
        ({"apply_chat_template": True}, "apply_chat_template"),
        ({"genome": {"merge_method": "della"}}, "genome.merge_method"),
        ({"genome": {"layer_size": 3}}, "genome.layer_size"),
        ({"tasks": [{"name": "x", "metric": "exact_match,strict-match"}]}, "strict-match"),
    ],
)
def test_what_has_no_equivalent_is_refused_by_name(
    tmp_path: Path, family: dict[str, Path], change: dict[str, Any], named: str
) -> None:
    data = yaml.safe_load(documented(tmp_path, family).read_text())
    data["genome"] |= change.pop("genome", {})
    data |= change
    with pytest.raises(ConfigError, match=named):
        from_mergekit_evolve(data)


def test_granularity_weights_and_normalize_as_mergekit_reads_them(family: dict[str, Path]) -> None:
    genome = {"models": [str(family["ft0"]), str(family["ft1"])], "merge_method": "linear"}
    mapped = from_mergekit_evolve({"genome": {**genome, "allow_negative_weights": True}, "tasks": ["t"]})
    assert mapped["base_model"] == str(family["ft0"])  # no base: the first model is the architecture
    assert mapped["search"] == {
        "parameters": {"weight": (-1.0, 1.0)},
        "granularity": "model",
        "fixed": {"normalize": True},
    }
    assert mapped["fitness"] == [{"lm_eval": "t", "weight": 1.0, "metric": "acc"}]
