"""MergeConfig: mergekit's YAML parsed, validated against the registry with located messages, re-emitted."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from evomerge.errors import ConfigError
from evomerge.merge.config import Conditional, MergeConfig
from evomerge.merge.gradients import evaluate, interpolate, layer_position, resolve
from evomerge.merge.registry import get_method

TIES = """
merge_method: ties
base_model: base
models:
  - model: a
    parameters: {weight: [0.2, 0.8], density: 0.5}
  - model: b
    parameters:
      weight:
        - filter: mlp
          value: 0.9
        - value: 0.3
      density: 0.7
parameters: {normalize: true, lambda: 1.1}
dtype: float32
"""


def test_parses_models_form() -> None:
    config = MergeConfig.from_yaml(TIES)
    assert config.merge_method == "ties"
    assert [m.model for m in config.models or []] == ["a", "b"]
    assert config.referenced_models() == ["base", "a", "b"]
    assert config.tokenizer_model() == "base"


def test_parses_slices_form() -> None:
    config = MergeConfig.from_yaml(
        """
slices:
  - sources: [{model: a, layer_range: [0, 2]}]
  - sources: [{model: b, layer_range: [1, 4]}]
merge_method: passthrough
"""
    )
    assert [s.num_layers for s in config.slices or []] == [2, 3]
    assert config.tokenizer_model() == "a"


def test_to_yaml_round_trips_and_is_mergekit_shaped() -> None:
    config = MergeConfig.from_yaml(TIES)
    text = config.to_yaml()
    assert MergeConfig.from_yaml(text) == config
    data = yaml.safe_load(text)
    assert data["models"][1]["parameters"]["weight"][0] == {"filter": "mlp", "value": 0.9}
    assert "weight: [0.2, 0.8]" in text  # gradients on one line, as mergekit writes them


def test_buildable_in_python() -> None:
    config = MergeConfig(
        merge_method="linear",
        models=[{"model": "a", "parameters": {"weight": 1.0}}, {"model": "b", "parameters": {"weight": 2.0}}],  # type: ignore[list-item]
    )
    assert config.to_dict()["models"][1]["parameters"] == {"weight": 2.0}


def test_reads_a_file(tmp_path: Path) -> None:
    path = tmp_path / "m.yaml"
    path.write_text(TIES)
    assert MergeConfig.from_yaml(path).base_model == "base"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("merge_method: nope\nmodels: [{model: a}]", "unknown method 'nope'"),
        ("merge_method: ties\nbase_model: b\nmodels: [{model: a, parameters: {weight: 1, dense: 1}}]",
         "models[0].parameters.dense: merge_method 'ties' takes no parameter 'dense' (it takes: weight, density"),
        ("merge_method: ties\nbase_model: b\nmodels: [{model: a, parameters: {weight: 1, density: 1.5}}]",
         "models[0].parameters.density: 'density' = 1.5 is outside (0, 1]"),
        ("merge_method: ties\nbase_model: b\nmodels: [{model: a, parameters: {weight: 1}}]\nparameters: {density: 0}",
         "parameters.density: 'density' = 0.0 is outside (0, 1]"),
        ("merge_method: slerp\nbase_model: b\nmodels: [{model: a}, {model: c}]\nparameters: {t: 0.5}",
         "merge_method 'slerp' needs base_model plus exactly 1 model(s) besides the base; got 2"),
        ("merge_method: slerp\nmodels: [{model: a}]\nparameters: {t: 0.5}", "'slerp' needs a base_model"),
        ("merge_method: linear\nmodels: [{model: a, parameters: {weight: 1}}, {model: c}]",
         "model 'c' has no 'weight', which 'linear' requires"),
        ("merge_method: ties\nbase_model: b\nmodels: [{model: a, parameters: {weight: 1}}]\nparameters: {normalize: [true, false]}",
         "parameters.normalize: 'normalize' is a true/false switch and takes no gradient list"),
        ("merge_method: slerp\nbase_model: b\nmodels: [{model: a, parameters: {t: 0.3}}]\nparameters: {t: 0.5}",
         "models[0].parameters.t: 't' is one value for the whole merge"),
        ("merge_method: linear\nmodels: [{model: a, parameters: {weight: 1}}]\nchat_template: chatlm",
         "chat_template: 'chatlm' is neither a built-in template (alpaca, chatml, exaone, llama3, mistral)"),
        ("merge_method: linear\nmodels: [{model: a, parameters: {weight: 1}}]\nchat_template: '{% for m in messages %}{{ m }}'",
         "chat_template: the Jinja template does not parse"),
        ("merge_method: nearswap\nbase_model: b\nmodels: [{model: a}, {model: c}]\nparameters: {t: 0.1}",
         "merge_method 'nearswap' needs base_model plus exactly 1 model(s) besides the base; got 2"),
        ("merge_method: nearswap\nbase_model: b\nmodels: [{model: a}]", "'nearswap' requires 't'"),
        ("merge_method: ram\nbase_model: b\nmodels: [{model: a}]\nparameters: {epsilon: -0.1}",
         "'epsilon' = -0.1 is outside [0, inf]"),
        ("merge_method: ramplus_tl\nbase_model: b\nmodels: [{model: a}]\nparameters: {r: fast}",
         "parameters.r: expected a number for 'r'"),
        ("merge_method: arcee_fusion\nbase_model: b\nmodels: [{model: a}]\nparameters: {t: 0.1}",
         "merge_method 'arcee_fusion' takes no parameter 't' (it takes: none)"),
        ("merge_method: linear\nmodels: [{model: a, parameters: {weight: 1}}]\ntokenizer: {source: base}",
         "'tokenizer' is not supported yet"),
        ("merge_method: linear\nmodels: [{model: a, parameters: {weight: 1}}]\ndtype: float8", "unknown dtype 'float8'"),
        ("merge_method: linear\nmodel: [{model: a}]", "unknown field 'model'"),
        ("merge_method: linear", "give exactly one of 'models' or 'slices'"),
        ("merge_method: linear\nmodels: [{model: a, parameters: {weight: 1}}]\nextra_key: 1", "unknown field 'extra_key'"),
        ("merge_method: ties\nbase_model: b\nslices: [{sources: [{model: a, layer_range: [0, 2], parameters: {weight: 1}}]}]",
         "base_model 'b' is not among this slice's sources"),
        ("merge_method: passthrough\nslices: [{sources: [{model: a, layer_range: [0, 2]}, {model: c, layer_range: [0, 3]}]}]",
         "must span the same number of layers"),
    ],
)  # fmt: skip
def test_invalid_configs_name_the_field(text: str, expected: str) -> None:
    with pytest.raises(ConfigError) as caught:
        MergeConfig.from_yaml(text)
    assert expected in str(caught.value)


def test_python_construction_raises_validation_error() -> None:
    with pytest.raises(ValidationError, match="density"):
        MergeConfig(
            merge_method="ties",
            base_model="b",
            models=[{"model": "a", "parameters": {"weight": 1, "density": 2}}],  # type: ignore[list-item]
        )


def test_malformed_yaml_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("merge_method: linear\nmodels:\n  - model: a\n   parameters: {weight: 1\n")
    with pytest.raises(ConfigError, match=r"broken\.yaml: malformed YAML at line 4"):
        MergeConfig.from_yaml(path)


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        MergeConfig.from_yaml(tmp_path / "nope.yaml")


def test_scientific_notation_strings_become_numbers() -> None:
    config = MergeConfig.from_yaml("merge_method: linear\nmodels: [{model: a, parameters: {weight: 1e-3}}]")
    spec = get_method("linear").param("weight")
    assert evaluate((config.models or [])[0].parameters["weight"], spec, tensor="x", t=0, where="w") == 0.001  # type: ignore[index]


# ---- gradients and filters (mergekit's formulas) ---------------------------------------------------


def test_interpolate_matches_mergekit_formula() -> None:
    values = [0.0, 0.5, 1.0, 0.2]
    assert interpolate(values, 0.0) == 0.0
    assert interpolate(values, 1.0) == 0.2
    assert interpolate(values, 0.5) == pytest.approx(0.75)  # s = 1.5 -> halfway between 0.5 and 1.0
    assert interpolate([0.3], 0.7) == 0.3


def test_layer_positions() -> None:
    assert [layer_position(j, 4) for j in range(4)] == [0.0, 1 / 3, 2 / 3, 1.0]
    assert layer_position(0, 1) == 1.0


def test_first_matching_filter_wins_and_unmatched_falls_through() -> None:
    spec = get_method("ties").param("weight")
    setting = [Conditional(filter="mlp", value=0.9), Conditional(filter="self_attn", value=[0.0, 1.0])]
    assert evaluate(setting, spec, tensor="model.layers.0.mlp.up_proj.weight", t=0.5, where="w") == 0.9
    assert evaluate(setting, spec, tensor="model.layers.0.self_attn.q_proj.weight", t=0.5, where="w") == 0.5
    assert evaluate(setting, spec, tensor="model.norm.weight", t=0.5, where="w") is None
    levels = [("models[0].parameters", {"weight": setting}), ("parameters", {"weight": 0.1})]
    assert resolve(spec, levels, tensor="model.norm.weight", t=0.0, owner="m") == 0.1


def test_required_parameter_without_matching_filter_is_an_error() -> None:
    spec = get_method("ties").param("weight")
    levels = [("models[0].parameters", {"weight": [Conditional(filter="mlp", value=1.0)]})]
    with pytest.raises(
        ConfigError, match=r"'weight' is required for model 'a' \(tensor model\.norm\.weight\)"
    ):
        resolve(spec, levels, tensor="model.norm.weight", t=0.0, owner="model 'a'")


def test_defaults_fill_in() -> None:
    spec = get_method("ties").param("density")
    assert resolve(spec, [("parameters", None)], tensor="x", t=0, owner="m") == 1.0
