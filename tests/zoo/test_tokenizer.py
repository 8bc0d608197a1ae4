"""The zoo's char-level tokenizer: round trips, special tokens, loading through transformers."""

from __future__ import annotations

from pathlib import Path

import pytest

from evomerge.zoo.tokenizer import ALPHABET, build_tokenizer, encode, save_tokenizer


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("tokenizer")
    save_tokenizer(build_tokenizer(), directory)
    return directory


@pytest.mark.parametrize(
    "text",
    [
        "what is 37 plus 45? 82",
        "spell abc backwards: cba",
        "say cat sun in greek: αβγ δεζ",
        "",
        "  a\nb  ",
        ALPHABET,
    ],
)
def test_round_trip(saved: Path, text: str) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(saved)
    ids = encode(tokenizer, text)
    assert len(ids) == len(text)  # one token per character, nothing added
    assert tokenizer.decode(ids) == text


def test_special_tokens_and_no_automatic_bos(saved: Path) -> None:
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast.from_pretrained(saved)
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)
    # A prompt encodes the same with or without special tokens: training and evaluation agree.
    assert tokenizer("12+3=")["input_ids"] == tokenizer("12+3=", add_special_tokens=False)["input_ids"]
    assert (
        tokenizer.decode([*encode(tokenizer, "ok"), tokenizer.eos_token_id], skip_special_tokens=True) == "ok"
    )


def test_unknown_characters_map_to_unk() -> None:
    tokenizer = build_tokenizer()
    assert encode(tokenizer, "a€") == [tokenizer.convert_tokens_to_ids("a"), tokenizer.unk_token_id]


def test_left_padding_for_generation() -> None:
    tokenizer = build_tokenizer()
    batch = tokenizer(["ab", "abcd"], padding=True)
    assert batch["input_ids"][0][:2] == [tokenizer.pad_token_id] * 2
    assert batch["attention_mask"][0] == [0, 0, 1, 1]
