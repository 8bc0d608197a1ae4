"""Tiny language models for the evaluator tests: a char-level tokenizer and a random Llama that uses it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

CHARS = list("0123456789+-=*/ abcdefghijklmnopqrstuvwxyz\n?:.,éüß")
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]


def char_tokenizer() -> Any:
    """One token per character, BOS prepended, decoding that concatenates (no spaces added)."""
    from tokenizers import Tokenizer, decoders, models, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {token: index for index, token in enumerate(SPECIALS + CHARS)}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    core.decoder = decoders.Fuse()
    core.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


def tiny_llama(vocab_size: int, *, seed: int = 0, init: float = 0.2, layers: int = 2) -> Any:
    """A random Llama; a large init spread makes its greedy choices decisive (no near-ties between logits)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        initializer_range=init,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    torch.manual_seed(seed)  # transformers initialises from the global generator
    return LlamaForCausalLM(config).eval()


def save_lm_dir(path: Path, model: Any, tokenizer: Any | None) -> Path:
    model.save_pretrained(path)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    return path


def write_jsonl(path: Path, records: list[Any]) -> Path:
    path.write_text(
        "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records), encoding="utf-8"
    )
    return path
