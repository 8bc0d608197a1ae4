"""lm-eval-harness tasks as fitness: the evolve config's `fitness: [{lm_eval: TASK, ...}]` entries.

`LmEvalEvaluator` scores a live model on lm-eval tasks through the adapter (`lm_eval_adapter`), one call per
task so each keeps its own `limit`, `num_fewshot` and `include_path`; `make_evaluator` gives the one
evaluator a backend needs for a mix of JSONL tasks (`Evaluator`) and lm-eval tasks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from evomerge.errors import EvaluationError
from evomerge.eval.result import EvalResult


@dataclass(frozen=True)
class LmEvalTask:
    """One lm-eval task as fitness, named `name` in results (its lm-eval name unless renamed)."""

    name: str
    task: str  # the lm-eval task name
    weight: float = 1.0
    metric: str | None = None  # None: the task's first metric
    limit: int | None = None
    num_fewshot: int | None = None
    include_path: Path | None = None  # a folder of local task YAMLs


class LmEvalEvaluator:
    """Scores a causal LM on lm-eval tasks; the result's tasks carry per-example scores."""

    def __init__(self, tasks: Sequence[LmEvalTask], *, tokenizer: Any, batch_size: int = 16) -> None:
        if tokenizer is None:
            raise EvaluationError(
                f"lm-eval tasks {[t.name for t in tasks]} need a language model's tokenizer"
            )
        self.tasks, self.tokenizer, self.batch_size = list(tasks), tokenizer, batch_size

    def check_model(self, model: Any) -> None:
        if not callable(getattr(model, "generate", None)):
            raise EvaluationError(
                f"lm-eval tasks {[t.name for t in self.tasks]} need a language model; "
                f"{type(model).__name__} is a classifier"
            )

    def evaluate(self, model: Any) -> EvalResult:
        return combine(
            [self._one(model, task) for task in self.tasks], {t.name: t.weight for t in self.tasks}
        )

    def _one(self, model: Any, task: LmEvalTask) -> EvalResult:
        from evomerge.eval.lm_eval_adapter import evaluate_lm_eval

        result = evaluate_lm_eval(
            model,
            self.tokenizer,
            [task.task],
            include_path=task.include_path,
            include_defaults=task.include_path is None,  # local tasks only: skip indexing the built-ins
            limit=task.limit,
            num_fewshot=task.num_fewshot,
            batch_size=self.batch_size,
            metrics={task.task: task.metric} if task.metric else None,
        )
        if result.ok and task.name != task.task:
            score = result.tasks.pop(task.task)
            score.task = task.name
            result.tasks[task.name] = score
        return result


class CombinedEvaluator:
    """Several evaluators as one: their tasks' scores in one result, weighted by task weight."""

    def __init__(self, parts: Sequence[Any], weights: dict[str, float]) -> None:
        self.parts, self.weights = list(parts), weights

    def check_model(self, model: Any) -> None:
        for part in self.parts:
            part.check_model(model)

    def evaluate(self, model: Any) -> EvalResult:
        return combine([part.evaluate(model) for part in self.parts], self.weights)


def combine(results: Sequence[EvalResult], weights: dict[str, float]) -> EvalResult:
    """One result from results over disjoint tasks: the first failure, else the weighted mean of tasks."""
    cost: dict[str, float] = {}
    for result in results:
        for key, value in result.cost.items():
            cost[key] = cost.get(key, 0.0) + value
    failed = next((r for r in results if not r.ok), None)
    if failed is not None:
        return EvalResult.failed(failed.error or "failed", cost=cost)
    tasks = {name: score for r in results for name, score in r.tasks.items()}
    behaviour = {key: value for r in results for key, value in r.behaviour.items()}
    total = sum(weights[name] for name in tasks)
    score = sum(weights[name] * tasks[name].score for name in tasks) / total
    return EvalResult(score, tasks, behaviour, cost)


def make_evaluator(
    tasks: Sequence[Any],
    *,
    tokenizer: Any,
    batch_size: int = 64,
    max_new_tokens: int | None = None,
    device: Any = None,
) -> Any:
    """The evaluator for `tasks` (evomerge.eval.tasks.Task and LmEvalTask, in any mix)."""
    from evomerge.eval.evaluator import Evaluator

    ours = [t for t in tasks if not isinstance(t, LmEvalTask)]
    harness = [t for t in tasks if isinstance(t, LmEvalTask)]
    evaluator = (
        Evaluator(
            ours, tokenizer=tokenizer, batch_size=batch_size, max_new_tokens=max_new_tokens, device=device
        )
        if ours
        else None
    )
    if not harness:
        return evaluator
    lm_eval = LmEvalEvaluator(harness, tokenizer=tokenizer, batch_size=min(batch_size, 64))
    if evaluator is None:
        return lm_eval
    return CombinedEvaluator([evaluator, lm_eval], {t.name: t.weight for t in tasks})
