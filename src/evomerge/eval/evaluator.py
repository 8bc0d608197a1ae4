"""The Evaluator: scores a live model on a list of tasks, fast enough to be called thousands of times.

Everything that does not depend on the model's weights (tokenising prompts, finding stop tokens,
stacking classifier features) is done once at construction. `evaluate` then only runs the model.
A configuration mistake (a metric that does not fit the model, no tokenizer for a language model) raises
EvaluationError; anything that goes wrong inside the model (an exception, NaN logits, a non-finite score)
becomes `EvalResult.failed(...)`, so one broken candidate never stops a search.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from evomerge.errors import EvaluationError
from evomerge.eval import metrics
from evomerge.eval.generation import (
    NonFiniteOutputError,
    decode_answer,
    encode_prompts,
    greedy_generate,
    model_device,
    pad_token_id,
    stop_token_ids,
)
from evomerge.eval.loglik import EncodedPair, continuation_logliks, encode_pairs
from evomerge.eval.result import EvalResult, TaskScore
from evomerge.eval.tasks import CLASSIFIER_METRICS, LM_METRICS, Task

ModelKind = Literal["lm", "classifier"]


def model_kind(model: Any) -> ModelKind:
    """'lm' for a model that can generate (a transformers causal LM), else 'classifier'."""
    return "lm" if callable(getattr(model, "generate", None)) else "classifier"


def check_metrics_fit(tasks: list[Task], model: Any) -> None:
    """Raise EvaluationError naming the first task whose metric does not fit the kind of `model`."""
    kind = model_kind(model)
    wrong = [t for t in tasks if t.metric in (LM_METRICS if kind == "classifier" else CLASSIFIER_METRICS)]
    if not wrong:
        return
    task = wrong[0]
    if kind == "classifier":
        needs, fix = "a language model (with generate)", "use accuracy"
    else:
        needs, fix = "a classifier", "use exact_match, choice_accuracy or perplexity"
    raise EvaluationError(
        f"task {task.name!r}: metric {task.metric!r} needs {needs}, but the model ({type(model).__name__}) "
        f"is a {'classifier' if kind == 'classifier' else 'language model'}; {fix}"
    )


@dataclass
class _Prepared:
    """A task with its model-independent inputs computed once."""

    task: Task
    prompt_ids: list[list[int]] = field(default_factory=list)  # exact_match
    pairs: list[EncodedPair] = field(default_factory=list)  # choices (flattened) or perplexity
    features: torch.Tensor | None = None  # (N, F) classifier inputs
    labels: torch.Tensor | None = None  # (N,)


class Evaluator:
    """Scores models on `tasks`; `evaluate(model)` returns an EvalResult with per-example scores.

    `max_new_tokens=None` sizes generation from the longest reference answer (its tokens plus two, room
    for the newline that ends it), so no answer is cut short by the budget.
    """

    def __init__(
        self,
        tasks: list[Task],
        *,
        tokenizer: Any = None,
        batch_size: int = 64,
        max_new_tokens: int | None = 16,
        device: str | torch.device | None = None,
    ) -> None:
        _check_settings(tasks, batch_size, max_new_tokens)
        self.tasks = list(tasks)
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.device = torch.device(device) if device is not None else None
        _check_tokenizer(self.tasks, tokenizer)
        self._prepared = [self._prepare(task) for task in self.tasks]
        self._stop_ids = self._find_stop_ids()
        self._pad_id = pad_token_id(tokenizer) if tokenizer is not None else 0
        self.max_new_tokens = max_new_tokens or self._longest_answer_tokens() + 2
        self.last_predictions: dict[str, list[str]] = {}  # exact_match tasks' decoded answers, last evaluate

    @property
    def n_examples(self) -> int:
        return sum(len(task.examples) for task in self.tasks)

    def restricted(self, selection: dict[str, Sequence[int]]) -> Evaluator:
        """An evaluator over the examples `selection` names per task (indices into each task's examples,
        in that order); a task it does not name is left out. Cached: racing asks the same slices often."""
        key = tuple((name, tuple(indices)) for name, indices in sorted(selection.items()))
        cache: dict[Any, Evaluator] = self.__dict__.setdefault("_restricted", {})
        if key not in cache:
            known = {task.name: task for task in self.tasks}
            unknown = sorted(set(selection) - set(known))
            if unknown:
                raise EvaluationError(f"no task named {unknown}; the evaluator's tasks: {sorted(known)}")
            tasks = [
                dataclasses.replace(known[name], examples=[known[name].examples[i] for i in indices])
                for name, indices in selection.items()
                if indices
            ]
            cache[key] = Evaluator(
                tasks,
                tokenizer=self.tokenizer,
                batch_size=self.batch_size,
                max_new_tokens=self.max_new_tokens,  # the full set's budget: same answers on a subset
                device=self.device,
            )
        return cache[key]

    def check_model(self, model: Any) -> None:
        """Raise EvaluationError when a task's metric does not fit the model (e.g. exact_match on a classifier)."""
        check_metrics_fit(self.tasks, model)

    def evaluate(self, model: Any) -> EvalResult:
        """Score `model` on every task. Never raises for a failure inside the model (see the module doc)."""
        self.check_model(model)
        start, was_training = time.perf_counter(), bool(getattr(model, "training", False))
        try:
            result = self._evaluate(model)
        except Exception as error:  # any failure of the candidate is a failed result, not a crash
            result = EvalResult.failed(f"{type(error).__name__}: {error}")
        finally:
            model.train(was_training)
        result.cost = {
            **result.cost,
            "wall_s": time.perf_counter() - start,
            "examples": float(self.n_examples),
        }
        return result

    def _evaluate(self, model: Any) -> EvalResult:
        if self.device is not None:
            model.to(self.device)
        model.eval()
        behaviour: dict[str, float] = {}
        with torch.inference_mode():
            scores = {p.task.name: self._score(model, p, behaviour) for p in self._prepared}
        return combine_scores(self.tasks, scores, behaviour)

    def _score(self, model: Any, prepared: _Prepared, behaviour: dict[str, float]) -> TaskScore:
        task = prepared.task
        if task.metric == "exact_match":
            per_example = self._exact_match(model, prepared)
        elif task.metric.startswith("choice_accuracy"):
            per_example = self._choice_accuracy(model, prepared)
        elif task.metric == "perplexity":
            return self._perplexity(model, prepared, behaviour)
        else:
            per_example = self._accuracy(model, prepared)
        return mean_task_score(task, per_example)

    def _exact_match(self, model: Any, prepared: _Prepared) -> list[float]:
        generated = greedy_generate(
            model,
            prepared.prompt_ids,
            stop_ids=self._stop_ids,
            pad_id=self._pad_id,
            max_new_tokens=self.max_new_tokens,
            batch_size=self.batch_size,
        )
        predictions = [decode_answer(self.tokenizer, ids) for ids in generated]
        self.last_predictions[prepared.task.name] = predictions
        return exact_match_scores(prepared.task, predictions)

    def _choice_accuracy(self, model: Any, prepared: _Prepared) -> list[float]:
        return choice_scores(prepared.task, self._logliks(model, prepared.pairs))

    def _perplexity(self, model: Any, prepared: _Prepared, behaviour: dict[str, float]) -> TaskScore:
        results = continuation_logliks(model, prepared.pairs, pad_id=self._pad_id, batch_size=self.batch_size)
        return perplexity_score(prepared.task, results, behaviour)

    def _accuracy(self, model: Any, prepared: _Prepared) -> list[float]:
        assert prepared.features is not None and prepared.labels is not None
        device, parameter = model_device(model), next(iter(model.parameters()), None)
        dtype = parameter.dtype if parameter is not None else torch.float32
        logits = []
        for start in range(0, len(prepared.features), self.batch_size):
            output = model(prepared.features[start : start + self.batch_size].to(device, dtype))
            logits.append(getattr(output, "logits", output).float().cpu())  # (b, C)
        stacked = torch.cat(logits)  # (N, C)
        if not bool(torch.isfinite(stacked).all()):
            raise NonFiniteOutputError("the classifier produced non-finite logits (NaN or inf)")
        return metrics.accuracy(stacked, prepared.labels)

    def _logliks(self, model: Any, pairs: list[EncodedPair]) -> list[float]:
        results = continuation_logliks(model, pairs, pad_id=self._pad_id, batch_size=self.batch_size)
        return [total for total, _ in results]

    def _prepare(self, task: Task) -> _Prepared:
        examples = task.examples
        if task.metric == "exact_match":
            return _Prepared(task, prompt_ids=encode_prompts(self.tokenizer, [e.prompt for e in examples]))
        if task.metric == "perplexity":
            return _Prepared(
                task, pairs=encode_pairs(self.tokenizer, [(e.prompt, e.answer) for e in examples])
            )
        if task.metric.startswith("choice_accuracy"):
            flat = [(e.prompt, choice) for e in examples for choice in e.choices]
            return _Prepared(task, pairs=encode_pairs(self.tokenizer, flat))
        features = torch.tensor([e.features for e in examples], dtype=torch.float32)  # (N, F)
        return _Prepared(task, features=features, labels=torch.tensor([e.label for e in examples]))

    def _find_stop_ids(self) -> list[int]:
        if not any(task.metric == "exact_match" for task in self.tasks):
            return []
        return stop_token_ids(self.tokenizer, stop_at_newline=True)

    def _longest_answer_tokens(self) -> int:
        answers = [e.answer for t in self.tasks if t.metric == "exact_match" for e in t.examples]
        if not answers:
            return 1
        return max(len(ids) for ids in self.tokenizer(answers, add_special_tokens=False)["input_ids"])


