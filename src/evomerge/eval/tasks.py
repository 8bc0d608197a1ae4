"""Task files: JSONL, one example a line, checked in full at load time so a bad file fails before any model runs.

Formats (one JSON object a line, blank lines are skipped):
- `exact_match`:             `{"prompt": str, "answer": str}`
- `choice_accuracy[_norm]`:  `{"prompt": str, "answer": str, "choices": [str, ...]}`, `answer` one of `choices`
- `perplexity`:              `{"prompt": str, "answer": str}` (perplexity of the answer given the prompt)
                             or `{"text": str}` (perplexity of the whole text)
- `accuracy` (classifiers):  `{"features": [float, ...], "label": int}`

Every format takes an optional `"group": str` (e.g. the skill an example tests); the evaluator then also
reports the score of each group, so a mixed task shows which skills a model has and which it lost.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

from evomerge.errors import TaskFileError

Metric = Literal["exact_match", "choice_accuracy", "choice_accuracy_norm", "perplexity", "accuracy"]
METRICS: tuple[str, ...] = get_args(Metric)
LM_METRICS = frozenset({"exact_match", "choice_accuracy", "choice_accuracy_norm", "perplexity"})
CLASSIFIER_METRICS = frozenset({"accuracy"})


@dataclass(frozen=True)
class Example:
    """One example. Language-model fields and classifier fields are both optional; the metric says which."""

    prompt: str = ""
    answer: str = ""
    choices: tuple[str, ...] = ()
    features: tuple[float, ...] = ()
    label: int = -1
    line: int = 0  # 1-based line in the task file, 0 when built in code
    group: str | None = None  # scored apart as well as in the task's mean (TaskScore.groups)


@dataclass
class Task:
    """A named list of examples scored under one metric; `weight` counts in the evaluator's mean."""

    name: str
    metric: Metric
    examples: list[Example]
    path: Path | None = None
    weight: float = 1.0
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_metric(self.metric, where=f"task {self.name!r}")
        if not math.isfinite(self.weight) or self.weight < 0:
            raise TaskFileError(f"task {self.name!r}: weight must be a finite number >= 0, got {self.weight}")


def check_metric(metric: str, *, where: str) -> None:
    """Refuse an unknown metric name, listing the known ones."""
    if metric not in METRICS:
        raise TaskFileError(f"{where}: unknown metric {metric!r}; expected one of {', '.join(METRICS)}")


def load_task(
    path: str | Path,
    *,
    metric: str,
    limit: int | None = None,
    name: str | None = None,
    weight: float = 1.0,
    sample: int | None = None,
    seed: int = 0,
    case_fold: bool = False,
) -> Task:
    """Read and validate a JSONL task file.

    `limit` keeps the first N examples; `sample` keeps N examples drawn without replacement with `seed`
    (in file order), for a cheaper but still representative fitness. Both apply after validation of
    every line, so a broken line anywhere is reported. `case_fold` makes exact_match ignore case.
    """
    path = Path(path)
    check_metric(metric, where=str(path))
    examples = [_parse_example(record, metric, path, line) for line, record in _read_records(path)]
    if not examples:
        raise TaskFileError(f"{path}: the task file has no examples (empty or only blank lines)")
    if metric == "accuracy":
        _check_feature_sizes(examples, path)
    examples = _subset(examples, limit=limit, sample=sample, seed=seed, path=path)
    extra = {"case_fold": True} if case_fold else {}
    return Task(name or path.stem, metric, examples, path=path, weight=weight, extra=extra)  # type: ignore[arg-type]


def _read_records(path: Path) -> list[tuple[int, dict[str, Any]]]:
    if not path.is_file():
        raise TaskFileError(f"{path}: task file not found (expected a JSONL file, one example a line)")
    records = []
    with path.open(encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if line.strip():
                records.append((line_number, _parse_line(line, path, line_number)))
    return records


def _parse_line(line: str, path: Path, line_number: int) -> dict[str, Any]:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise TaskFileError(
            f"{path}:{line_number}: malformed JSON ({error.msg} at column {error.colno})"
        ) from error
    if not isinstance(record, dict):
        raise TaskFileError(f"{path}:{line_number}: expected a JSON object, got {type(record).__name__}")
    return record


def _parse_example(record: dict[str, Any], metric: str, path: Path, line: int) -> Example:
    where = f"{path}:{line}"
    group = _group(record, where)
    if metric == "accuracy":
        return _classifier_example(record, where, line, group)
    if metric == "perplexity" and "text" in record:
        return Example(prompt="", answer=_string(record, "text", where), line=line, group=group)
    prompt, answer = _string(record, "prompt", where), _string(record, "answer", where)
    choices: tuple[str, ...] = ()
    if metric.startswith("choice_accuracy"):
        choices = _choices(record, answer, where)
    return Example(prompt=prompt, answer=answer, choices=choices, line=line, group=group)


def _group(record: dict[str, Any], where: str) -> str | None:
    """The optional `group`; null counts as absent (a table exported with an empty cell)."""
    group = record.get("group")
    if group is None:
        return None
    if not isinstance(group, str) or not group:
        raise TaskFileError(f"{where}: field 'group' must be a non-empty string (or left out), got {group!r}")
    return group


def _string(record: dict[str, Any], key: str, where: str) -> str:
    if key not in record:
        raise TaskFileError(f"{where}: missing field {key!r} (fields found: {', '.join(record) or 'none'})")
    value = record[key]
    if not isinstance(value, str):
        raise TaskFileError(f"{where}: field {key!r} must be a string, got {type(value).__name__}")
    return value


def _choices(record: dict[str, Any], answer: str, where: str) -> tuple[str, ...]:
    choices = record.get("choices")
    if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) for c in choices):
        raise TaskFileError(
            f"{where}: field 'choices' must be a list of two or more strings, got {choices!r}"
        )
    if answer not in choices:
        raise TaskFileError(f"{where}: answer {answer!r} is not among choices {choices!r}")
    return tuple(choices)


def _classifier_example(record: dict[str, Any], where: str, line: int, group: str | None) -> Example:
    for key in ("features", "label"):
        if key not in record:
            raise TaskFileError(
                f"{where}: missing field {key!r} (fields found: {', '.join(record) or 'none'})"
            )
    features, label = record["features"], record["label"]
    if not isinstance(features, list) or not features or not all(_is_number(v) for v in features):
        raise TaskFileError(f"{where}: field 'features' must be a non-empty list of numbers")
    if not isinstance(label, int) or isinstance(label, bool) or label < 0:
        raise TaskFileError(f"{where}: field 'label' must be an integer >= 0, got {label!r}")
    return Example(features=tuple(float(v) for v in features), label=label, line=line, group=group)


def _check_feature_sizes(examples: list[Example], path: Path) -> None:
    size = len(examples[0].features)
    for example in examples:
        if len(example.features) != size:
            raise TaskFileError(
                f"{path}:{example.line}: {len(example.features)} features, but line {examples[0].line} has {size}"
            )


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _subset(
    examples: list[Example], *, limit: int | None, sample: int | None, seed: int, path: Path
) -> list[Example]:
    for label, value in (("limit", limit), ("sample", sample)):
        if value is not None and value < 1:
            raise TaskFileError(f"{path}: {label} must be >= 1, got {value}")
    if sample is not None and sample < len(examples):
        keep = sorted(random.Random(seed).sample(range(len(examples)), sample))
        examples = [examples[index] for index in keep]
    return examples[:limit] if limit is not None else examples
