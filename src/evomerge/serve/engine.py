"""The generation engine of `evomerge serve`: one batch of jobs through the evaluator's batched decoding.

A job is one choice of one request (a request with `n=4` is four jobs). Every job of a batch is decoded in
the same forward passes (`eval.generation.decode_batch`); each picks its own next token by its own rule:
greedy at temperature 0, else a sample after temperature and top-p, drawn from the job's own generator
seeded from the request's seed, so a seeded job gives the same sample whatever else shares its batch.
Log-probabilities are the model's own log-softmax of the raw logits (before temperature or top-p).

The engine is not thread-safe: one worker thread owns it (see scheduler.py).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from evomerge.eval.generation import decode_batch, model_device, pad_token_id

FinishReason = Literal["stop", "length"]


@dataclass(frozen=True)
class TokenLogprob:
    """A token with its log-probability and the `top` most likely tokens at its position (id, logprob)."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass
class Job:
    """One sequence to generate. `top_logprobs=None`: no log-probabilities; k >= 0: the token's and k more."""

    prompt_ids: list[int]
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0
    stop: tuple[str, ...] = ()
    top_logprobs: int | None = None
    echo_logprobs: bool = False  # also score the prompt's tokens (the legacy `echo` with `logprobs`)
    on_token: Callable[[TokenLogprob], None] | None = None  # called in the worker thread, per new token


@dataclass
class Generated:
    """What a job produced: its tokens (with log-probabilities when asked), text and why it ended."""

    tokens: list[TokenLogprob]
    text: str
    finish_reason: FinishReason
    prompt_logprobs: list[TokenLogprob | None] | None = None  # first token: None (nothing before it)

    @property
    def token_ids(self) -> list[int]:
        return [token.token_id for token in self.tokens]


@dataclass
class _Row:
    """A job's state while it decodes."""

    job: Job
    generator: torch.Generator
    tokens: list[TokenLogprob] = field(default_factory=list)
    stopped: bool = False


