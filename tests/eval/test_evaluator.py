"""The Evaluator: right scores, per-example results, failed results for broken models, errors for bad set-ups."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from evomerge.errors import EvaluationError
from evomerge.eval.evaluator import Evaluator, group_means, group_perplexity_scores, model_kind
from evomerge.eval.generation import generate_one_by_one
from evomerge.eval.tasks import Example, Task

PROMPTS = ["1+2=", "abc def=", "9", "hello world?", "é=", "x y z"]


class LinearClassifier(torch.nn.Module):
    """A classifier without `generate`: features (B, F) -> logits (B, C)."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
        with torch.no_grad():
            self.linear.weight.copy_(weight)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear(features)  # (B, C)


class Exploding(torch.nn.Module):
    """A language model whose forward raises, as a broken candidate might."""

    def __init__(self, lm: Any) -> None:
        super().__init__()
        self.inner, self.config = lm, lm.config

    def generate(self) -> None:  # marks it as a language model
        raise NotImplementedError

    def forward(self, **kwargs: Any) -> Any:
        raise RuntimeError("shape mismatch in layer 3")


def _task(name: str, metric: str, examples: list[Example], weight: float = 1.0) -> Task:
    return Task(name=name, metric=metric, examples=examples, weight=weight)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def expected_answers(lm: Any, tokenizer: Any) -> list[str]:
    with torch.inference_mode():
        return generate_one_by_one(lm, tokenizer, PROMPTS, max_new_tokens=8)


def test_exact_match_scores_each_example(lm: Any, tokenizer: Any, expected_answers: list[str]) -> None:
    # Half the references are what the model says (1.0), half are not (0.0): the order must be kept.
    answers = [a if i % 2 == 0 else a + "#" for i, a in enumerate(expected_answers)]
    task = _task(
        "em", "exact_match", [Example(prompt=p, answer=a) for p, a in zip(PROMPTS, answers, strict=True)]
    )
    result = Evaluator([task], tokenizer=tokenizer, batch_size=4, max_new_tokens=8).evaluate(lm)
    assert result.ok, result.error
    assert result.tasks["em"].per_example == [1.0, 0.0, 1.0, 0.0, 1.0, 0.0]
    assert result.score == pytest.approx(0.5) and result.tasks["em"].n_examples == 6
    assert result.cost["examples"] == 6 and result.cost["wall_s"] > 0


def test_weighted_mean_over_tasks(lm: Any, tokenizer: Any, expected_answers: list[str]) -> None:
    right = _task(
        "right", "exact_match", [Example(prompt=PROMPTS[0], answer=expected_answers[0])], weight=3.0
    )
    wrong = _task("wrong", "exact_match", [Example(prompt=PROMPTS[0], answer=expected_answers[0] + "!")])
    result = Evaluator([right, wrong], tokenizer=tokenizer, max_new_tokens=8).evaluate(lm)
    assert result.score == pytest.approx(0.75)


