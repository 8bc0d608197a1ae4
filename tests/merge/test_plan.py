"""build_plan: tensor list, inputs, resolved per-tensor parameters, layer stacking, tied embeddings."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from evomerge.errors import ConfigError
from evomerge.merge.config import MergeConfig
from evomerge.merge.plan import MergePlan, TensorTask, build_plan, kernel_keyword
from evomerge.merge.sources import SourceSet


def _plan(text: str) -> MergePlan:
    config = MergeConfig.from_yaml(text)
    with SourceSet.open(config) as sources:
        return build_plan(config, sources)


def _task(plan: MergePlan, name: str) -> TensorTask:
    return next(task for task in plan.tasks if task.name == name)


def test_ties_plan_resolves_gradients_filters_and_precedence(fam: dict[str, Path]) -> None:
    plan = _plan(
        f"""
merge_method: ties
base_model: {fam["base"]}
models:
  - model: {fam["ft0"]}
    parameters: {{weight: [0.0, 0.9], density: 0.5}}
  - model: {fam["ft1"]}
    parameters:
      weight: [{{filter: mlp, value: 0.8}}, {{filter: self_attn, value: [1.0, 0.0]}}]
parameters: {{weight: 0.1, density: 0.3, lambda: 1.5}}
"""
    )
    assert len(plan.tasks) == 1 + 4 * 9 + 2  # embed, 4 layers x 9, norm + lm_head
    embed = _task(plan, "model.embed_tokens.weight")
    assert embed.base == (str(fam["base"]), "model.embed_tokens.weight")
    assert [model for model, _ in embed.inputs] == [str(fam["ft0"]), str(fam["ft1"])]
    assert embed.params["weight"] == [0.0, 0.1]  # outside the layers: t = 0; ft1 falls through to global
    assert embed.params["density"] == [0.5, 0.3]
    assert embed.params["lambda_"] == 1.5 and embed.params["normalize"] is True
    layer1 = _task(plan, "model.layers.1.self_attn.q_proj.weight")
    assert layer1.params["weight"] == pytest.approx([0.3, 2 / 3])  # t = 1/3 for both gradients
    assert _task(plan, "model.layers.3.mlp.up_proj.weight").params["weight"] == pytest.approx([0.9, 0.8])
    assert _task(plan, "lm_head.weight").params["weight"] == [0.0, 0.1]
    assert embed.compute_dtype == torch.float32 and embed.out_dtype == torch.float32


def test_dtype_and_out_dtype(fam: dict[str, Path]) -> None:
    plan = _plan(
        f"merge_method: linear\nmodels: [{{model: {fam['ft0']}, parameters: {{weight: 1}}}}]\n"
        "dtype: bfloat16\nout_dtype: float16\n"
    )
    assert {(t.compute_dtype, t.out_dtype) for t in plan.tasks} == {(torch.bfloat16, torch.float16)}
    assert plan.out_config["dtype"] == "float16"


def test_linear_appends_unlisted_base_like_mergekit(fam: dict[str, Path]) -> None:
    plan = _plan(
        f"merge_method: linear\nbase_model: {fam['base']}\nmodels: [{{model: {fam['ft0']}}}]\n"
        "parameters: {weight: 0.5}\n"
    )
    task = plan.tasks[0]
    assert [model for model, _ in task.inputs] == [str(fam["ft0"]), str(fam["base"])]
    assert task.base is None and task.params["weight"] == [0.5, 0.5]


def test_slices_renumber_layers_and_update_config(fam: dict[str, Path]) -> None:
    plan = _plan(
        f"""
merge_method: passthrough
slices:
  - sources: [{{model: {fam["ft0"]}, layer_range: [0, 3]}}]
  - sources: [{{model: {fam["ft1"]}, layer_range: [1, 4], parameters: {{scale: [0.0, 1.0]}}}}]
"""
    )
    assert plan.num_layers == 6 and plan.out_config["num_hidden_layers"] == 6
    task = _task(plan, "model.layers.4.mlp.down_proj.weight")
    assert task.inputs == ((str(fam["ft1"]), "model.layers.2.mlp.down_proj.weight"),)
    assert task.params["scale"] == [0.5]  # offset 1 of a 3-layer slice: t = 0.5
    assert _task(plan, "model.embed_tokens.weight").inputs[0][0] == str(fam["ft0"])  # first slice
    assert _task(plan, "model.norm.weight").inputs[0][0] == str(fam["ft1"])  # last slice


def test_filters_on_per_model_params_match_the_input_name(fam: dict[str, Path]) -> None:
    plan = _plan(
        f"""
merge_method: passthrough
slices:
  - sources: [{{model: {fam["ft0"]}, layer_range: [2, 3], parameters: {{scale: [{{filter: layers.2., value: 3.0}}, {{value: 1.0}}]}}}}]
"""
    )
    assert _task(plan, "model.layers.0.mlp.up_proj.weight").params["scale"] == [3.0]


def test_tied_sources_write_no_lm_head(tied: dict[str, Path]) -> None:
    plan = _plan(
        f"merge_method: linear\nmodels: [{{model: {tied['ft0']}}}, {{model: {tied['ft1']}}}]\nparameters: {{weight: 1}}"
    )
    assert "lm_head.weight" not in [task.name for task in plan.tasks]


def test_tied_source_feeds_its_embedding_as_lm_head(fam: dict[str, Path], tied: dict[str, Path]) -> None:
    plan = _plan(
        f"merge_method: linear\nmodels: [{{model: {fam['ft0']}}}, {{model: {tied['ft0']}}}]\nparameters: {{weight: 1}}"
    )
    assert _task(plan, "lm_head.weight").inputs == (
        (str(fam["ft0"]), "lm_head.weight"),
        (str(tied["ft0"]), "model.embed_tokens.weight"),
    )


def test_layer_range_past_the_model_is_located(fam: dict[str, Path]) -> None:
    with pytest.raises(
        ConfigError, match=r"slices\[0\]\.sources\[0\]\.layer_range: \[2, 9\] reaches past the 4"
    ):
        _plan(
            f"merge_method: passthrough\nslices: [{{sources: [{{model: {fam['ft0']}, layer_range: [2, 9]}}]}}]"
        )


def test_required_parameter_missing_for_some_tensors(fam: dict[str, Path]) -> None:
    with pytest.raises(
        ConfigError, match=r"'weight' is required for model .*ft1.* \(tensor model\.embed_tokens\.weight\)"
    ):
        _plan(
            f"merge_method: linear\nmodels:\n  - {{model: {fam['ft0']}, parameters: {{weight: 1}}}}\n"
            f"  - {{model: {fam['ft1']}, parameters: {{weight: [{{filter: mlp, value: 1}}]}}}}\n"
        )


def test_kernel_keyword() -> None:
    assert kernel_keyword("lambda") == "lambda_" and kernel_keyword("weight") == "weight"
