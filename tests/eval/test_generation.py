"""Batched greedy generation must give exactly what `model.generate` gives one prompt at a time."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from evomerge.eval.generation import (
    decode_answer,
    encode_prompts,
    generate_one_by_one,
    greedy_generate,
    left_pad,
    pad_token_id,
    stop_token_ids,
)

# Rows of very different lengths, so a batch holds a lot of left padding.
PROMPTS = [
    "1+2=",
    "abc def ghi jkl mno=",
    "9",
    "hello world, how are you?",
    "é=",
    "x",
    "12*34-5=",
    "the cat is",
]


def _batched(model: Any, tokenizer: Any, prompts: list[str], **kwargs: Any) -> list[str]:
    ids = greedy_generate(
        model,
        encode_prompts(tokenizer, prompts),
        stop_ids=stop_token_ids(tokenizer),
        pad_id=pad_token_id(tokenizer),
        **kwargs,
    )
    return [decode_answer(tokenizer, row) for row in ids]


@pytest.mark.parametrize("batch_size", [1, 3, 64])
def test_batched_equals_per_example_generate(lm: Any, tokenizer: Any, batch_size: int) -> None:
    with torch.inference_mode():
        expected = generate_one_by_one(lm, tokenizer, PROMPTS, max_new_tokens=12)
        got = _batched(lm, tokenizer, PROMPTS, max_new_tokens=12, batch_size=batch_size)
    assert got == expected
    assert len({len(answer) for answer in expected}) > 1  # the answers differ, so the check has teeth


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_batched_equals_generate_on_other_models(tokenizer: Any, seed: int) -> None:
    from .helpers import tiny_llama

    model = tiny_llama(len(tokenizer), seed=seed, layers=3)
    with torch.inference_mode():
        assert _batched(model, tokenizer, PROMPTS, max_new_tokens=20) == generate_one_by_one(
            model, tokenizer, PROMPTS, max_new_tokens=20
        )


def test_rows_that_stop_early_leave_the_batch_without_changing_the_others(tokenizer: Any) -> None:
    from .helpers import tiny_llama

    model = tiny_llama(len(tokenizer), seed=3, layers=3)  # its rows stop after 4 to 9 tokens, or never
    rows = encode_prompts(tokenizer, PROMPTS)
    with torch.inference_mode():
        generated = greedy_generate(
            model, rows, stop_ids=stop_token_ids(tokenizer), pad_id=0, max_new_tokens=20
        )
        expected = generate_one_by_one(model, tokenizer, PROMPTS, max_new_tokens=20)
    lengths = [len(row) for row in generated]
    assert min(lengths) < 10 and max(lengths) == 20  # one batch in which rows finish at different steps
    assert [decode_answer(tokenizer, row) for row in generated] == expected


def test_newline_stop_cuts_generation_short(lm: Any, tokenizer: Any) -> None:
    """With every token but "\\n" suppressed after the first step, each row ends after 2 tokens."""
    newline = tokenizer.convert_tokens_to_ids("\n")
    rows = encode_prompts(tokenizer, ["1+2=", "a much longer prompt than the first"])

    class NewlineAfterOne(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner, self.config, self.calls = lm, lm.config, 0

        def forward(self, *, cache: Any = None, **kwargs: Any) -> Any:
            output = self.inner(cache=cache, **kwargs)
            self.calls += 1
            if self.calls > 1:
                output.logits[..., newline] = 1e4
            return output

    wrapped = NewlineAfterOne()
    with torch.inference_mode():
        generated = greedy_generate(wrapped, rows, stop_ids=[newline], pad_id=0, max_new_tokens=16)
    assert [len(row) for row in generated] == [2, 2]
    assert all(row[-1] == newline for row in generated)
    assert wrapped.calls == 2  # the batch stopped as soon as every row had finished


def test_max_new_tokens_bounds_the_output(lm: Any, tokenizer: Any) -> None:
    rows = encode_prompts(tokenizer, PROMPTS)
    with torch.inference_mode():
        generated = greedy_generate(lm, rows, stop_ids=[], pad_id=0, max_new_tokens=5)
    assert [len(row) for row in generated] == [5] * len(PROMPTS)


def test_left_pad_aligns_rows_right() -> None:
    ids, mask = left_pad([[5, 6, 7], [8]], 0, device=torch.device("cpu"))
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_stop_tokens_hold_eos_and_newline(tokenizer: Any) -> None:
    stops = stop_token_ids(tokenizer)
    assert tokenizer.eos_token_id in stops
    assert tokenizer.convert_tokens_to_ids("\n") in stops
    assert tokenizer.convert_tokens_to_ids("a") not in stops
    assert stop_token_ids(tokenizer, stop_at_newline=False) == [tokenizer.eos_token_id]


def test_decode_answer_cuts_at_newline_and_drops_specials(tokenizer: Any) -> None:
    ids = tokenizer("42\nmore", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert decode_answer(tokenizer, ids) == "42"
    assert decode_answer(tokenizer, [tokenizer.eos_token_id]) == ""


@pytest.mark.parametrize("family", ["mistral", "qwen2", "gpt2"])
def test_batched_equals_generate_on_other_architectures(tokenizer: Any, family: str) -> None:
    import transformers

    from evomerge.zoo.random_models import FamilySpec, make_config

    config = make_config(FamilySpec(family=family, overrides={"vocab_size": len(tokenizer)}))  # type: ignore[arg-type]
    config.initializer_range = 0.3  # decisive logits, so float noise cannot flip a greedy choice
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.inference_mode():
        expected = generate_one_by_one(model, tokenizer, PROMPTS[:5], max_new_tokens=10)
        assert _batched(model, tokenizer, PROMPTS[:5], max_new_tokens=10) == expected


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_generation_raises_no_deprecation_warning(tmp_path: Any, family: str) -> None:
    """transformers 5.24 deprecates `past_key_values` (gone in 5.40): the cache goes in by `cache`."""
    import warnings

    from evomerge.zoo.random_models import FamilySpec, build_family

    from .helpers import char_tokenizer

    path = build_family(tmp_path, FamilySpec(family=family, n_finetunes=0))["base"]
    from transformers import AutoModelForCausalLM

    model, tokenizer = AutoModelForCausalLM.from_pretrained(path).eval(), char_tokenizer()
    rows = encode_prompts(tokenizer, PROMPTS)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.inference_mode():
            generated = greedy_generate(model, rows, stop_ids=[], pad_id=0, max_new_tokens=4)
    assert [len(row) for row in generated] == [4] * len(PROMPTS)
