"""Score an in-memory model on lm-eval-harness tasks and get an EvalResult back, per-example scores included.

lm-eval is an optional extra (`pip install evomerge[lm-eval]`), imported only when this is called.
Local tasks need no hub: a YAML with `dataset_path: json` and `dataset_kwargs: {data_files: ...}` in a
folder passed as `include_path`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from evomerge.errors import EvaluationError
from evomerge.eval.result import EvalResult, TaskScore

_NOT_METRICS = {"alias", "name", "sample_len", "samples"}


def evaluate_lm_eval(
    model: Any,
    tokenizer: Any,
    tasks: Sequence[str],
    *,
    include_path: str | Path | None = None,
    include_defaults: bool = True,
    limit: int | None = None,
    num_fewshot: int | None = None,
    batch_size: int = 16,
    weights: dict[str, float] | None = None,
    metrics: dict[str, str] | None = None,
) -> EvalResult:
    """Run lm-eval `tasks` on `model` (a transformers causal LM in memory) and return one EvalResult.

    Each task's score is its first metric (as its YAML lists them, e.g. `acc` or `exact_match`); the score
    of the result is the weighted mean over tasks; `metrics` names another of a task's metrics. Unknown task names raise EvaluationError before any
    work; a failure while the model runs gives `EvalResult.failed`, as the built-in evaluator does.
    `include_defaults=False` skips indexing lm-eval's thousands of built-in tasks (seconds saved).
    """
    harness = _import_lm_eval()
    manager = harness.TaskManager(
        include_path=str(include_path) if include_path else None, include_defaults=include_defaults
    )
    _check_task_names(tasks, manager)
    start = time.perf_counter()
    try:
        lm = harness.HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=_device(model))
        output = harness.simple_evaluate(
            model=lm, tasks=list(tasks), task_manager=manager, limit=limit, num_fewshot=num_fewshot,
            log_samples=True, bootstrap_iters=0,
        )  # fmt: skip
        result = _to_result(output, tasks, weights or {}, metrics or {})
    except Exception as error:  # a failure of the model is a failed result, as in Evaluator.evaluate
        result = EvalResult.failed(f"{type(error).__name__}: {error}")
    result.cost = {**result.cost, "wall_s": time.perf_counter() - start}
    return result


class _Harness:
    """The three lm-eval entry points this adapter uses, imported lazily."""

    def __init__(self) -> None:
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager

        self.simple_evaluate, self.HFLM, self.TaskManager = simple_evaluate, HFLM, TaskManager


def _import_lm_eval() -> _Harness:
    try:
        return _Harness()
    except ImportError as error:
        raise EvaluationError(
            f"scoring on lm-eval-harness tasks needs lm-eval ({error}); install it with `pip install evomerge[lm-eval]`"
        ) from error


def _check_task_names(tasks: Sequence[str], manager: Any) -> None:
    if not tasks:
        raise EvaluationError("evaluate_lm_eval needs at least one task name")
    known = set(manager.all_tasks)
    unknown = [name for name in tasks if name not in known]
    if unknown:
        raise EvaluationError(
            f"unknown lm-eval task(s) {unknown}; a local task needs its YAML in a folder passed as include_path"
        )


def _to_result(
    output: dict[str, Any] | None,
    tasks: Sequence[str],
    weights: dict[str, float],
    metrics: dict[str, str],
) -> EvalResult:
    if output is None:  # lm-eval returns None on non-zero ranks only
        raise EvaluationError("lm-eval returned no results")
    scores = {
        name: _task_score(name, output["results"][name], output["samples"][name], metrics.get(name))
        for name in tasks
    }
    bad = [name for name, score in scores.items() if not math.isfinite(score.score)]
    if bad:
        return EvalResult.failed(f"non-finite score on lm-eval task {bad[0]!r}")
    total_weight = sum(weights.get(name, 1.0) for name in tasks)
    total = sum(weights.get(name, 1.0) * scores[name].score for name in tasks) / total_weight
    return EvalResult(
        score=total, tasks=scores, cost={"examples": float(sum(s.n_examples for s in scores.values()))}
    )


def _task_score(
    name: str, results: dict[str, Any], samples: list[dict[str, Any]], metric: str | None = None
) -> TaskScore:
    """The task's first metric (or `metric`): its aggregate from `results`, per example from the logged
    samples."""
    samples = sorted(samples, key=lambda sample: sample["doc_id"])
    metric = metric or (samples[0]["metrics"][0] if samples else _first_metric(results))
    keys = [k for k in results if k.split(",")[0] == metric]  # "acc,none": metric, filter
    if not keys:
        raise EvaluationError(
            f"lm-eval task {name!r} has no metric {metric!r}; it reports {sorted(results)}; fix 'metric'"
        )
    key = keys[0]
    per_example = [float(sample[metric]) for sample in samples]
    return TaskScore(name, f"lm-eval:{metric}", float(results[key]), per_example, len(per_example))


def _first_metric(results: dict[str, Any]) -> str:
    names = [k.split(",")[0] for k in results if k not in _NOT_METRICS and "_stderr" not in k]
    if not names:
        raise EvaluationError(f"lm-eval gave no metric in {sorted(results)}")
    return names[0]


def _device(model: Any) -> str:
    parameter = next(iter(model.parameters()), None)
    return str(parameter.device) if parameter is not None else "cpu"
