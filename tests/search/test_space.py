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


# --- genome_of: which recipes lie in the space (the warm start seeds optimisers with these) ----------
def _ta_space(family: dict[str, Path], bounds: tuple[float, float] = (0.0, 1.5)) -> ParameterSpace:
    return ParameterSpace.from_models(
        family["base"], [family["ft0"], family["ft1"]], "task_arithmetic", parameters={"weight": bounds}
    )


def _recipe(family: dict[str, Path], method: str, **params: object) -> dict[str, object]:
    models = [{"model": str(family[m]), "parameters": dict(params)} for m in ("ft0", "ft1")]
    return {"merge_method": method, "base_model": str(family["base"]), "models": models}


def test_genome_of_a_recipe_of_the_space(family: dict[str, Path]) -> None:
    space = _ta_space(family)
    genome = space.genome_of(_recipe(family, "task_arithmetic", weight=1.0))
    assert genome is not None
    np.testing.assert_allclose(space.gene_values(genome), [1.0] * space.dim)


def test_genome_of_refuses_what_lies_outside(family: dict[str, Path]) -> None:
    narrow = _ta_space(family, (0.0, 0.9))
    assert narrow.genome_of(_recipe(family, "task_arithmetic", weight=1.0)) is None  # out of bounds
    space = _ta_space(family)
    assert space.genome_of(_recipe(family, "ties", weight=1.0, density=0.5)) is None  # another method
    gradient = [0.2, 0.4, 0.6, 0.8, 1.0]  # the space has one gene per model: a gradient is not in it
    assert space.genome_of(_recipe(family, "task_arithmetic", weight=gradient)) is None
    scaled = _recipe(family, "task_arithmetic", weight=1.0)
    scaled["parameters"] = {"lambda": 0.5}  # not evolved and not the default
    assert space.genome_of(scaled) is None


def test_a_source_alone_is_weight_one_for_it(family: dict[str, Path]) -> None:
    space = _ta_space(family, (0.0, 1.0))
    alone = {
        "merge_method": "linear",
        "models": [{"model": str(family["ft1"]), "parameters": {"weight": 1.0}}],
    }
    genome = space.genome_of(alone)
    assert genome is not None
    np.testing.assert_allclose(genome, space.source_genomes()[1])
    ties = ParameterSpace.from_models(family["base"], [family["ft0"], family["ft1"]], "ties")
    assert ties.genome_of(alone) is None  # TIES of (1, 0) trims the task vector: not the source


def test_genome_of_in_a_layered_space_with_separate_groups(family: dict[str, Path]) -> None:
    space = ParameterSpace.from_models(
        family["base"], [family["ft0"], family["ft1"]], "ties", granularity="layer", separate=["attention"]
    )
    x = np.random.default_rng(0).uniform(size=space.dim)
    genome = space.genome_of(space.decode_dict(x))
    assert genome is not None
    np.testing.assert_allclose(space.gene_values(genome), space.gene_values(x))


def test_layers_are_counted_from_tensor_names_when_the_config_has_none(tmp_path: Path) -> None:
    """The digits zoo's MLPs name their parameters `layers.{i}.weight`; their config has no layer count."""
    import torch

    from evomerge.zoo.digits import MLPClassifier

    dirs = []
    for seed in range(3):
        model = MLPClassifier((64, 32, 16, 10))
        model.reset_parameters(torch.Generator().manual_seed(seed))
        model.save_pretrained(tmp_path / f"m{seed}")
        dirs.append(tmp_path / f"m{seed}")
    space = ParameterSpace.from_models(dirs[0], dirs[1:], "slerp", granularity="layer")
    assert space.n_layers == 3 and space.dim == 3
    assert space.decode_dict(np.array([0.0, 0.5, 1.0]))["parameters"]["t"] == [0.0, 0.5, 1.0]


def test_source_alone_is_a_one_model_linear_merge_of_weight_one() -> None:
    from evomerge.search.space import source_alone

    alone = {"merge_method": "linear", "models": [{"model": "/m/a", "parameters": {"weight": 1.0}}]}
    assert source_alone(alone) == "/m/a"
    assert source_alone(yaml_text(alone)) == "/m/a"
    half = {
        **alone,
        "models": [{"model": "/m/a", "parameters": {"weight": 0.5}}],
        "parameters": {"normalize": False},
    }
    assert source_alone(half) is None  # 0.5 x the model without normalisation: not the source
    two = {**alone, "models": alone["models"] * 2}
    assert source_alone(two) is None and source_alone({**alone, "merge_method": "ties"}) is None
    assert source_alone("not: [a mapping") is None


def yaml_text(mapping: dict) -> str:
    import yaml

    return yaml.safe_dump(mapping)


@pytest.mark.parametrize(
    ("method", "evolved"),
    [("nearswap", {"t": (0.0, 0.01)}), ("ram", {"epsilon": (0.0, 1e-3)}), ("ramplus_tl", {"r": (0.0, 1.0)})],
)
def test_methods_with_a_search_range_evolve_in_it_by_default(
    family: dict[str, Path], method: str, evolved: dict[str, tuple[float, float]]
) -> None:
    models = [family["ft0"]] if method == "nearswap" else [family["ft0"], family["ft1"]]
    space = ParameterSpace.from_models(family["base"], models, method, granularity="model")
    for name, bounds in evolved.items():
        assert space.parameters[name] == bounds
    lower, upper = space.bounds
    recipe = space.decode((np.asarray(lower) + np.asarray(upper)) / 2)
    assert recipe.merge_method == method  # a valid MergeConfig, checked against the registry