def _check_settings(tasks: list[Task], batch_size: int, max_new_tokens: int | None) -> None:
    if not tasks:
        raise EvaluationError("Evaluator needs at least one task")
    names = [task.name for task in tasks]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise EvaluationError(
            f"task names must be unique, got {duplicates} more than once; pass name=... to load_task"
        )
    if sum(task.weight for task in tasks) <= 0:
        raise EvaluationError(f"task weights must sum to more than 0, got {[task.weight for task in tasks]}")
    if batch_size < 1:
        raise EvaluationError(f"batch_size must be >= 1, got {batch_size}")
    if max_new_tokens is not None and max_new_tokens < 1:
        raise EvaluationError(
            f"max_new_tokens must be >= 1 (or None: sized from the answers), got {max_new_tokens}"
        )
    kinds = {task.metric in CLASSIFIER_METRICS for task in tasks}
    if len(kinds) > 1:
        raise EvaluationError(
            "tasks mix classifier metrics (accuracy) with language-model metrics; one model cannot be both"
        )


def _check_tokenizer(tasks: list[Task], tokenizer: Any) -> None:
    lm_tasks = [task.name for task in tasks if task.metric in LM_METRICS]
    if lm_tasks and tokenizer is None:
        raise EvaluationError(
            f"tasks {lm_tasks} use language-model metrics and need a tokenizer; pass tokenizer=... "
            "(load_model(path) returns the model dir's tokenizer)"
        )


