"""Task files: every malformed input gets an error naming the file, the line and the fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from evomerge.errors import TaskFileError
from evomerge.eval.tasks import Task, load_task

from .helpers import write_jsonl


def _write(tmp_path: Path, text: str, name: str = "task.jsonl") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_loads_examples_with_line_numbers(tmp_path: Path) -> None:
    path = _write(tmp_path, '{"prompt": "1+1=", "answer": "2"}\n\n{"prompt": "é", "answer": ""}\n')
    task = load_task(path, metric="exact_match", weight=2.0)
    assert (task.name, task.metric, task.weight, task.path) == ("task", "exact_match", 2.0, path)
    assert [(e.prompt, e.answer, e.line) for e in task.examples] == [("1+1=", "2", 1), ("é", "", 3)]
    assert task.extra == {} and load_task(path, metric="exact_match", case_fold=True).extra == {
        "case_fold": True
    }


@pytest.mark.parametrize(
    ("text", "metric", "expected"),
    [
        (
            '{"prompt": "a", "answer": "b"}\n{"prompt": "a", "answer": \n',
            "exact_match",
            r":2: malformed JSON",
        ),
        ('{"prompt": "a", "answer": "b"}\n[1, 2]\n', "exact_match", r":2: expected a JSON object"),
        ('{"answer": "b"}\n', "exact_match", r":1: missing field 'prompt'"),
        ('{"prompt": "a"}\n', "exact_match", r":1: missing field 'answer'"),
        ('{"prompt": "a", "answer": 3}\n', "exact_match", r":1: field 'answer' must be a string"),
        ('{"prompt": "a", "answer": "b"}\n', "choice_accuracy", r":1: field 'choices' must be a list"),
        (
            '{"prompt": "a", "answer": "b", "choices": ["c", "d"]}\n',
            "choice_accuracy",
            r"'b' is not among choices",
        ),
        (
            '{"prompt": "a", "answer": "b", "choices": ["b", 1]}\n',
            "choice_accuracy_norm",
            r"list of two or more",
        ),
        ('{"label": 1}\n', "accuracy", r":1: missing field 'features'"),
        ('{"features": [1.0]}\n', "accuracy", r":1: missing field 'label'"),
        ('{"features": [1, "x"], "label": 1}\n', "accuracy", r"non-empty list of numbers"),
        ('{"features": [1, 2], "label": -1}\n', "accuracy", r"'label' must be an integer >= 0"),
        ('{"features": [1, 2], "label": 0}\n{"features": [1], "label": 0}\n', "accuracy", r":2: 1 features"),
        ('{"prompt": "a"}\n', "perplexity", r"missing field 'answer'"),
        (
            '{"prompt": "a", "answer": "b"}\n{"prompt": "a", "answer": "b", "group": 3}\n',
            "exact_match",
            r":2: field 'group' must be a non-empty string",
        ),
        ('{"text": "a", "group": ["x"]}\n', "perplexity", r":1: field 'group' must be"),
        ('{"features": [1, 2], "label": 0, "group": ""}\n', "accuracy", r":1: field 'group' must be"),
    ],
)
def test_bad_lines_are_located(tmp_path: Path, text: str, metric: str, expected: str) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(TaskFileError, match=expected) as caught:
        load_task(path, metric=metric)
    assert str(path) in str(caught.value)


@pytest.mark.parametrize("text", ["", "\n  \n\n"])
def test_empty_file_is_refused(tmp_path: Path, text: str) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(TaskFileError, match="no examples"):
        load_task(path, metric="exact_match")


def test_missing_file_and_unknown_metric(tmp_path: Path) -> None:
    with pytest.raises(TaskFileError, match="task file not found"):
        load_task(tmp_path / "nope.jsonl", metric="exact_match")
    path = _write(tmp_path, '{"prompt": "a", "answer": "b"}\n')
    with pytest.raises(TaskFileError, match="unknown metric 'bleu'; expected one of exact_match"):
        load_task(path, metric="bleu")


def test_perplexity_accepts_text_records(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "lm.jsonl", [{"text": "hello"}, {"prompt": "a", "answer": "b"}])
    task = load_task(path, metric="perplexity")
    assert [(e.prompt, e.answer) for e in task.examples] == [("", "hello"), ("a", "b")]


def test_classifier_examples(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "digits.jsonl", [{"features": [0, 1.5], "label": 3}])
    (example,) = load_task(path, metric="accuracy").examples
    assert (example.features, example.label) == ((0.0, 1.5), 3)


@pytest.mark.parametrize(
    ("metric", "fields"),
    [
        ("exact_match", {"prompt": "a", "answer": "b"}),
        ("choice_accuracy", {"prompt": "a", "answer": "b", "choices": ["b", "c"]}),
        ("perplexity", {"text": "ab"}),
        ("accuracy", {"features": [0.5], "label": 1}),
    ],
)
def test_groups_are_read_for_every_metric(tmp_path: Path, metric: str, fields: dict[str, object]) -> None:
    records = [{**fields, "group": "add"}, fields, {**fields, "group": None}, {**fields, "group": "rev"}]
    path = write_jsonl(tmp_path / "t.jsonl", records)
    assert [e.group for e in load_task(path, metric=metric).examples] == ["add", None, None, "rev"]


def test_limit_and_seeded_sample(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "t.jsonl", [{"prompt": str(i), "answer": str(i)} for i in range(50)])
    assert [e.prompt for e in load_task(path, metric="exact_match", limit=3).examples] == ["0", "1", "2"]
    first = [e.line for e in load_task(path, metric="exact_match", sample=10, seed=1).examples]
    again = [e.line for e in load_task(path, metric="exact_match", sample=10, seed=1).examples]
    other = [e.line for e in load_task(path, metric="exact_match", sample=10, seed=2).examples]
    assert first == again and first != other and first == sorted(first) and len(set(first)) == 10
    with pytest.raises(TaskFileError, match="limit must be >= 1"):
        load_task(path, metric="exact_match", limit=0)


def test_bad_line_anywhere_is_reported_even_with_a_limit(tmp_path: Path) -> None:
    path = _write(tmp_path, '{"prompt": "a", "answer": "b"}\n' * 5 + "{oops\n")
    with pytest.raises(TaskFileError, match=":6: malformed JSON"):
        load_task(path, metric="exact_match", limit=2)


def test_task_refuses_a_negative_weight() -> None:
    with pytest.raises(TaskFileError, match="weight must be a finite number >= 0"):
        Task(name="t", metric="exact_match", examples=[], weight=-1.0)
