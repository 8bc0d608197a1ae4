"""Each metric on hand-made cases: empty answers, unicode, ties, length normalisation, perplexity bounds."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from evomerge.eval import metrics


@pytest.mark.parametrize(
    ("text", "case_fold", "expected"),
    [
        ("  42 \n", False, "42"),
        ("a \t b\n\nc", False, "a b c"),
        ("", False, ""),
        ("   ", False, ""),
        ("cafe\u0301", False, "caf\u00e9"),  # decomposed é becomes the composed one (NFC)
        ("Straße", True, "strasse"),
        ("Straße", False, "Straße"),
        ("4.", False, "4."),  # punctuation is kept
    ],
)
def test_normalize_answer(text: str, case_fold: bool, expected: str) -> None:
    assert metrics.normalize_answer(text, case_fold=case_fold) == expected


def test_exact_match_cases() -> None:
    predictions = ["42", " 42 ", "", "", "cafe\u0301", "ABC", "4.", "日本 語"]
    answers = ["42", "42", "", "x", "caf\u00e9", "abc", "4", "日本  語"]
    assert metrics.exact_match(predictions, answers) == [1, 1, 1, 0, 1, 0, 0, 1]
    assert metrics.exact_match(["ABC"], ["abc"], case_fold=True) == [1.0]


def test_exact_match_refuses_unequal_lengths() -> None:
    with pytest.raises(ValueError, match="same length, got 2 and 1"):
        metrics.exact_match(["a", "b"], ["a"])


def test_choice_accuracy_picks_the_most_likely_choice() -> None:
    logliks = [[-1.0, -2.0], [-3.0, -0.5, -9.0], [-1.0, -1.0]]
    assert metrics.choice_accuracy(logliks, [0, 0, 1]) == [1.0, 0.0, 0.0]  # a tie goes to the first choice


def test_choice_accuracy_length_normalised() -> None:
    # A long choice with a lower total but a higher per-byte log-likelihood wins only when normalised.
    logliks, lengths = [[-2.0, -3.0]], [[1, 6]]
    assert metrics.choice_accuracy(logliks, [1]) == [0.0]
    assert metrics.choice_accuracy(logliks, [1], choice_lengths=lengths) == [1.0]
    assert metrics.choice_accuracy([[-2.0, -3.0]], [0], choice_lengths=[[0, 0]]) == [
        1.0
    ]  # empty choices: no /0


def test_choice_length_counts_utf8_bytes() -> None:
    assert [metrics.choice_length(c) for c in ["", "ab", "é", "日本"]] == [0, 2, 2, 6]


def test_perplexity_scores_and_corpus() -> None:
    scores, corpus = metrics.perplexity([0.0, 2 * math.log(4.0), 5.0], [3, 2, 0])
    assert scores == pytest.approx([1.0, 0.25, 1.0])  # the last example has nothing to score
    assert corpus == pytest.approx(math.exp(2 * math.log(4.0) / 5))
    assert all(0 < s <= 1 for s in scores)


def test_perplexity_saturates_instead_of_overflowing() -> None:
    scores, corpus = metrics.perplexity([1e6], [1])
    assert scores == [0.0] and corpus == math.inf
    assert metrics.perplexity([], []) == ([], 1.0)


def test_perplexity_passes_nan_through() -> None:
    scores, corpus = metrics.perplexity([math.nan], [2])
    assert math.isnan(scores[0]) and math.isnan(corpus)


def test_accuracy_on_logits() -> None:
    logits = torch.tensor([[0.1, 0.9], [2.0, -1.0], [0.0, 0.5]])
    assert metrics.accuracy(logits, torch.tensor([1, 1, 1])) == [1.0, 0.0, 1.0]
    with pytest.raises(ValueError, match=r"expected logits \(B, C\)"):
        metrics.accuracy(logits, torch.tensor([1]))


@given(st.text(), st.booleans())
def test_normalize_answer_is_idempotent_and_trimmed(text: str, case_fold: bool) -> None:
    once = metrics.normalize_answer(text, case_fold=case_fold)
    assert metrics.normalize_answer(once, case_fold=case_fold) == once
    assert once == once.strip() and "  " not in once
    assert metrics.exact_match([f"  {text}\n"], [text], case_fold=case_fold) == [1.0]
