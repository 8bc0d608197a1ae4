"""Training loops of the lm zoo: pre-train a tiny Llama on the bare corpus, fine-tune it on one skill.

Lessons of the probe (issue 4) are built in: every fine-tune batch is half skill examples and half
replayed pre-training lines, at a low learning rate for a few hundred steps, so a specialist keeps what
the base knew and stays close enough to it for merges to work.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

IGNORE = -100  # label id that cross-entropy skips


@dataclass(frozen=True)
class Lines:
    """Tokenised lines, right-padded: `ids` (N, T) and `labels` (N, T) with IGNORE where no loss is taken."""

    ids: torch.Tensor
    labels: torch.Tensor
    lengths: torch.Tensor  # (N,) real length of each line

    def batch(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The rows `rows`, cut to the longest of them (padding columns cost time and teach nothing)."""
        width = int(self.lengths[rows].max())
        return self.ids[rows, :width], self.labels[rows, :width]

    def __len__(self) -> int:
        return int(self.ids.shape[0])


def encode_lines(tokenizer: Any, texts: Sequence[str], loss_from: Sequence[int] | None = None) -> Lines:
    """Each text + newline + EOS. Loss on every token, or only from character `loss_from[i]` on (answers)."""
    encoded = tokenizer([text + "\n" for text in texts], add_special_tokens=False)["input_ids"]
    rows = [[*ids, tokenizer.eos_token_id] for ids in encoded]
    width = max(len(row) for row in rows)
    ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    for index, row in enumerate(rows):
        ids[index, : len(row)] = torch.tensor(row)
        start = 0 if loss_from is None else loss_from[index]  # one token per character
        labels[index, start : len(row)] = ids[index, start : len(row)]
    return Lines(ids, labels, torch.tensor([len(row) for row in rows]))


@dataclass(frozen=True)
class Schedule:
    """AdamW for `steps` steps: linear warm-up, then cosine decay to `final_fraction` of the peak rate."""

    steps: int
    learning_rate: float
    warmup: int = 50
    final_fraction: float = 0.1
    weight_decay: float = 0.0

    def rate(self, step: int) -> float:
        if step < self.warmup:
            return self.learning_rate * (step + 1) / self.warmup
        progress = (step - self.warmup) / max(1, self.steps - self.warmup)
        cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        return self.learning_rate * (self.final_fraction + (1 - self.final_fraction) * cosine)


def train(
    model: torch.nn.Module,
    sources: Sequence[tuple[Lines, int]],
    schedule: Schedule,
    *,
    generator: torch.Generator,
    advance: Callable[[int], None],
) -> list[float]:
    """Train on batches that draw `count` random rows from each `(lines, count)` source; return the losses.

    Several sources make the fine-tune mix (skill examples + replayed pre-training lines) explicit.
    """
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=schedule.learning_rate, betas=(0.9, 0.98), weight_decay=schedule.weight_decay
    )
    model.train()
    losses = []
    for step in range(schedule.steps):
        for group in optimizer.param_groups:
            group["lr"] = schedule.rate(step)
        loss = _step_loss(model, [_draw(lines, count, generator) for lines, count in sources])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
        advance(1)
    model.eval()
    return losses


def _draw(lines: Lines, count: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    return lines.batch(torch.randint(len(lines), (count,), generator=generator))


def _step_loss(model: torch.nn.Module, parts: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Mean next-token loss over every labelled token; the parts are padded to one width, one forward pass."""
    width = max(ids.shape[1] for ids, _ in parts)
    ids = torch.cat([torch.nn.functional.pad(ids, (0, width - ids.shape[1])) for ids, _ in parts])  # (B, T)
    labels = torch.cat(
        [torch.nn.functional.pad(lab, (0, width - lab.shape[1]), value=IGNORE) for _, lab in parts]
    )
    logits = model(input_ids=ids).logits  # (B, T, V)
    # Token t is predicted from positions < t; right padding never reaches a labelled token (causal mask).
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=IGNORE
    )
