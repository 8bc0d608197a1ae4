"""Batched generation with a KV cache, for Hugging Face causal LMs: greedy for the evaluator, any rule for the server.

Why not `model.generate`: it is built for one request at a time plus a long tail of options; in the
evolve loop the same few hundred short prompts are scored thousands of times. Here prompts are sorted by
length (so a batch holds rows of similar length and little padding), left-padded with a matching
attention mask and position ids (so a padded row computes what it would alone, up to float rounding),
decoded with a cache; a row leaves the batch (and the cache) at its first newline or EOS, and the
batch stops when every row has. `decode_batch` is the loop itself, with the choice of each next token left
to a `TokenChooser`: the evaluator's is greedy, `evomerge serve` samples and records log-probabilities.
The cache goes in by the `cache` keyword of transformers 5.24 (`past_key_values` is deprecated there).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator, Sequence
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


TokenChooser = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
"""`choose(logits (b, V), live (b,)) -> (next_ids (b,), stopped (b,) bool)`: picks each running row's next
token from its last-position logits (float32); `live[i]` is the index (in the batch's rows) of row i."""


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

    def greedy(logits: torch.Tensor, live: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        next_ids = logits.argmax(dim=-1)  # (b,)
        return next_ids, torch.isin(next_ids, stops)

    outputs: list[list[int]] = [[] for _ in prompt_ids]
    for chunk in _length_sorted_batches(prompt_ids, batch_size):
        rows = [prompt_ids[index] for index in chunk]
        generated = decode_batch(
            model, rows, choose=greedy, pad_id=pad_id, max_new_tokens=[max_new_tokens] * len(rows)
        )
        for index, tokens in zip(chunk, generated, strict=True):
            outputs[index] = tokens
    return outputs


def _length_sorted_batches(prompt_ids: Sequence[Sequence[int]], batch_size: int) -> Iterator[list[int]]:
    order = sorted(range(len(prompt_ids)), key=lambda index: len(prompt_ids[index]))
    for start in range(0, len(order), batch_size):
        yield order[start : start + batch_size]


def decode_batch(
    model: Any,
    rows: Sequence[Sequence[int]],
    *,
    choose: TokenChooser,
    pad_id: int,
    max_new_tokens: Sequence[int],
) -> list[list[int]]:
    """Decode one batch of prompts together, one forward pass a step, with a KV cache.

    `choose` picks the next tokens (greedy, sampled, ...) and says which rows stopped; a row also stops
    after `max_new_tokens[row]` tokens (at least 1). A stopped row leaves the batch and the cache at once.
    Returns each row's new tokens, the stopping token included.
    """
    from transformers import DynamicCache

    device = model_device(model)
    input_ids, mask = left_pad(rows, pad_id, device=device)  # (B, T), (B, T)
    positions = (mask.cumsum(dim=-1) - 1).clamp(min=0)  # (B, T): a padded row starts at position 0
    budgets = torch.tensor([max(1, n) for n in max_new_tokens], device=device)  # (B,)
    cache = DynamicCache(config=model.config)
    logits = _last_logits(model, input_ids, mask, positions, cache)  # (b, V), b rows still running
    live = torch.arange(len(rows), device=device)  # (b,) index in `rows` of each running row
    outputs: list[list[int]] = [[] for _ in rows]
    for step in range(int(budgets.max())):
        next_ids, stopped = choose(logits, live)  # (b,), (b,)
        for row, token in zip(live.tolist(), next_ids.tolist(), strict=True):
            outputs[row].append(token)
        running = ~stopped & (budgets[live] > step + 1)  # (b,)
        if not bool(running.any()):
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
    extra: dict[str, Any] = {"logits_to_keep": 1} if _accepts_logits_to_keep(type(model)) else {}
    extra[_cache_keyword(type(model))] = cache
    output = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, **extra)
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


_CACHE_KEYWORD: dict[type, str] = {}


def _cache_keyword(model_class: type) -> str:
    """`cache`, the keyword transformers 5.24 takes the KV cache by, else the older `past_key_values`.

    5.24 still accepts `past_key_values` but warns that it goes in 5.40; models that predate the rename
    (remote code, older transformers) only know the old name.
    """
    if model_class not in _CACHE_KEYWORD:
        forward = getattr(model_class, "forward", None)
        names = inspect.signature(forward).parameters if forward is not None else {}
        _CACHE_KEYWORD[model_class] = "cache" if "cache" in names else "past_key_values"
    return _CACHE_KEYWORD[model_class]


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
