"""Backend names -> factories. The run config's `backend` picks one; the loop only sees the Backend protocol.

A factory gets a `BackendRequest` (what every backend needs to score candidates: the live model's
architecture, the sources, the tasks, the evaluation settings) and returns a Backend. The Ray backend of a
later issue registers itself here under its own name; `register_backend` adds one from outside the package.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from evomerge.backends.base import Backend
from evomerge.errors import ConfigError


@dataclass(frozen=True)
class BackendRequest:
    """What a backend is built from."""

    base_model: Path  # the live model's architecture (and tokenizer)
    sample_recipe: Any  # a recipe naming every model a candidate may read (their tensors are loaded once)
    tasks: list[Any]  # evomerge.eval.tasks.Task, the split being scored
    batch_size: int = 64
    max_new_tokens: int | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    measures: tuple[str, ...] = ()  # behaviour measures to add to every result ("sparsity")


BackendFactory = Callable[[BackendRequest], Backend]


def _local(request: BackendRequest) -> Backend:
    from evomerge.backends.local import LocalBackend

    return LocalBackend.create(
        request.base_model,
        request.sample_recipe,
        request.tasks,
        batch_size=request.batch_size,
        max_new_tokens=request.max_new_tokens,
        device=request.device,
        measures=request.measures,
    )


_BACKENDS: dict[str, BackendFactory] = {"local": _local}


def register_backend(name: str, factory: BackendFactory) -> None:
    """Make `name` choosable as `backend` in a run config."""
    if name in _BACKENDS:
        raise ValueError(f"backend {name!r} is registered twice")
    _BACKENDS[name] = factory


def backend_names() -> list[str]:
    return sorted(_BACKENDS)


def make_backend(name: str, request: BackendRequest) -> Backend:
    """The backend registered under `name`, built for `request`."""
    try:
        factory = _BACKENDS[name]
    except KeyError:
        raise ConfigError(
            f"backend: unknown backend {name!r}; known: {', '.join(backend_names())}."
        ) from None
    return factory(request)
