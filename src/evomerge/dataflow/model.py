"""The in-memory path model: any LayerPath run over the live layers of the pool's models, no weight copied.

It is the owner's own causal-LM class (so `generate`, the cache API, `logits_to_keep` and every evaluator
work on it as on the owner), built empty on the meta device and then given the owner's embeddings, final
norm, rotary embedding and LM head, and one `PathLayer` per path position wrapping the source model's
live decoder layer. Building one is cheap (no tensor is allocated), so each candidate gets its own.

A cache has one slot per path *position*, not per source layer: a layer that appears twice on the path
sees two different inputs and must keep two sets of keys and values. `PathLayer` hands its layer a view
of the cache (`SlotCache`) whose `update` writes the position's slot, whatever index the layer holds.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch

from evomerge.dataflow.path import LayerPath


class SlotCache:
    """A view of a transformers cache that stores one layer's keys and values in slot `slot`."""

    def __init__(self, cache: Any, slot: int) -> None:
        self.cache = cache
        self.slot = slot

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> Any:
        return self.cache.update(key_states, value_states, self.slot, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:  # anything else a layer reads (seq length, ...) is the cache's
        return getattr(self.cache, name)


class PathLayer(torch.nn.Module):
    """Position `slot` of a path: scales the incoming hidden state, then runs a source's decoder layer."""

    def __init__(self, layer: torch.nn.Module, scale: float, slot: int) -> None:
        super().__init__()
        self.layer = layer  # the source model's live module: shared, never copied
        self.scale = float(scale)
        self.slot = slot

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        for key in ("cache", "past_key_values"):  # the name transformers uses has changed across versions
            if kwargs.get(key) is not None:
                kwargs[key] = SlotCache(kwargs[key], self.slot)
        if self.scale != 1.0:
            hidden_states = hidden_states * self.scale  # (B, T, C)
        return self.layer(hidden_states, *args, **kwargs)


def path_model(models: Sequence[torch.nn.Module], path: LayerPath) -> torch.nn.Module:
    """The causal LM that runs `path` over `models` (live, in pool order); see the module doc."""
    owner: Any = models[path.owner]
    config = copy.deepcopy(owner.config)
    config.num_hidden_layers = 0
    with torch.device("meta"):
        shell: Any = type(owner)(config)
    for name, _ in list(shell.model.named_children()):
        if name != "layers":
            setattr(shell.model, name, getattr(owner.model, name))
    shell.lm_head = owner.lm_head
    layers = [_decoder_layers(models[s.model])[s.layer] for s in path.steps]
    shell.model.layers = torch.nn.ModuleList(
        PathLayer(layer, step.scale, slot)
        for slot, (layer, step) in enumerate(zip(layers, path.steps, strict=True))
    )
    shell.config.num_hidden_layers = len(path)  # the cache sizes itself (one slot per position) from this
    kinds = [getattr(models[s.model].config, "layer_types", None) for s in path.steps]
    if all(kind is not None for kind in kinds):  # per-layer attention kinds (sliding windows) follow the path
        shell.config.layer_types = [kind[s.layer] for kind, s in zip(kinds, path.steps, strict=True)]  # type: ignore[index]
    shell.generation_config = copy.deepcopy(owner.generation_config)
    return shell.eval()


def _decoder_layers(model: torch.nn.Module) -> Any:
    return model.model.layers  # type: ignore[union-attr]
