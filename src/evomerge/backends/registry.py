"""Backend names -> (settings block, factory). The run config's `backend` picks one; the loop only sees the
Backend protocol.

A config names a backend either by name (`backend: local`) or by a block whose `name` chooses it
(`backend: {name: ray, workers: 2}`); `parse_backend_settings` validates the block against that backend's
settings class (a pydantic model, like an optimiser's settings block) before any model loads. A factory
gets the settings and a `BackendRequest` (what every backend needs to score candidates: the live model's
architecture, the sources, the tasks, the evaluation settings) and returns a Backend. The Ray backend's
settings are registered here without importing Ray: `backends.ray` imports it only when a backend is
built. `register_backend` adds one from outside the package.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import ByteSize, ValidationError, create_model

from evomerge.backends.base import Backend, BackendSettings
from evomerge.backends.ray import RaySettings  # settings only: Ray itself is imported when one is built
from evomerge.configfile import settings_block_message
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


class LocalSettings(BackendSettings):
    """`local`: this process, one candidate at a time.

    `task_vector_cache`: keep the task-arithmetic family's task vectors across candidates ("auto": the
    trimmed ones of TIES/Breadcrumbs, up to half the free memory; "off"; or a cap such as "2GiB" or a
    byte count, which keeps the raw deltas too). The merge is the same bits."""

    name: Literal["local"] = "local"
    schedule: Literal["synchronous"] = "synchronous"
    task_vector_cache: Literal["auto", "off"] | ByteSize = "auto"


BackendFactory = Callable[[Any, BackendRequest], Backend]  # (settings, request) -> Backend


@dataclass(frozen=True)
class BackendEntry:
    settings: type[BackendSettings]
    factory: BackendFactory


def _local(settings: LocalSettings, request: BackendRequest) -> Backend:
    from evomerge.backends.local import LocalBackend

    return LocalBackend.create(
        request.base_model,
        request.sample_recipe,
        request.tasks,
        batch_size=request.batch_size,
        max_new_tokens=request.max_new_tokens,
        device=request.device,
        measures=request.measures,
        task_vector_cache=settings.task_vector_cache,
    )


def _ray(settings: RaySettings, request: BackendRequest) -> Backend:
    from evomerge.backends.ray import RayBackend  # imports ray: only when a Ray backend is built

    return RayBackend.create(settings, request)


_BACKENDS: dict[str, BackendEntry] = {
    "local": BackendEntry(LocalSettings, _local),
    "ray": BackendEntry(RaySettings, _ray),
}


def register_backend(
    name: str, factory: BackendFactory, settings: type[BackendSettings] | None = None
) -> None:
    """Make `name` choosable as `backend` in a run config, with `settings` as its block (default: a block
    with only `name`)."""
    if name in _BACKENDS:
        raise ValueError(f"backend {name!r} is registered twice")
    if settings is None:
        named: Any = Literal[name]
        settings = create_model(f"{name}Settings", __base__=BackendSettings, name=(named, name))
    _BACKENDS[name] = BackendEntry(settings, factory)


def backend_names() -> list[str]:
    return sorted(_BACKENDS)


def _entry(name: str) -> BackendEntry:
    try:
        return _BACKENDS[name]
    except KeyError:
        raise ConfigError(
            f"backend: unknown backend {name!r}; known: {', '.join(backend_names())}."
        ) from None


def parse_backend_settings(data: Any) -> BackendSettings:
    """The settings block of the backend `data` names (a name, or a mapping with `name`), validated; one
    located ConfigError otherwise."""
    if isinstance(data, BackendSettings):
        return data
    if isinstance(data, str):
        data = {"name": data}
    if not isinstance(data, dict):
        raise ConfigError(
            f"backend: expected a backend name ({', '.join(backend_names())}) or a mapping with a 'name', "
            f"got {type(data).__name__}."
        )
    name = str(data.get("name", "local"))
    entry = _entry(name)
    try:
        return entry.settings.model_validate({**data, "name": name})
    except ValidationError as error:
        raise ConfigError(_settings_message(error, name)) from None


def _settings_message(error: ValidationError, name: str) -> str:
    settings = {n: entry.settings for n, entry in _BACKENDS.items()}
    return settings_block_message(error, block="backend", name=name, settings=settings, docs="docs/ray.md")


def make_backend(settings: BackendSettings | str, request: BackendRequest) -> Backend:
    """The backend `settings` (or a bare name) chooses, built for `request`."""
    parsed = parse_backend_settings(settings)
    return _entry(parsed.name).factory(parsed, request)
