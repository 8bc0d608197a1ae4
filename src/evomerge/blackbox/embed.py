"""Prompt embeddings from a small local model, the router's `combine.embedding` features.

A prompt's embedding is the mean of the model's last hidden states over the prompt's tokens, projected to
`dims` numbers by a Gaussian matrix drawn from `seed` (a fixed random projection keeps the router's genome
small whatever the model's width) and scaled to unit length. Computed once per prompt: `blackbox evolve`
embeds every recorded prompt when it loads them, `blackbox serve` each new prompt.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import torch

from evomerge.blackbox.config import EmbeddingFeature

BATCH = 32


def embed_prompts(spec: EmbeddingFeature, texts: Sequence[str]) -> np.ndarray:
    """(len(texts), spec.dims) unit-length rows; the same texts give the same rows."""
    model, tokenizer = _load(spec.model)
    pooled = [_mean_hidden(model, tokenizer, list(texts[i : i + BATCH])) for i in range(0, len(texts), BATCH)]
    hidden = torch.cat(pooled).double().numpy() if pooled else np.zeros((0, _width(model)))  # (N, H)
    projection = np.random.default_rng(spec.seed).standard_normal((hidden.shape[1], spec.dims))  # (H, D)
    rows = hidden @ projection  # (N, D)
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    return rows / np.where(norms > 0, norms, 1.0)


@cache
def _load(model_dir: Path) -> tuple[Any, Any]:
    from evomerge.eval.loading import load_model

    model, tokenizer = load_model(model_dir, dtype=torch.float32)
    if tokenizer is None:
        raise ValueError(f"combine.embedding.model: {model_dir} has no tokenizer files to read prompts with")
    return model.eval(), tokenizer


def _width(model: Any) -> int:
    return int(model.config.hidden_size)


def _mean_hidden(model: Any, tokenizer: Any, texts: list[str]) -> torch.Tensor:
    """(B, H): each text's last hidden states averaged over its own tokens (padding masked out)."""
    ids = [list(row) for row in tokenizer(texts)["input_ids"]]
    longest = max(len(row) for row in ids)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    input_ids = torch.tensor([row + [pad] * (longest - len(row)) for row in ids])  # right-padded (B, T)
    mask = torch.tensor([[1] * len(row) + [0] * (longest - len(row)) for row in ids])  # (B, T)
    with torch.inference_mode():
        out = model(input_ids=input_ids, attention_mask=mask, output_hidden_states=True)
    last = out.hidden_states[-1]  # (B, T, H)
    weights = mask.unsqueeze(-1).to(last.dtype)  # (B, T, 1)
    return (last * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)
