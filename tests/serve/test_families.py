"""Any model dir evomerge loads can be served: the zoo's Llama, Mistral, Qwen2 and GPT-2 families, a merge."""

from __future__ import annotations

from pathlib import Path

import pytest
from tests.eval import helpers as eval_helpers

from evomerge.zoo.random_models import FamilySpec, build_family

from .helpers import PROMPTS, client, running_server
from .test_end_to_end import evaluator_answers, greedy

ASCII_PROMPTS = [prompt for prompt in PROMPTS if prompt.isascii()]


def _with_tokenizer(paths: dict[str, Path]) -> dict[str, Path]:
    tokenizer = eval_helpers.char_tokenizer()  # 55 ids, below the families' vocabulary of 96
    for path in paths.values():
        tokenizer.save_pretrained(path)
    return paths


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "gpt2"])
def test_each_family_serves_the_evaluators_answers(tmp_path: Path, family: str) -> None:
    spec = FamilySpec(family=family, n_finetunes=0, overrides={"initializer_range": 0.3})
    model_dir = _with_tokenizer(build_family(tmp_path, spec))["base"]
    with running_server(model_dir, name=family) as url:
        answers = [greedy(client(url, "none"), prompt, model=family) for prompt in ASCII_PROMPTS]
    assert answers == evaluator_answers(model_dir, ASCII_PROMPTS)
    assert len(set(answers)) > 1


def test_a_merged_model_is_served(tmp_path: Path) -> None:
    from evomerge.merge.api import merge

    paths = _with_tokenizer(build_family(tmp_path / "family", FamilySpec(n_finetunes=2, delta_scale=0.3)))
    recipe = f"""
merge_method: linear
models:
  - model: {paths["ft0"]}
    parameters: {{weight: 0.5}}
  - model: {paths["ft1"]}
    parameters: {{weight: 0.5}}
dtype: float32
"""
    merged = merge(recipe, tmp_path / "merged")
    with running_server(merged, name="merged") as url:
        answers = [greedy(client(url, "none"), prompt, model="merged") for prompt in ASCII_PROMPTS]
    assert answers == evaluator_answers(merged, ASCII_PROMPTS)
