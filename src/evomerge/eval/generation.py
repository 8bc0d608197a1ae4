"""Batched greedy generation with a KV cache, for Hugging Face causal LMs.

Why not `model.generate`: it is built for one request at a time plus a long tail of options; in the
evolve loop the same few hundred short prompts are scored thousands of times. Here prompts are sorted by
length (so a batch holds rows of similar length and little padding), left-padded with a matching
attention mask and position ids (so a padded row computes what it would alone, up to float rounding),
decoded greedily with a cache; a row leaves the batch (and the cache) at its first newline or EOS, and the
batch stops when every row has.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from evomerge.errors import EvaluationError


class NonFiniteOutputError(EvaluationError):
    """The model produced NaN or infinite logits (e.g. a broken merge)."""


def encode_prompts(tokenizer: Any, prompts: Sequence[str]) -> list[list[int]]:
    """Token ids of each prompt, special tokens (BOS) added as the tokenizer does by default."""
    return [list(ids) for ids in tokenizer(list(prompts))["input_ids"]]


def stop_token_ids(tokenizer: Any, *, stop_at_newline: bool = True) -> list[int]:
    """EOS ids and, with `stop_at_newline`, every token whose text holds a newline. Sorted, no duplicates."""
    stops = set(_eos_ids(tokenizer))
    if stop_at_newline:
        texts = tokenizer.batch_decode([[index] for index in range(len(tokenizer))])
        stops.update(index for index, text in enumerate(texts) if "\n" in text)
    return sorted(stops)


def pad_token_id(tokenizer: Any) -> int:
    """The id fed in padded positions: pad, else EOS, else 0. Its value never matters (it is masked)."""
    for candidate in (tokenizer.pad_token_id, *_eos_ids(tokenizer)):
        if candidate is not None:
            return int(candidate)
    return 0


def decode_answer(tokenizer: Any, token_ids: Sequence[int]) -> str:
    """The generated text up to (not including) its first newline, special tokens dropped."""
    return str(tokenizer.decode(list(token_ids), skip_special_tokens=True)).split("\n", 1)[0]


def greedy_generate(
    model: Any,
    prompt_ids: Sequence[Sequence[int]],
    *,
    stop_ids: Sequence[int],
    pad_id: int,
    max_new_tokens: int = 16,
    batch_size: int = 64,
) -> list[list[int]]:
    """New token ids for each prompt (in input order), each ending at its first stop token included."""
    device = model_device(model)
    stops = torch.tensor(list(stop_ids), dtype=torch.long, device=device)
    outputs: list[list[int]] = [[] for _ in prompt_ids]
    for chunk in _length_sorted_batches(prompt_ids, batch_size):
        rows = [prompt_ids[index] for index in chunk]
        for index, tokens in zip(
            chunk, _generate_batch(model, rows, stops, pad_id, max_new_tokens), strict=True
        ):
            outputs[index] = tokens
    return outputs


def _length_sorted_batches(prompt_ids: Sequence[Sequence[int]], batch_size: int) -> Iterator[list[int]]:
    order = sorted(range(len(prompt_ids)), key=lambda index: len(prompt_ids[index]))
    for start in range(0, len(order), batch_size):
        yield order[start : start + batch_size]


def _generate_batch(
    model: Any, rows: list[Sequence[int]], stops: torch.Tensor, pad_id: int, max_new_tokens: int
) -> list[list[int]]:
    """Greedy decoding of one batch; a row leaves the batch (and the cache) as soon as it has stopped."""
    from transformers import DynamicCache

    input_ids, mask = left_pad(rows, pad_id, device=stops.device)  # (B, T), (B, T)
    positions = (mask.cumsum(dim=-1) - 1).clamp(min=0)  # (B, T): a padded row starts at position 0
    cache = DynamicCache(config=model.config)
    logits = _last_logits(model, input_ids, mask, positions, cache)  # (b, V), b rows still running
    live = torch.arange(len(rows), device=stops.device)  # (b,) index in `rows` of each running row
    outputs: list[list[int]] = [[] for _ in rows]
    for step in range(max_new_tokens):
        next_ids = logits.argmax(dim=-1)  # (b,)
        for row, token in zip(live.tolist(), next_ids.tolist(), strict=True):
            outputs[row].append(token)
        running = ~torch.isin(next_ids, stops)  # (b,)
        if step == max_new_tokens - 1 or not bool(running.any()):
            break
        if not bool(running.all()):  # drop finished rows: less compute, a smaller cache
            keep = running.nonzero().squeeze(1)  # (b',)
            cache.batch_select_indices(keep)
            live, next_ids, mask, positions = live[keep], next_ids[keep], mask[keep], positions[keep]
        mask = torch.cat([mask, mask.new_ones(len(live), 1)], dim=1)  # (b, T + step + 1)
        positions = positions[:, -1:] + 1  # (b, 1)
        logits = _last_logits(model, next_ids[:, None], mask, positions, cache)
    return outputs


def left_pad(
    rows: Sequence[Sequence[int]], pad_id: int, *, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows padded on the left to one length: ids (B, T) and attention mask (B, T), 1 on real tokens."""
    if any(len(row) == 0 for row in rows):
        raise EvaluationError(
            "a prompt encodes to no token at all; give the tokenizer a BOS token or a prompt"
        )
    width = max(len(row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for index, row in enumerate(rows):
        ids[index, width - len(row) :] = torch.tensor(row, dtype=torch.long)
        mask[index, width - len(row) :] = 1
    return ids.to(device), mask.to(device)


def _last_logits(
    model: Any, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache: Any
) -> torch.Tensor:
    """Logits of the last position of each row (B, V); NaN or inf raise NonFiniteOutputError."""
    extra = {"logits_to_keep": 1} if _accepts_logits_to_keep(type(model)) else {}
    output = model(
        input_ids=ids,
        attention_mask=mask,
        position_ids=positions,
        past_key_values=cache,
        use_cache=True,
        **extra,
    )
    logits = output.logits[:, -1, :].float()  # (B, V)
    if not bool(torch.isfinite(logits).all()):
        raise NonFiniteOutputError("the model produced non-finite logits (NaN or inf)")
    return logits


_ACCEPTS_LOGITS_TO_KEEP: dict[type, bool] = {}


def _accepts_logits_to_keep(model_class: type) -> bool:
    """Most transformers causal LMs can skip the LM head on all but the last position: a large saving."""
    if model_class not in _ACCEPTS_LOGITS_TO_KEEP:
        forward = getattr(model_class, "forward", None)
        accepts = forward is not None and "logits_to_keep" in inspect.signature(forward).parameters
        _ACCEPTS_LOGITS_TO_KEEP[model_class] = accepts
    return _ACCEPTS_LOGITS_TO_KEEP[model_class]


def model_device(model: Any) -> torch.device:
    parameter = next(iter(model.parameters()), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def _eos_ids(tokenizer: Any) -> list[int]:
    eos = tokenizer.eos_token_id
    if eos is None:
        return []
    return [int(e) for e in eos] if isinstance(eos, (list, tuple)) else [int(eos)]


def generate_one_by_one(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 16,
    stop_at_newline: bool = True,
) -> list[str]:
    """The plain reference: `model.generate(do_sample=False)` per prompt, cut as `decode_answer` cuts.

    Used by the tests and the speed benchmark to check that batched generation gives the same answers.
    """
    stop_ids = stop_token_ids(tokenizer, stop_at_newline=stop_at_newline)
    answers = []
    for ids in encode_prompts(tokenizer, prompts):
        input_ids = torch.tensor([ids], device=model_device(model))  # (1, T)
        output = model.generate(
            input_ids,
            attention_mask=torch.ones_like(input_ids),
            do_sample=False,
            max_new_tokens=max_new_tokens,
            eos_token_id=stop_ids,
            pad_token_id=pad_token_id(tokenizer),
        )
        answers.append(decode_answer(tokenizer, output[0, input_ids.shape[1] :].tolist()))
    return answers
