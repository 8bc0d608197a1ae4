"""Fixtures of the evaluator tests: the char tokenizer and a random Llama built on it (built once per module)."""

from __future__ import annotations

from typing import Any

import pytest

from .helpers import char_tokenizer, tiny_llama


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    return char_tokenizer()


@pytest.fixture(scope="module")
def lm(tokenizer: Any) -> Any:
    return tiny_llama(len(tokenizer))