def _loglik(model: Any, tokenizer: Any, prompt: str, continuation: str) -> float:
    context = tokenizer(prompt)["input_ids"]
    target = tokenizer(continuation, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([context + target])
    logprobs = model(input_ids=ids).logits[0].log_softmax(-1)  # (T, V)
    return sum(float(logprobs[len(context) - 1 + i, token]) for i, token in enumerate(target))


@pytest.mark.parametrize("metric", ["choice_accuracy", "choice_accuracy_norm"])
def test_choice_accuracy_matches_unbatched_logliks(lm: Any, tokenizer: Any, metric: str) -> None:
    choices = ("yes", "no", "maybe so", "")
    examples = [Example(prompt=p, answer=choices[i % 4], choices=choices) for i, p in enumerate(PROMPTS)]
    result = Evaluator([_task("mc", metric, examples)], tokenizer=tokenizer, batch_size=5).evaluate(lm)
    with torch.inference_mode():
        expected = []
        for example in examples:
            scores = [_loglik(lm, tokenizer, example.prompt, c) for c in choices]
            if metric.endswith("norm"):
                scores = [s / max(1, len(c.encode())) for s, c in zip(scores, choices, strict=True)]
            expected.append(float(scores.index(max(scores)) == choices.index(example.answer)))
    assert result.tasks["mc"].per_example == expected


def test_perplexity_matches_the_model_loss(lm: Any, tokenizer: Any) -> None:
    examples = [
        Example(prompt="", answer="hello world"),
        Example(prompt="1+2=", answer="3"),
        Example(answer=""),
    ]
    result = Evaluator([_task("ppl", "perplexity", examples)], tokenizer=tokenizer, batch_size=2).evaluate(lm)
    with torch.inference_mode():
        ids = torch.tensor([tokenizer("hello world")["input_ids"]])  # BOS + text: every text token is scored
        loss = float(lm(input_ids=ids, labels=ids).loss)
        nll_2 = -_loglik(lm, tokenizer, "1+2=", "3")
    per_example = result.tasks["ppl"].per_example
    assert per_example[0] == pytest.approx(math.exp(-loss), rel=1e-4)
    assert per_example[1] == pytest.approx(math.exp(-nll_2), rel=1e-4)
    assert per_example[2] == 1.0  # nothing to score
    corpus = math.exp((loss * 11 + nll_2) / 12)
    assert result.behaviour["perplexity/ppl"] == pytest.approx(corpus, rel=1e-4)
    assert result.score == pytest.approx(1 / corpus, rel=1e-4)


def test_nan_model_gives_a_failed_result(tokenizer: Any) -> None:
    from .helpers import tiny_llama

    model = tiny_llama(len(tokenizer), seed=5)
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.fill_(math.nan)
    tasks = [
        _task("em", "exact_match", [Example(prompt="1+2=", answer="3")]),
        _task("ppl", "perplexity", [Example(prompt="1", answer="2")]),
    ]
    for task in tasks:
        result = Evaluator([task], tokenizer=tokenizer).evaluate(model)
        assert not result.ok and result.score == 0.0
        assert "non-finite" in (result.error or "")


def test_exception_in_the_model_gives_a_failed_result(lm: Any, tokenizer: Any) -> None:
    task = _task("em", "exact_match", [Example(prompt="1+2=", answer="3")])
    result = Evaluator([task], tokenizer=tokenizer).evaluate(Exploding(lm))
    assert not result.ok
    assert result.error == "RuntimeError: shape mismatch in layer 3"
    assert result.cost["examples"] == 1


def test_classifier_accuracy_and_nan() -> None:
    model = LinearClassifier(torch.eye(3))
    examples = [Example(features=(1.0, 0.0, 0.0), label=0), Example(features=(0.0, 0.0, 2.0), label=1)]
    evaluator = Evaluator([_task("digits", "accuracy", examples)], batch_size=1)
    result = evaluator.evaluate(model)
    assert result.tasks["digits"].per_example == [1.0, 0.0] and result.score == 0.5
    assert result.tasks["digits"].groups == {}  # no example names a group
    with torch.no_grad():
        model.linear.weight[0, 0] = math.nan
    assert "non-finite" in (evaluator.evaluate(model).error or "")


def test_metric_that_does_not_fit_the_model_is_an_error(lm: Any, tokenizer: Any) -> None:
    lm_task = _task("em", "exact_match", [Example(prompt="1", answer="2")])
    with pytest.raises(EvaluationError, match=r"metric 'exact_match' needs a language model.*use accuracy"):
        Evaluator([lm_task], tokenizer=tokenizer).evaluate(LinearClassifier(torch.eye(2)))
    classifier_task = _task("digits", "accuracy", [Example(features=(1.0,), label=0)])
    with pytest.raises(EvaluationError, match="metric 'accuracy' needs a classifier"):
        Evaluator([classifier_task]).evaluate(lm)
    assert (model_kind(lm), model_kind(LinearClassifier(torch.eye(2)))) == ("lm", "classifier")


def test_set_up_errors() -> None:
    lm_task = _task("em", "exact_match", [Example(prompt="1", answer="2")])
    with pytest.raises(EvaluationError, match="need a tokenizer"):
        Evaluator([lm_task])
    with pytest.raises(EvaluationError, match="at least one task"):
        Evaluator([])
    with pytest.raises(EvaluationError, match="unique"):
        Evaluator([lm_task, lm_task], tokenizer=object())
    with pytest.raises(EvaluationError, match="mix classifier metrics"):
        Evaluator([lm_task, _task("c", "accuracy", [Example(features=(1.0,), label=0)])], tokenizer=object())


def test_training_mode_is_restored_and_budget_sized_from_answers(lm: Any, tokenizer: Any) -> None:
    task = _task("em", "exact_match", [Example(prompt="1", answer="a" * 30)])
    evaluator = Evaluator([task], tokenizer=tokenizer, max_new_tokens=None)
    assert evaluator.max_new_tokens == 32
    lm.train()
    try:
        assert evaluator.evaluate(lm).ok
        assert lm.training
    finally:
        lm.eval()


def test_case_fold_option_and_device(lm: Any, tokenizer: Any, expected_answers: list[str]) -> None:
    answer = expected_answers[0].upper()
    assert answer != expected_answers[0]  # the check below needs letters in the answer
    plain = _task("plain", "exact_match", [Example(prompt=PROMPTS[0], answer=answer)])
    folded = Task(name="folded", metric="exact_match", examples=plain.examples, extra={"case_fold": True})
    # (load_task(..., case_fold=True) sets this extra; see test_tasks)
    result = Evaluator([plain, folded], tokenizer=tokenizer, max_new_tokens=8, device="cpu").evaluate(lm)
    assert (result.tasks["plain"].score, result.tasks["folded"].score) == (0.0, 1.0)


def test_group_means_by_hand() -> None:
    per_example = [1.0, 0.0, 1.0, 0.0, 1.0, 0.5]
    groups = ["rev", "add", None, "add", "add", "rev"]  # the ungrouped 1.0 counts in no group
    means = group_means(per_example, groups)
    assert means == {"add": pytest.approx(1 / 3), "rev": pytest.approx(0.75)}
    assert list(means) == ["add", "rev"]  # sorted by name, not by first appearance
    assert group_means([1.0, 0.0], [None, None]) == {}
    with pytest.raises(ValueError, match="2 groups for 3 examples"):
        group_means([1.0, 0.0, 1.0], ["a", "b"])


def test_group_perplexity_is_the_corpus_perplexity_of_the_group() -> None:
    nll_sums, counts = [2.0, 4.0, 1.0, 0.0], [1, 3, 2, 0]
    scores = group_perplexity_scores(nll_sums, counts, ["x", "x", "y", "y"])
    # x: exp(-(2 + 4) / (1 + 3)), not the mean of exp(-2) and exp(-4/3); y: the 0-token example adds nothing
    assert scores == {"x": pytest.approx(math.exp(-1.5)), "y": pytest.approx(math.exp(-0.5))}


def test_classifier_accuracy_per_group() -> None:
    model = LinearClassifier(torch.eye(3))
    examples = [
        Example(features=(1.0, 0.0, 0.0), label=0, group="low"),  # right
        Example(features=(0.0, 1.0, 0.0), label=1, group="low"),  # right
        Example(features=(0.0, 0.0, 2.0), label=1, group="high"),  # wrong
        Example(features=(0.0, 0.0, 1.0), label=2, group="high"),  # right
        Example(features=(0.0, 1.0, 0.0), label=0),  # wrong, in no group
    ]
    result = Evaluator([_task("digits", "accuracy", examples)], batch_size=2).evaluate(model)
    assert result.tasks["digits"].groups == {"high": 0.5, "low": 1.0}
    assert result.score == pytest.approx(0.6)  # the task score still counts every example


def test_perplexity_per_group(lm: Any, tokenizer: Any) -> None:
    examples = [
        Example(answer="hello world", group="a"),  # 11 tokens scored (BOS, then every character)
        Example(prompt="1+2=", answer="3", group="b"),  # 1 token
        Example(answer="x y", group="a"),  # 3 tokens
    ]
    result = Evaluator([_task("ppl", "perplexity", examples)], tokenizer=tokenizer).evaluate(lm)
    p = result.tasks["ppl"].per_example  # exp(-nll_i / n_i), so nll_i = -n_i log p_i
    corpus_a = math.exp(-(11 * math.log(p[0]) + 3 * math.log(p[2])) / 14)
    assert result.tasks["ppl"].groups == {"a": pytest.approx(1 / corpus_a), "b": pytest.approx(p[1])}