# Scores from what a model said, shared by every evaluator (a live model here, an endpoint in endpoint.py).


def exact_match_scores(task: Task, predictions: Sequence[str]) -> list[float]:
    """Per-example exact match of `predictions` (one per example) against the task's answers."""
    case_fold = bool(task.extra.get("case_fold", False))
    return metrics.exact_match(predictions, [e.answer for e in task.examples], case_fold=case_fold)


def choice_scores(task: Task, logliks: Sequence[float]) -> list[float]:
    """Per-example choice accuracy from every choice's log-likelihood, flattened in example order."""
    grouped, lengths, cursor = [], [], 0
    for example in task.examples:
        grouped.append(list(logliks[cursor : cursor + len(example.choices)]))
        lengths.append([metrics.choice_length(choice) for choice in example.choices])
        cursor += len(example.choices)
    answers = [example.choices.index(example.answer) for example in task.examples]
    normalised = task.metric == "choice_accuracy_norm"
    return metrics.choice_accuracy(grouped, answers, choice_lengths=lengths if normalised else None)


def perplexity_score(
    task: Task, results: Sequence[tuple[float, int]], behaviour: dict[str, float]
) -> TaskScore:
    """The task's 1/perplexity from (summed log-likelihood, scored tokens) per example; the raw corpus
    perplexity goes into `behaviour` under perplexity/<task>."""
    nll_sums, counts = [-total for total, _ in results], [count for _, count in results]
    per_example, corpus_ppl = metrics.perplexity(nll_sums, counts)
    behaviour[f"perplexity/{task.name}"] = corpus_ppl  # the raw perplexity, lower is better
    groups = group_perplexity_scores(nll_sums, counts, [e.group for e in task.examples])
    return TaskScore(task.name, task.metric, _inverse(corpus_ppl), per_example, len(per_example), groups)


