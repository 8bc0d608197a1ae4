"""The weights space: layout from headers, bounds, decode/encode, text, genomes of sources, export."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from evomerge.errors import ConfigError
from evomerge.search.base import SearchSpace
from evomerge.search.weights import (
    BOUND_SCALE,
    MIN_MAGNITUDE,
    WeightsCandidate,
    WeightsSpace,
    floats_from_text,
    floats_to_text,
    natural_key,
)
from evomerge.zoo.digits import MLPClassifier

SIZES = (64, 6, 10)  # 64*6 + 6 + 6*10 + 10 = 460 genes


def mlp(directory: Path, seed: int) -> Path:
    model = MLPClassifier(SIZES)
    model.reset_parameters(torch.Generator().manual_seed(seed))
    model.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("weights")
    return {name: mlp(root / name, seed) for seed, name in enumerate(("base", "low", "high"))}


@pytest.fixture(scope="module")
def space(models: dict[str, Path]) -> WeightsSpace:
    return WeightsSpace.from_models(models["base"], [models["low"], models["high"]])


def source_recipe(model: Path) -> dict:
    return {"merge_method": "linear", "models": [{"model": str(model), "parameters": {"weight": 1.0}}]}


def test_layout_is_the_float_tensors_in_natural_name_order(tmp_path: Path) -> None:
    tensors = {
        "layers.10.weight": torch.zeros(2),
        "layers.2.weight": torch.zeros(3, 2),
        "layers.2.bias": torch.zeros(3),
        "position_ids": torch.arange(4),  # an integer buffer: not a gene
    }
    save_file(tensors, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text("{}")
    space = WeightsSpace.from_models(tmp_path, [tmp_path, tmp_path])
    assert [(s.name, s.shape, s.offset) for s in space.slots] == [
        ("layers.2.bias", (3,), 0),
        ("layers.2.weight", (3, 2), 3),
        ("layers.10.weight", (2,), 9),
    ]
    assert space.dim == 11
    np.testing.assert_array_equal(space.bounds[1], BOUND_SCALE * MIN_MAGNITUDE)  # all zeros: the floor
    assert sorted(["b.10", "b.9", "a"], key=natural_key) == ["a", "b.9", "b.10"]


def test_it_is_a_search_space(space: WeightsSpace) -> None:
    assert isinstance(space, SearchSpace)
    assert space.dim == 64 * 6 + 6 + 6 * 10 + 10
    assert "460 genes" in space.describe() and space.per_layer(np.zeros(space.dim)) == {}


def test_bounds_are_symmetric_and_hold_every_source(space: WeightsSpace, models: dict[str, Path]) -> None:
    lower, upper = space.bounds
    np.testing.assert_array_equal(lower, -upper)
    for name in ("base", "low", "high"):
        genome = space.read_genome(models[name])
        assert np.all(np.abs(genome) <= upper / BOUND_SCALE + 1e-7)
    bias = space.slots[0]  # layers.0.bias
    largest = max(float(np.abs(space.read_genome(models[n])[bias.offset : bias.stop]).max()) for n in models)
    assert upper[bias.offset] == pytest.approx(BOUND_SCALE * largest)


def test_decode_encode_round_trip(space: WeightsSpace, models: dict[str, Path]) -> None:
    genome = space.read_genome(models["low"])
    candidate = space.decode(genome)
    assert candidate.values.dtype == np.float32
    np.testing.assert_array_equal(space.encode(candidate), genome)  # the source's float32 weights, exactly
    tensors = dict(candidate.tensors())
    assert torch.equal(
        tensors["layers.1.weight"], MLPClassifier.from_pretrained(models["low"]).layers[1].weight
    )
    _, upper = space.bounds
    np.testing.assert_array_equal(space.decode(upper * 2).values, upper.astype(np.float32))  # clipped


def test_genome_of_reads_a_source_alone_and_nothing_else(
    space: WeightsSpace, models: dict[str, Path]
) -> None:
    genome = space.genome_of(source_recipe(models["high"]))
    assert genome is not None
    np.testing.assert_array_equal(genome, space.read_genome(models["high"]))
    two = source_recipe(models["low"])
    two["models"].append({"model": str(models["high"]), "parameters": {"weight": 1.0}})
    assert space.genome_of(two) is None  # a merge: not a point of this space without merging first
    assert space.genome_of(source_recipe(Path("/elsewhere/model"))) is None
    np.testing.assert_array_equal(space.source_genomes()[1], space.read_genome(models["high"]))
    with pytest.raises(ConfigError, match="only a whole model"):
        space.encode(two)


def test_text_round_trip_and_other_text(space: WeightsSpace, models: dict[str, Path]) -> None:
    candidate = space.decode(space.read_genome(models["low"]) * 0.5)
    text = space.to_text(candidate)
    assert json.loads(text)["space"] == "weights" and len(text) < 8 * space.dim
    np.testing.assert_array_equal(space.from_text(text).values, candidate.values)
    recipe_text = f"merge_method: linear\nmodels:\n- model: {models['low']}\n  parameters: {{weight: 1.0}}\n"
    assert space.from_text(recipe_text).merge_method == "linear"  # a warm-start recipe stays a recipe
    other = WeightsCandidate(space.slots[:1], candidate.values[:6])
    with pytest.raises(ConfigError, match="another architecture"):
        space.from_text(json.dumps({**json.loads(space.to_text(other))}))


def test_export_writes_a_model_dir_the_zoo_loads(space: WeightsSpace, tmp_path: Path) -> None:
    genome = np.random.default_rng(0).normal(0, 0.1, space.dim)
    candidate = space.decode(genome)
    out = space.export(space.to_text(candidate), tmp_path / "out", seed=0)
    loaded = MLPClassifier.from_pretrained(out)
    live = MLPClassifier(SIZES)
    candidate.write_into(live)
    features = torch.rand(4, 64)
    assert torch.equal(loaded(features), live(features))
    assert json.loads((out / "config.json").read_text())["layer_sizes"] == list(SIZES)


def test_write_into_names_a_mismatched_live_model(space: WeightsSpace) -> None:
    from evomerge.merge.engine import LiveModelMismatchError

    with pytest.raises(LiveModelMismatchError, match=r"layers.0.bias"):
        space.decode(np.zeros(space.dim)).write_into(MLPClassifier((64, 7, 10)))


def test_float_text_is_exact_and_compact() -> None:
    as32 = np.random.default_rng(0).normal(size=100).astype(np.float32).astype(np.float64)
    assert floats_to_text(as32).startswith("f32:") and len(floats_to_text(as32)) < 6 * 100
    np.testing.assert_array_equal(floats_from_text(floats_to_text(as32)), as32)
    full = np.array([0.1, -1e-300, 3.0])
    assert floats_to_text(full).startswith("f64:")
    np.testing.assert_array_equal(floats_from_text(floats_to_text(full)), full)
    with pytest.raises(ValueError, match="f32"):
        floats_from_text("[0.1]")
