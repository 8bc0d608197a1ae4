"""A character-level tokenizer for the lm zoo, built with `tokenizers` and saved as Hugging Face files.

One token per character keeps the models tiny and makes every skill (digits, letters, Greek words)
visible to the model symbol by symbol. No token is added automatically (no BOS in front of a prompt),
so a prompt encodes to the same ids whether or not an evaluator asks for special tokens.
"""

from __future__ import annotations

import string
from collections.abc import Iterable
from pathlib import Path
from typing import Any

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK)
GREEK = "αβγδεζηθικλμνξοπρστυφχψω"
ALPHABET = string.digits + string.ascii_lowercase + GREEK + " \n+-=<>?:,.'|"


def build_tokenizer(alphabet: Iterable[str] = ALPHABET) -> Any:
    """A `PreTrainedTokenizerFast` with one id per character of `alphabet` after the four special tokens."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    characters = list(dict.fromkeys(alphabet))  # unique, order kept: ids are stable
    vocab = {token: index for index, token in enumerate([*SPECIAL_TOKENS, *characters])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # every char alone
    core.decoder = decoders.Fuse()  # join characters back without spaces
    core.add_special_tokens(list(SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        padding_side="left",  # generation pads on the left so every prompt ends at the last column
        clean_up_tokenization_spaces=False,
        model_max_length=256,
    )


def save_tokenizer(tokenizer: Any, directory: Path) -> None:
    """Write tokenizer.json, tokenizer_config.json and the special-tokens map into `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(directory))


def encode(tokenizer: Any, text: str) -> list[int]:
    """Ids of `text`, one per character, with no special tokens added."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])
