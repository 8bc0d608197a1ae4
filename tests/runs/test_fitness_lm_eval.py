"""lm-eval-harness tasks in the evolve config: the same per-example scores as the Python adapter."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from evomerge.errors import ConfigError
from evomerge.merge.config import MergeConfig
from evomerge.runs.loop import load_tasks, make_backend

from .fake_problem import build_scoreable_family, make_config

pytest.importorskip("lm_eval", reason="the lm-eval extra is not installed")

GEN_YAML = """task: evomerge_fitness_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 4
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return build_scoreable_family(tmp_path_factory.mktemp("lm_eval_fitness"))


def task_dir(root: Path, family: dict[str, Path], answers: list[str] | None = None) -> Path:
    """A local lm-eval task over the family's dev prompts (with `answers` instead of theirs, if given)."""
    folder = root / ("lm_eval_tasks" if answers is None else "lm_eval_tasks_answered")
    folder.mkdir()
    lines = [json.loads(line) for line in family["dev"].read_text().splitlines()]
    for line, answer in zip(lines, answers or [], strict=False):
        line["answer"] = answer
    (folder / "data.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    (folder / "gen.yaml").write_text(GEN_YAML.format(data=folder / "data.jsonl"))
    return folder


def merge_recipe(family: dict[str, Path]) -> MergeConfig:
    return MergeConfig.from_dict(
        {
            "merge_method": "task_arithmetic",
            "base_model": str(family["base"]),
            "models": [{"model": str(family[n]), "parameters": {"weight": 0.5}} for n in ("ft0", "ft1")],
            "dtype": "float32",
        }
    )


def said_by_the_merge(family: dict[str, Path], root: Path) -> list[str]:
    """What the merge answers to each dev prompt, every second answer spoilt."""
    import torch

    from evomerge.eval.generation import generate_one_by_one
    from evomerge.eval.loading import load_model
    from evomerge.merge.api import merge

    model, tokenizer = load_model(merge(merge_recipe(family), root / "merged", random_seed=0))
    prompts = [json.loads(line)["prompt"] for line in family["dev"].read_text().splitlines()]
    with torch.inference_mode():
        said = generate_one_by_one(model, tokenizer, prompts, max_new_tokens=4)
    return [s if i % 2 == 0 else s + "#" for i, s in enumerate(said)]


@pytest.mark.slow
def test_an_lm_eval_local_task_as_fitness_scores_like_the_adapter(
    tmp_path: Path, family: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    from evomerge.eval.lm_eval_adapter import evaluate_lm_eval

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    folder = task_dir(tmp_path, family, answers=said_by_the_merge(family, tmp_path))
    entry = {"name": "sums", "lm_eval": "evomerge_fitness_gen", "include_path": str(folder), "limit": 8}
    config = make_config(
        tmp_path, family, fitness=[entry], optimizer={"name": "random", "population_size": 4}
    )
    recipe = merge_recipe(family)
    backend = make_backend(config)
    try:
        (result,) = backend.evaluate_batch([recipe], [0])
        assert result.ok, result.error
        model, tokenizer = backend.model, backend.evaluator.tokenizer  # type: ignore[attr-defined]
        direct = evaluate_lm_eval(
            model, tokenizer, ["evomerge_fitness_gen"], include_path=folder, include_defaults=False, limit=8
        )
    finally:
        backend.close()
    assert list(result.tasks) == ["sums"] and result.tasks["sums"].n_examples == 8
    assert result.tasks["sums"].per_example == direct.tasks["evomerge_fitness_gen"].per_example
    assert result.score == pytest.approx(direct.score)
    assert result.tasks["sums"].per_example == [1.0, 0.0] * 4  # half the answers are what the merge says


def test_an_lm_eval_entry_is_checked_when_the_config_is_read(tmp_path: Path, family: dict[str, Path]) -> None:
    folder = task_dir(tmp_path, family)
    entry = {"lm_eval": "evomerge_fitness_gen", "include_path": str(folder)}
    config = make_config(tmp_path, family, fitness=[entry])
    (task,) = load_tasks(config)
    assert (task.name, task.task, task.metric, task.include_path) == (
        "evomerge_fitness_gen",
        "evomerge_fitness_gen",
        None,
        folder.resolve(),
    )
    with pytest.raises(ConfigError, match="one of them"):
        make_config(tmp_path, family, fitness=[{"name": "x"}])
    with pytest.raises(ConfigError, match="no held-out split"):
        make_config(tmp_path, family, fitness=[{**entry, "test": str(family["test"])}])
    with pytest.raises(ConfigError, match="racing: lm-eval tasks"):
        make_config(tmp_path, family, fitness=[entry], racing={})
