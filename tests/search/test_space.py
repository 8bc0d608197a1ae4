"""The genome codec: round trips, layout, mergekit gradient semantics, and bound checks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from evomerge.errors import ConfigError
from evomerge.merge.gradients import evaluate as engine_evaluate
from evomerge.merge.gradients import layer_position
from evomerge.merge.registry import get_method
from evomerge.search.space import ParameterSpace, derive_filters
from evomerge.zoo.random_models import FamilySpec, build_family

SPACES = {
    "ties-model": dict(method="ties", granularity="model"),
    "ties-layer-separate": dict(
        method="ties", granularity="layer", separate=["attention", "mlp", "embedding"]
    ),
    "dare-group3": dict(
        method="dare_ties",
        granularity="group",
        group_size=3,
        parameters={"weight": (0.0, 2.0), "density": (0.2, 1.0), "lambda": (0.5, 1.5)},
    ),
    "slerp-layer-attn": dict(method="slerp", granularity="layer", separate=["attention"]),
    "linear-group2": dict(method="linear", granularity="group", group_size=2, separate=["embedding"]),
}


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return build_family(tmp_path_factory.mktemp("space"), FamilySpec(overrides={"num_hidden_layers": 5}))


def make_space(family: dict[str, Path], method: str, **kwargs: object) -> ParameterSpace:
    models = [family["ft0"]] if method == "slerp" else [family["ft0"], family["ft1"]]
    return ParameterSpace.from_models(family["base"], models, method, **kwargs)  # type: ignore[arg-type]


@pytest.fixture(scope="module", params=list(SPACES))
def space(request: pytest.FixtureRequest, family: dict[str, Path]) -> ParameterSpace:
    return make_space(family, **SPACES[request.param])  # type: ignore[arg-type]


unit_genomes = st.integers(0, 2**32 - 1).map(lambda seed: np.random.default_rng(seed))


@settings(max_examples=25, deadline=None)
@given(rng=unit_genomes)
def test_round_trip(space: ParameterSpace, rng: np.random.Generator) -> None:
    lower, upper = space.bounds
    x = rng.uniform(lower, upper)
    recipe = space.decode(x)
    x_again = space.encode(recipe)
    np.testing.assert_allclose(x_again, x, atol=1e-5)  # values are rounded to 6 decimals
    assert space.decode(x_again).to_dict() == recipe.to_dict()


@settings(max_examples=10, deadline=None)
@given(x=arrays(float, 3, elements=st.floats(-5, 5)))
def test_out_of_box_genes_are_clipped(family: dict[str, Path], x: np.ndarray) -> None:
    space = make_space(family, "ties", granularity="model", parameters={"weight": (0.0, 1.0)}, fixed={})
    padded = np.resize(x, space.dim)
    assert space.encode(space.decode(padded)) == pytest.approx(np.clip(padded, 0, 1), abs=1e-5)


def test_dims(family: dict[str, Path]) -> None:
    # ties: weight and density per model; 5 layers.
    assert make_space(family, "ties").dim == 2 * 2
    assert make_space(family, "ties", granularity="layer").dim == 2 * 2 * 5
    assert make_space(family, "ties", granularity="group", group_size=2).dim == 2 * 2 * 3
    # separate attention/mlp with per-layer anchors, embedding one gene: (1 + 2) * 5 + 1 per (param, model)
    separate = make_space(family, "ties", granularity="layer", separate=["attention", "mlp", "embedding"])
    assert separate.dim == 2 * 2 * (3 * 5 + 1)
    # slerp: t is global.
    assert make_space(family, "slerp", granularity="layer").dim == 5


def test_every_layer_gets_its_anchor_value_under_the_engine_gradient(family: dict[str, Path]) -> None:
    """A decoded per-layer list, evaluated as the engine (and mergekit) do, gives each layer its gene."""
    space = make_space(family, "linear", granularity="group", group_size=2, separate=["attention"])
    x = np.linspace(0.05, 0.95, space.dim)
    recipe = space.decode(x)
    values = space.gene_values(x)
    spec = get_method("linear").param("weight")
    setting = recipe.models[0].parameters["weight"]
    for gene, value in zip(space.genes, values, strict=True):
        if gene.model != str(family["ft0"]):
            continue
        tensor = (
            "model.layers.{}.self_attn.q_proj.weight"
            if gene.group == "attention"
            else "model.layers.{}.input_layernorm.weight"
        )
        for layer in gene.layers:
            got = engine_evaluate(
                setting, spec, tensor=tensor.format(layer), t=layer_position(layer, 5), where="w"
            )
            assert got == pytest.approx(value, abs=1e-9)


def test_encode_reads_a_coarse_mergekit_gradient(family: dict[str, Path]) -> None:
    space = make_space(family, "linear", granularity="layer", parameters={"weight": (0.0, 1.0)})
    models = [{"model": str(family[name]), "parameters": {"weight": [0.0, 1.0]}} for name in ("ft0", "ft1")]
    x = space.encode({"merge_method": "linear", "models": models})
    np.testing.assert_allclose(x[:5], [0.0, 0.25, 0.5, 0.75, 1.0])


def test_filters_isolate_groups() -> None:
    names = [
        "model.embed_tokens.weight",
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.0.mlp.up_proj.weight",
        "model.layers.0.input_layernorm.weight",
        "model.norm.weight",
        "lm_head.weight",
    ]
    filters = derive_filters(names, ["attention", "mlp", "embedding"])
    assert filters == {"attention": ("self_attn",), "mlp": ("mlp",), "embedding": ("embed_tokens", "lm_head")}


def test_gpt2_filters() -> None:
    names = [
        "transformer.wte.weight",
        "transformer.h.0.attn.c_attn.weight",
        "transformer.h.0.mlp.c_fc.weight",
        "transformer.h.0.ln_1.weight",
    ]
    assert derive_filters(names, ["attention"]) == {"attention": ("attn",)}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            dict(parameters={"density": (0.0, 1.0)}),
            r"search.parameters.density bound: 'density' = 0.0 is outside \(0, 1\]",
        ),
        (dict(parameters={"density": (0.5, 1.5)}), r"density.*1.5 is outside"),
        (dict(parameters={"weight": (1.0, 0.5)}), r"low < high"),
        (dict(parameters={"gamma": (0.0, 0.1)}), r"takes no parameter 'gamma'"),
        (dict(parameters={"normalize": None}), r"only float parameters evolve"),
        (dict(parameters={"density": None}), r"requires 'weight'"),
        (dict(fixed={"density": 2.0}), r"search.fixed.density"),
    ],
)
def test_bad_search_spaces_name_the_field(family: dict[str, Path], kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        make_space(family, "ties", **kwargs)


def test_unknown_method(family: dict[str, Path]) -> None:
    with pytest.raises(ConfigError, match="unknown method 'tiez'"):
        make_space(family, "tiez")


def test_per_layer_table_for_heatmaps(family: dict[str, Path]) -> None:
    space = make_space(family, "ties", granularity="group", group_size=2)
    rows = space.per_layer(np.full(space.dim, 0.5))
    assert set(rows) == {
        "weight[ft0].default",
        "weight[ft1].default",
        "density[ft0].default",
        "density[ft1].default",
    }
    np.testing.assert_allclose(rows["weight[ft0].default"], 0.5)
    np.testing.assert_allclose(rows["density[ft0].default"], 0.55)
