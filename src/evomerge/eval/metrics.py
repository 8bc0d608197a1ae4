"""Metrics as pure functions of model outputs: each returns one score in [0, 1] per example, higher is better.

The model-facing parts (generation, log-likelihoods, logits) live in generation.py, loglik.py and the
evaluator; what is here needs no model, so every rule can be tested on hand-made cases.
"""

from __future__ import annotations

import math
import unicodedata
from collections.abc import Sequence

import torch


def normalize_answer(text: str, *, case_fold: bool = False) -> str:
    """The form in which a prediction and a reference are compared.

    Unicode NFC (so "é" typed as one code point or as "e" + accent compare equal), surrounding whitespace
    stripped, every inner run of whitespace (spaces, tabs, newlines) collapsed to one space, and, when
    `case_fold`, Unicode case folding ("Straße" == "STRASSE"). Punctuation is kept: "4." is not "4".
    """
    text = unicodedata.normalize("NFC", text)
    if case_fold:  # folding can decompose a character ("ǰ" -> "ǰ"): compose again
        text = unicodedata.normalize("NFC", text.casefold())
    return " ".join(text.split())


def exact_match(
    predictions: Sequence[str], answers: Sequence[str], *, case_fold: bool = False
) -> list[float]:
    """1.0 where the normalised prediction equals the normalised answer, else 0.0 (two empty strings match)."""
    _check_lengths(predictions, answers, "predictions", "answers")
    return [
        float(normalize_answer(p, case_fold=case_fold) == normalize_answer(a, case_fold=case_fold))
        for p, a in zip(predictions, answers, strict=True)
    ]


def choice_accuracy(
    choice_logliks: Sequence[Sequence[float]],
    answer_indices: Sequence[int],
    *,
    choice_lengths: Sequence[Sequence[int]] | None = None,
) -> list[float]:
    """1.0 where the answer's continuation is the most likely choice, else 0.0.

    `choice_logliks[i][j]` is the summed log-likelihood of choice j of example i given its prompt. With
    `choice_lengths` (the length of each choice, here its UTF-8 byte count, as lm-eval's `acc_norm` does)
    each log-likelihood is divided by its length first, so long choices are not penalised for being long.
    A tie goes to the first choice listed.
    """
    _check_lengths(choice_logliks, answer_indices, "choice_logliks", "answer_indices")
    scores = []
    for i, (logliks, answer) in enumerate(zip(choice_logliks, answer_indices, strict=True)):
        values = list(logliks)
        if choice_lengths is not None:
            values = [v / max(1, n) for v, n in zip(values, choice_lengths[i], strict=True)]
        scores.append(float(_argmax(values) == answer))
    return scores


def choice_length(choice: str) -> int:
    """The length used by the normalised variant: UTF-8 bytes, tokenizer independent."""
    return len(choice.encode("utf-8"))


def perplexity(nll_sums: Sequence[float], token_counts: Sequence[int]) -> tuple[list[float], float]:
    """Per-example scores 1/ppl_i and the corpus perplexity exp(sum NLL / sum tokens).

    `nll_sums[i]` is the summed negative log-likelihood (nats) of example i's `token_counts[i]` scored
    tokens. 1/ppl lies in (0, 1] and grows as the model gets better. An example with no scored token
    has nothing to predict: its score is 1.0 and it adds nothing to the corpus perplexity.
    """
    _check_lengths(nll_sums, token_counts, "nll_sums", "token_counts")
    scores = [math.exp(-nll / n) if n > 0 else 1.0 for nll, n in zip(nll_sums, token_counts, strict=True)]
    total_tokens = sum(token_counts)
    total_nll = sum(nll for nll, n in zip(nll_sums, token_counts, strict=True) if n > 0)
    corpus = _exp(total_nll / total_tokens) if total_tokens > 0 else 1.0
    return scores, corpus


def _exp(value: float) -> float:
    """exp that saturates at inf instead of raising: a hopeless model has an infinite perplexity."""
    try:
        return math.exp(value)
    except OverflowError:
        return math.inf


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> list[float]:
    """1.0 where the classifier's arg-max class equals the label. logits (B, C), labels (B,)."""
    if logits.ndim != 2 or labels.shape != logits.shape[:1]:
        raise ValueError(
            f"accuracy: expected logits (B, C) and labels (B,), got {tuple(logits.shape)} and "
            f"{tuple(labels.shape)}"
        )
    return (logits.argmax(dim=-1) == labels).float().tolist()


def _argmax(values: Sequence[float]) -> int:
    best = 0
    for index, value in enumerate(values):
        if value > values[best]:
            best = index
    return best


def _check_lengths(first: Sequence[object], second: Sequence[object], a: str, b: str) -> None:
    if len(first) != len(second):
        raise ValueError(f"{a} and {b} must have the same length, got {len(first)} and {len(second)}")