class Engine:
    """Runs batches of Jobs on one causal LM. `context_length` None: the model sets no limit."""

    def __init__(self, model: Any, tokenizer: Any, *, context_length: int | None = None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.context_length = context_length
        self.pad_id = pad_token_id(tokenizer)
        eos = tokenizer.eos_token_id
        self._token_text: dict[int, str] = {}  # decoded text of single tokens
        self.eos_ids = frozenset(
            int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos]) if e is not None
        )

    def run(self, jobs: Sequence[Job]) -> list[Generated]:
        """Generate every job in one batch; results in input order."""
        rows = [_Row(job, torch.Generator().manual_seed(job.seed)) for job in jobs]
        with torch.inference_mode():
            prompt_logprobs = self._prompt_logprobs(jobs)
            decoding = [index for index, job in enumerate(jobs) if self.budget(job) > 0]
            if decoding:
                self._decode([rows[index] for index in decoding])
        return [self._finish(row, prompt_logprobs.get(index)) for index, row in enumerate(rows)]

    def budget(self, job: Job) -> int:
        """Tokens the job may generate: its max_tokens, cut where the context ends."""
        if self.context_length is None:
            return job.max_tokens
        return max(0, min(job.max_tokens, self.context_length - len(job.prompt_ids)))

    def decode(self, token_ids: Sequence[int]) -> str:
        return str(self.tokenizer.decode(list(token_ids), skip_special_tokens=True))

    def _decode(self, rows: list[_Row]) -> None:
        def choose(logits: torch.Tensor, live: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            running = [rows[index] for index in live.tolist()]
            tokens = self._pick(running, logits)  # (b,)
            logprobs = torch.log_softmax(logits, dim=-1)  # (b, V)
            chosen = logprobs.gather(-1, tokens[:, None]).squeeze(-1).tolist()  # (b,)
            tops = _top_logprobs(logprobs, [row.job.top_logprobs or 0 for row in running])
            for row, token, logprob, top in zip(running, tokens.tolist(), chosen, tops, strict=True):
                self._record(row, TokenLogprob(token, logprob, top))
            stopped = torch.tensor([row.stopped for row in running], device=logits.device)
            return tokens, stopped

        decode_batch(
            self.model,
            [row.job.prompt_ids for row in rows],
            choose=choose,
            pad_id=self.pad_id,
            max_new_tokens=[self.budget(row.job) for row in rows],
        )

    @staticmethod
    def _pick(running: list[_Row], logits: torch.Tensor) -> torch.Tensor:
        """Each row's next token (b,): the argmax for every row at once, then draws for sampling rows."""
        tokens = logits.argmax(dim=-1)  # (b,)
        for position, row in enumerate(running):
            if row.job.temperature != 0:
                tokens[position] = _sample(logits[position], row.job, row.generator)
        return tokens

    def _record(self, row: _Row, info: TokenLogprob) -> None:
        """Keep the row's new token, tell the listener, and decide whether the row stops."""
        row.tokens.append(info)
        if row.job.on_token is not None:
            row.job.on_token(info)
        token, stops = info.token_id, row.job.stop
        row.stopped = token in self.eos_ids or (
            self._may_end_a_stop(token, stops)
            and find_stop(self.decode([t.token_id for t in row.tokens]), stops) >= 0
        )

    def _may_end_a_stop(self, token: int, stops: Sequence[str]) -> bool:
        """False when the token's text holds no stop string's last character (then no stop just ended).

        A token decoded alone may lose a leading space it has in context (SentencePiece), so stops that
        end in a space are always checked.
        """
        if not stops:
            return False
        if any(stop.endswith(" ") for stop in stops):
            return True
        if token not in self._token_text:
            self._token_text[token] = self.decode([token])
        text = self._token_text[token]
        return "\ufffd" in text or not text or any(stop[-1] in text for stop in stops if stop)

    def _finish(self, row: _Row, prompt_logprobs: list[TokenLogprob | None] | None) -> Generated:
        text = self.decode([t.token_id for t in row.tokens])
        cut = find_stop(text, row.job.stop)
        stopped = cut >= 0 or (bool(row.tokens) and row.tokens[-1].token_id in self.eos_ids)
        return Generated(
            tokens=row.tokens,
            text=text[:cut] if cut >= 0 else text,
            finish_reason="stop" if stopped else "length",
            prompt_logprobs=prompt_logprobs,
        )

    def _prompt_logprobs(self, jobs: Sequence[Job]) -> dict[int, list[TokenLogprob | None]]:
        """Log-probability of each prompt token given the ones before it, for the jobs that ask (one pass)."""
        asking = [index for index, job in enumerate(jobs) if job.echo_logprobs]
        if not asking:
            return {}
        rows = [jobs[index].prompt_ids for index in asking]
        width = max(len(row) for row in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for index, row in enumerate(rows):  # right padding: positions stay 0..n-1
            ids[index, : len(row)], mask[index, : len(row)] = torch.tensor(row), 1
        device = model_device(self.model)
        logits = self.model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits  # (B, T, V)
        logprobs = torch.log_softmax(logits.float(), dim=-1)  # (B, T, V)
        return {
            index: _scored_prompt(logprobs[position], rows[position], jobs[index].top_logprobs or 0)
            for position, index in enumerate(asking)
        }


def _top_logprobs(logprobs: torch.Tensor, ks: list[int]) -> list[tuple[tuple[int, float], ...]]:
    """The k most likely (id, logprob) of each row, with one topk for the whole batch. logprobs (b, V)."""
    most = min(max(ks, default=0), logprobs.shape[-1])
    if most == 0:
        return [()] * len(ks)
    values, indices = logprobs.topk(most, dim=-1)  # (b, most)
    return [
        tuple(zip(row_ids[:k], row_values[:k], strict=True))
        for row_ids, row_values, k in zip(indices.tolist(), values.tolist(), ks, strict=True)
    ]


def _scored_prompt(logprobs: torch.Tensor, row: list[int], k: int) -> list[TokenLogprob | None]:
    """Token t's log-probability is read at position t - 1; the first token has none. logprobs (T, V)."""
    scored: list[TokenLogprob | None] = [None]
    for t in range(1, len(row)):
        before = logprobs[t - 1]  # (V,)
        top: tuple[tuple[int, float], ...] = ()
        if k:
            values, indices = before.topk(min(k, before.shape[-1]))
            top = tuple(zip(indices.tolist(), values.tolist(), strict=True))
        scored.append(TokenLogprob(row[t], float(before[row[t]]), top))
    return scored


def _sample(logits: torch.Tensor, job: Job, generator: torch.Generator) -> int:
    """A token drawn from softmax(logits / temperature) restricted to the top-p nucleus. logits (V,)."""
    probs = torch.softmax(logits.float() / job.temperature, dim=-1)  # (V,)
    sorted_probs, order = probs.sort(descending=True)  # (V,), (V,)
    if job.top_p < 1.0:
        # Keep the smallest prefix whose mass reaches top_p: a token stays if the mass before it is short.
        before = sorted_probs.cumsum(dim=-1) - sorted_probs  # (V,)
        sorted_probs = torch.where(before < job.top_p, sorted_probs, torch.zeros_like(sorted_probs))
    cumulative = sorted_probs.cumsum(dim=-1)  # (V,)
    # One uniform draw per token, by inverse CDF: the same seed gives the same token on any batch.
    threshold = torch.rand((), generator=generator).item() * float(cumulative[-1])
    position = int(torch.searchsorted(cumulative, cumulative.new_tensor([threshold]), right=True)[0])
    return int(order[min(position, len(order) - 1)])


def find_stop(text: str, stops: Sequence[str]) -> int:
    """Index of the earliest stop string in `text`, -1 when none occurs."""
    found = [index for index in (text.find(stop) for stop in stops if stop) if index >= 0]
    return min(found) if found else -1


def held_back(text: str, stops: Sequence[str]) -> int:
    """How many trailing characters of `text` a stream must hold back: the start of a stop string that
    later tokens may complete, or a partly decoded character (U+FFFD)."""
    hold = len(text) - len(text.rstrip("\ufffd"))
    for stop in stops:
        for size in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:size]):
                hold = max(hold, size)
                break
    return hold
