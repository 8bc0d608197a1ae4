"""Batched log-likelihood of continuations given contexts: the core of choice accuracy and perplexity.

Context and continuation are tokenised separately and concatenated (as lm-eval-harness does), so the
scored tokens are exactly the continuation's tokens whatever the tokenizer merges across the boundary.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from evomerge.eval.generation import model_device


@dataclass(frozen=True)
class EncodedPair:
    """Token ids of a context and of the continuation to score after it."""

    context: tuple[int, ...]
    continuation: tuple[int, ...]


def encode_pairs(tokenizer: Any, pairs: Sequence[tuple[str, str]]) -> list[EncodedPair]:
    """Encode (context, continuation) pairs; an empty context takes the continuation's first token.

    A context with no token at all (no BOS, empty prompt) leaves nothing to condition the first token on,
    so that token becomes context and is not scored, as in the usual perplexity of a text.
    """
    if not pairs:
        return []
    contexts = tokenizer([context for context, _ in pairs])["input_ids"]
    continuations = tokenizer([text for _, text in pairs], add_special_tokens=False)["input_ids"]
    encoded = []
    for context, continuation in zip(contexts, continuations, strict=True):
        if not context and continuation:
            context, continuation = continuation[:1], continuation[1:]
        encoded.append(EncodedPair(tuple(context), tuple(continuation)))
    return encoded


def continuation_logliks(
    model: Any, pairs: Sequence[EncodedPair], *, pad_id: int, batch_size: int = 64
) -> list[tuple[float, int]]:
    """(summed log-likelihood in nats, number of scored tokens) of each continuation, in input order."""
    device = model_device(model)
    results: list[tuple[float, int]] = [(0.0, 0)] * len(pairs)
    scorable = [index for index, pair in enumerate(pairs) if pair.continuation]  # nothing to score: (0.0, 0)
    order = sorted(scorable, key=lambda index: len(pairs[index].context) + len(pairs[index].continuation))
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        sums = _batch_logliks(model, [pairs[index] for index in chunk], pad_id, device)
        for index, total in zip(chunk, sums, strict=True):
            results[index] = (total, len(pairs[index].continuation))
    return results


def _batch_logliks(model: Any, pairs: list[EncodedPair], pad_id: int, device: torch.device) -> list[float]:
    rows = [pair.context + pair.continuation for pair in pairs]
    width = max(len(row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    scored = torch.zeros((len(rows), width - 1), dtype=torch.bool)  # position t predicts token t + 1
    for index, (row, pair) in enumerate(zip(rows, pairs, strict=True)):
        ids[index, : len(row)] = torch.tensor(row, dtype=torch.long)  # right padding: positions stay 0..n-1
        mask[index, : len(row)] = 1
        scored[index, len(pair.context) - 1 : len(row) - 1] = True
    logits = (
        model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits[:, :-1].float()
    )  # (B, T-1, V)
    targets = ids[:, 1:].to(device)  # (B, T-1)
    token_logprobs = logits.gather(-1, targets[..., None]).squeeze(-1) - logits.logsumexp(dim=-1)  # (B, T-1)
    token_logprobs = torch.where(scored.to(device), token_logprobs, torch.zeros_like(token_logprobs))
    return [float(value) for value in token_logprobs.sum(dim=-1).tolist()]
