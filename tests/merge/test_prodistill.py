"""ProDistill (merge/methods/prodistill.py and its stages in merge/sequential.py) on a one-layer family."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from evomerge.errors import ConfigError
from evomerge.merge.config import MergeConfig
from evomerge.merge.engine import merge_to_dir
from evomerge.merge.methods.prodistill import prodistill
from evomerge.merge.registry import get_method

from .conftest import EMBED


def _config(family: dict[str, Path], prompts: dict[str, Path], cache: Path, **extra: Any) -> dict[str, Any]:
    keys = extra.pop("keys", ("ft0", "ft1"))
    return {
        "merge_method": "prodistill",
        "base_model": str(family["base"]),
        "models": [{"model": str(family[k])} for k in keys],
        "dtype": "float32",
        "parameters": {"epochs": 3, **extra.pop("parameters", {})},
        "calibration": {
            "models": {str(family[k]): str(prompts[k]) for k in keys},
            "limit": 6,
            "cache": str(cache),
        },
        **extra,
    }


def _merge(
    family: dict[str, Path], prompts: dict[str, Path], out: Path, **extra: Any
) -> dict[str, torch.Tensor]:
    merge_to_dir(MergeConfig.from_dict(_config(family, prompts, out.parent / "cache", **extra)), out)
    return load_file(str(out / "model.safetensors"))


# ---- the kernel ----------------------------------------------------------------------------------------


def test_kernel_is_base_plus_coefficients_times_task_vectors() -> None:
    base = torch.zeros(2, 3)
    tensors = [torch.ones(2, 3), 2 * torch.ones(2, 3)]
    coefficients = [torch.full((2, 3), 0.5), torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 2.0]])]
    expected = 0.5 + 2 * coefficients[1]
    torch.testing.assert_close(prodistill(tensors, base=base, statistics=coefficients), expected)
    torch.testing.assert_close(prodistill(tensors, base=base, init=0.25), torch.full((2, 3), 0.75))


def test_embedding_rows_take_each_models_token_share() -> None:
    base = torch.zeros(4, 2)
    tables = [torch.ones(4, 2), 3 * torch.ones(4, 2)]
    counts = [torch.tensor([1.0, 1.0, 0.0, 0.0]), torch.tensor([0.0, 3.0, 1.0, 0.0])]
    merged = prodistill(tables, base=base, weight=[1.0, 1.0], init=0.5, statistics=counts)
    torch.testing.assert_close(merged[:, 0], torch.tensor([1.0, (1 + 9) / 4, 3.0, 0.5 + 1.5]))


def test_kernel_refuses_coefficients_of_another_shape() -> None:
    with pytest.raises(ConfigError, match="coefficients of shape"):
        prodistill([torch.ones(3, 2)], base=torch.zeros(3, 2), statistics=[torch.ones(2, 2)])


def test_kernel_needs_a_base() -> None:
    with pytest.raises(ConfigError, match="add base_model"):
        prodistill([torch.ones(2)])


def test_registered_as_a_sequential_distilled_method() -> None:
    method = get_method("prodistill")
    assert method.sequential and method.distill and method.statistics == "gram" and method.requires_base
    evolved = {spec.name for spec in method.params if spec.search_range is not None}
    assert evolved == {"weight", "init", "lr"}


# ---- config errors, before any model loads ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("parameters", "message"),
    [
        ({"lr": 0.0}, "'lr' = 0.0 is outside"),
        ({"epochs": 0}, "'epochs' = 0(.0)? is outside"),
        ({"seed": -1}, "'seed'"),
    ],
)
def test_bad_settings_are_config_errors(
    one_layer_family: dict[str, Path], calibration_prompts: dict[str, Path], tmp_path: Path,
    parameters: dict[str, Any], message: str,
) -> None:  # fmt: skip
    data = _config(one_layer_family, calibration_prompts, tmp_path, parameters=parameters)
    with pytest.raises(ConfigError, match=message):
        MergeConfig.from_dict(data)


def test_needs_calibration_and_a_base(
    one_layer_family: dict[str, Path], calibration_prompts: dict[str, Path], tmp_path: Path
) -> None:
    data = _config(one_layer_family, calibration_prompts, tmp_path)
    with pytest.raises(ConfigError, match="needs calibration data"):
        MergeConfig.from_dict({k: v for k, v in data.items() if k != "calibration"})
    with pytest.raises(ConfigError, match="base"):
        MergeConfig.from_dict({k: v for k, v in data.items() if k != "base_model"})


# ---- end to end -----------------------------------------------------------------------------------------


def test_one_source_at_coefficient_one_is_that_source(
    one_layer_family: dict[str, Path], calibration_prompts: dict[str, Path], tmp_path: Path
) -> None:
    """One model, init 1: the merged stages reproduce it from the start (loss zero), so every tensor is its."""
    merged = _merge(
        one_layer_family, calibration_prompts, tmp_path / "one", keys=("ft0",), parameters={"init": 1.0}
    )
    own = load_file(str(one_layer_family["ft0"] / "model.safetensors"))
    assert merged.keys() == own.keys()
    for name, tensor in own.items():
        torch.testing.assert_close(merged[name], tensor, atol=1e-6, rtol=1e-5, msg=name)


def test_training_moves_the_layers_and_is_deterministic(
    one_layer_family: dict[str, Path], calibration_prompts: dict[str, Path], tmp_path: Path
) -> None:
    first = _merge(one_layer_family, calibration_prompts, tmp_path / "a")
    second = _merge(one_layer_family, calibration_prompts, tmp_path / "b")
    other = _merge(one_layer_family, calibration_prompts, tmp_path / "c", parameters={"seed": 1})
    untrained = _merge(one_layer_family, calibration_prompts, tmp_path / "d", parameters={"lr": 1e-12})
    for name, tensor in first.items():
        assert torch.equal(second[name], tensor), name
    layer = "model.layers.0.mlp.down_proj.weight"
    assert not torch.equal(other[layer], first[layer])  # another batch order
    assert not torch.allclose(untrained[layer], first[layer], atol=1e-4)
    assert not torch.allclose(untrained["lm_head.weight"], first["lm_head.weight"], atol=1e-4)
    torch.testing.assert_close(first[EMBED], untrained[EMBED])  # the embedding is closed form


def test_training_brings_the_layer_closer_to_each_models_outputs(
    one_layer_family: dict[str, Path], calibration_prompts: dict[str, Path], tmp_path: Path
) -> None:
    """The objective itself, recomputed from the written models: each model's layer-0 output on its own texts
    against the merged layer's, trained vs. the initial coefficients (lr ~ 0)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evomerge.merge.calibration import read_texts

    trained = _merge(one_layer_family, calibration_prompts, tmp_path / "t", parameters={"epochs": 20})
    del trained
    _merge(one_layer_family, calibration_prompts, tmp_path / "u", parameters={"lr": 1e-12})

    def error(out: Path) -> float:
        merged = AutoModelForCausalLM.from_pretrained(str(out)).eval()
        total = 0.0
        for key in ("ft0", "ft1"):
            own = AutoModelForCausalLM.from_pretrained(str(one_layer_family[key])).eval()
            tokenizer = AutoTokenizer.from_pretrained(str(one_layer_family[key]))
            for text in read_texts(calibration_prompts[key], 6):
                ids = tokenizer(text, return_tensors="pt")["input_ids"]
                with torch.no_grad():
                    got = merged(input_ids=ids, output_hidden_states=True).hidden_states[1]
                    want = own(input_ids=ids, output_hidden_states=True).hidden_states[1]
                total += float(((got - want) ** 2).mean())
        return total

    assert error(tmp_path / "t") < 0.7 * error(tmp_path / "u")


