"""The in-memory path model: identity reproduces the owner, layers are shared, the cache has a slot per
position (greedy generation with the cache equals recomputing every prefix without one)."""

from __future__ import annotations

import torch

from evomerge.dataflow.model import path_model
from evomerge.dataflow.pool import PoolModel
from evomerge.eval.generation import greedy_generate

from .conftest import SCALED, a_path

IDS = torch.tensor([[1, 5, 9, 14, 3, 22, 7], [1, 8, 8, 30, 2, 11, 40]])  # (B, T)


def test_the_identity_path_reproduces_the_owners_logits(
    pool: list[PoolModel], live: list[torch.nn.Module]
) -> None:
    identity = a_path(pool, *((0, layer, 1.0) for layer in range(4)))
    with torch.inference_mode():
        expected = live[0](IDS).logits
        got = path_model(live, identity)(IDS).logits
    assert torch.equal(got, expected)


def test_the_path_model_runs_the_sources_live_layers_without_copies(
    pool: list[PoolModel], live: list[torch.nn.Module]
) -> None:
    model = path_model(live, a_path(pool, *SCALED))
    shared = {p.data_ptr() for m in live for p in m.parameters()}
    assert all(p.data_ptr() in shared for p in model.parameters())
    assert model.model.layers[2].layer is live[1].model.layers[1]
    assert model.config.num_hidden_layers == 6 and live[0].config.num_hidden_layers == 4


def test_scales_change_the_output(pool: list[PoolModel], live: list[torch.nn.Module]) -> None:
    unit = a_path(pool, *((m, layer, 1.0) for m, layer, _ in SCALED))
    with torch.inference_mode():
        a = path_model(live, a_path(pool, *SCALED))(IDS).logits
        b = path_model(live, unit)(IDS).logits
    assert not torch.allclose(a, b)


def test_cached_generation_equals_recomputing_each_prefix(
    pool: list[PoolModel], live: list[torch.nn.Module]
) -> None:
    model = path_model(live, a_path(pool, *SCALED))  # ft0.1 runs twice: two cache slots
    prompts = [[1, 5, 9], [1, 8, 8, 30, 2], [1, 40]]
    cached = greedy_generate(model, prompts, stop_ids=[], pad_id=0, max_new_tokens=6, batch_size=3)
    for prompt, tokens in zip(prompts, cached, strict=True):
        ids = torch.tensor([prompt])
        for token in tokens:
            with torch.inference_mode():
                expected = int(model(ids, use_cache=False).logits[0, -1].argmax())
            assert token == expected
            ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