def mean_task_score(task: Task, per_example: list[float]) -> TaskScore:
    """The TaskScore of per-example scores: their mean, and each group's."""
    groups = group_means(per_example, [e.group for e in task.examples])
    return TaskScore(task.name, task.metric, _mean(per_example), per_example, len(per_example), groups)


def combine_scores(
    tasks: list[Task], scores: dict[str, TaskScore], behaviour: dict[str, float]
) -> EvalResult:
    """The EvalResult of task scores: their weighted mean, or a failed result if one is not finite."""
    bad = [name for name, score in scores.items() if not math.isfinite(score.score)]
    if bad:
        return EvalResult.failed(f"non-finite score on task {bad[0]!r}: {scores[bad[0]].score}")
    weights = {task.name: task.weight for task in tasks}
    total = sum(weights[name] * score.score for name, score in scores.items()) / sum(weights.values())
    return EvalResult(score=total, tasks=scores, behaviour=behaviour)


def group_means(per_example: Sequence[float], groups: Sequence[str | None]) -> dict[str, float]:
    """The mean score of each group's examples, groups sorted by name (a stable order for reports).

    `groups[i]` is example i's group; an example without one (None) counts in no group, and a task
    without any gives {}.
    """
    return {
        group: _mean([per_example[i] for i in indices])
        for group, indices in _group_indices(groups, len(per_example)).items()
    }


def group_perplexity_scores(
    nll_sums: Sequence[float], token_counts: Sequence[int], groups: Sequence[str | None]
) -> dict[str, float]:
    """1 / corpus perplexity of each group's examples: the task's perplexity score, computed per group.

    Not the mean of the per-example 1/ppl: that would weigh a 2-token answer like a 200-token one.
    """
    scores = {}
    for group, indices in _group_indices(groups, len(nll_sums)).items():
        _, corpus = metrics.perplexity([nll_sums[i] for i in indices], [token_counts[i] for i in indices])
        scores[group] = _inverse(corpus)
    return scores


def _group_indices(groups: Sequence[str | None], n_examples: int) -> dict[str, list[int]]:
    if len(groups) != n_examples:
        raise ValueError(f"one group per example expected: {len(groups)} groups for {n_examples} examples")
    indices: dict[str, list[int]] = {}
    for index, group in enumerate(groups):
        if group is not None:
            indices.setdefault(group, []).append(index)
    return dict(sorted(indices.items()))


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def _inverse(perplexity: float) -> float:
    return 1.0 / perplexity if perplexity > 0 else float("nan")