def test_distill_ends_false_gives_the_ends_task_arithmetic(
    one_layer_family: dict[str, Path], calibration_prompts: dict[str, Path], tmp_path: Path
) -> None:
    """The authors' handling: embedding, final norm and lm_head at base + init * sum of task vectors."""
    merged = _merge(
        one_layer_family,
        calibration_prompts,
        tmp_path / "ends",
        parameters={"distill_ends": False, "init": 0.4},
    )
    base, *models = (
        load_file(str(one_layer_family[k] / "model.safetensors")) for k in ("base", "ft0", "ft1")
    )
    for name in (EMBED, "model.norm.weight", "lm_head.weight"):
        expected = base[name] + 0.4 * sum(model[name] - base[name] for model in models)
        torch.testing.assert_close(merged[name], expected, msg=name)
    layer = "model.layers.0.mlp.down_proj.weight"
    at_init = base[layer] + 0.4 * sum(model[layer] - base[layer] for model in models)
    assert not torch.allclose(merged[layer], at_init, atol=1e-4)  # the layer is still trained


def test_tied_embeddings_train_the_final_norm_through_the_merged_embedding(
    tmp_path: Path, calibration_prompts: dict[str, Path]
) -> None:
    """No lm_head tensor: the last stage is the final norm, followed by the (merged, untrained) embedding."""
    from evomerge.zoo.random_models import FamilySpec, build_family
    from evomerge.zoo.tokenizer import build_tokenizer, save_tokenizer

    spec = FamilySpec(
        n_finetunes=2, delta_scale=0.1, tie_word_embeddings=True, overrides={"num_hidden_layers": 1}
    )
    family = build_family(tmp_path / "tied", spec)
    for path in family.values():
        save_tokenizer(build_tokenizer(), path)
    merged = _merge(family, calibration_prompts, tmp_path / "out")
    untrained = _merge(family, calibration_prompts, tmp_path / "untrained", parameters={"lr": 1e-12})
    assert "lm_head.weight" not in merged
    assert not torch.allclose(merged["model.norm.weight"], untrained["model.norm.weight"], atol=1e-4)
