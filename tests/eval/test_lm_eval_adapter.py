"""lm-eval-harness adapter, on local task YAMLs over local JSONL files (no hub), checked against our own metrics."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from evomerge.errors import EvaluationError
from evomerge.eval.evaluator import Evaluator
from evomerge.eval.generation import generate_one_by_one
from evomerge.eval.tasks import Example, Task

from .helpers import write_jsonl

pytest.importorskip("lm_eval", reason="the lm-eval extra is not installed")

QUESTIONS = ["1+2=", "2+2=", "abc", "hello", "x=", "9*9="]
CHOICES = [["3", "4"], ["3", "4"], ["d", "e", "f"], ["world", "there"], ["1", "2", "yes"], ["81", "18"]]
LABELS = [0, 1, 2, 0, 1, 0]

MC_YAML = """task: evomerge_test_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""

GEN_YAML = """task: evomerge_test_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 8
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""


@pytest.fixture
def task_dir(tmp_path: Path, lm: Any, tokenizer: Any, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with torch.inference_mode():
        said = generate_one_by_one(lm, tokenizer, QUESTIONS, max_new_tokens=8)
    answers = [s if i % 2 == 0 else s + "#" for i, s in enumerate(said)]  # half right, half wrong
    records = [
        {"question": q, "choices": c, "label": label, "answer": a}
        for q, c, label, a in zip(QUESTIONS, CHOICES, LABELS, answers, strict=True)
    ]
    data = write_jsonl(tmp_path / "data.jsonl", records)
    (tmp_path / "mc.yaml").write_text(MC_YAML.format(data=data), encoding="utf-8")
    (tmp_path / "gen.yaml").write_text(GEN_YAML.format(data=data), encoding="utf-8")
    return tmp_path


@pytest.mark.slow
def test_lm_eval_scores_match_our_evaluator(lm: Any, tokenizer: Any, task_dir: Path) -> None:
    from evomerge.eval.lm_eval_adapter import evaluate_lm_eval

    result = evaluate_lm_eval(
        lm,
        tokenizer,
        ["evomerge_test_mc", "evomerge_test_gen"],
        include_path=task_dir,
        include_defaults=False,
    )
    assert result.ok, result.error
    mc, gen = result.tasks["evomerge_test_mc"], result.tasks["evomerge_test_gen"]
    assert (mc.metric, gen.metric) == ("lm-eval:acc", "lm-eval:exact_match")
    assert gen.per_example == [1.0, 0.0, 1.0, 0.0, 1.0, 0.0]
    # lm-eval joins question and choice with a space: the same pairs through our evaluator give the same answers.
    ours = Task(
        name="mc",
        metric="choice_accuracy",
        examples=[
            Example(prompt=q, answer=" " + c[label], choices=tuple(" " + x for x in c))
            for q, c, label in zip(QUESTIONS, CHOICES, LABELS, strict=True)
        ],
    )
    assert mc.per_example == Evaluator([ours], tokenizer=tokenizer).evaluate(lm).tasks["mc"].per_example
    assert mc.score == pytest.approx(sum(mc.per_example) / 6)
    assert result.score == pytest.approx((mc.score + gen.score) / 2)


def test_unknown_task_is_an_error_before_any_work(lm: Any, tokenizer: Any, tmp_path: Path) -> None:
    from evomerge.eval.lm_eval_adapter import evaluate_lm_eval

    with pytest.raises(EvaluationError, match=r"unknown lm-eval task\(s\) \['no_such_task'\]"):
        evaluate_lm_eval(lm, tokenizer, ["no_such_task"], include_path=tmp_path, include_defaults=False)
