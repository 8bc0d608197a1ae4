"""Layer indices, tensor groups, layer counts and tied embeddings on real transformers models.

Each family is built tiny with transformers' own config and model classes and saved with
save_pretrained, so the names and config keys are exactly those a user's model has.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from evomerge.io.architecture import (
    input_embedding_name,
    layer_index,
    num_layers,
    output_embedding_name,
    tensor_group,
    tied_embeddings,
    with_layer_index,
    with_num_layers,
)
from evomerge.io.reader import ModelDir

SMALL = {
    "hidden_size": 16,
    "intermediate_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "vocab_size": 64,
    "max_position_embeddings": 32,
    "pad_token_id": 0,
    "bos_token_id": 0,
    "eos_token_id": 1,
}
FAMILIES: dict[str, dict[str, Any]] = {
    "llama": SMALL,
    "mistral": SMALL,
    "qwen2": SMALL,
    "qwen3": {**SMALL, "head_dim": 8},
    "gemma": {**SMALL, "head_dim": 8},
    "phi": SMALL,
    "phi3": SMALL,
    "gpt2": {
        "n_embd": 16,
        "n_layer": 2,
        "n_head": 2,
        "vocab_size": 64,
        "n_positions": 32,
        "bos_token_id": 0,
        "eos_token_id": 1,
    },
}


def _save(model_type: str, root: Path, tie: bool | None) -> Path:
    import transformers

    torch.manual_seed(0)
    overrides = dict(FAMILIES[model_type])
    if tie is not None:
        overrides["tie_word_embeddings"] = tie
    config = transformers.AutoConfig.for_model(model_type, **overrides)
    model = transformers.AutoModelForCausalLM.from_config(config)
    path = root / f"{model_type}-{tie}"
    model.save_pretrained(path)
    return path


@dataclass
class Saved:
    """One family saved twice: with its default tying and with the opposite, given explicitly."""

    model_type: str
    default_tie: bool
    by_tie: dict[bool, ModelDir]


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Saved:
    import transformers

    model_type = request.param
    root = tmp_path_factory.mktemp(model_type)
    default = bool(transformers.AutoConfig.for_model(model_type).tie_word_embeddings)
    by_tie = {
        default: ModelDir(_save(model_type, root, None)),
        not default: ModelDir(_save(model_type, root, not default)),
    }
    return Saved(model_type, default, by_tie)


def test_layer_index_on_every_layer_tensor(family: Saved) -> None:
    model = family.by_tie[False]
    indices = {layer_index(name) for name in model.tensor_names()}
    assert indices == {0, 1, None}
    for name in model.tensor_names():
        index = layer_index(name)
        if index is not None:
            moved = with_layer_index(name, 7)
            assert layer_index(moved) == 7 and moved.replace(".7.", f".{index}.") == name
    assert num_layers(model.config) == 2


def test_every_tensor_has_a_meaningful_group(family: Saved) -> None:
    model = family.by_tie[False]
    groups = {name: tensor_group(name) for name in model.tensor_names()}
    assert "other" not in groups.values(), {name for name, group in groups.items() if group == "other"}
    assert set(groups.values()) == {"embedding", "attention", "mlp", "norm", "lm_head"}
    for name, group in groups.items():
        if layer_index(name) is None:
            assert group in {"embedding", "norm", "lm_head"}, name
    assert input_embedding_name(groups) in groups
    assert output_embedding_name(groups) == "lm_head.weight"


@pytest.mark.parametrize("tie", [True, False])
def test_tied_embeddings_matches_transformers(family: Saved, tie: bool) -> None:
    import transformers

    model = family.by_tie[tie]
    assert transformers.AutoConfig.from_pretrained(model.path).tie_word_embeddings == tie
    assert tied_embeddings(model.config, model.tensor_names()) == tie
    assert model.has("lm_head.weight") == (not tie)  # transformers saves the head only when untied
    if tie == family.default_tie:  # saved without the key given: the default must be recognised too
        config = {key: value for key, value in model.config.items() if key != "tie_word_embeddings"}
        assert tied_embeddings(config, [*model.tensor_names(), "lm_head.weight"]) == tie


@pytest.mark.parametrize(
    ("name", "group"),
    [
        ("model.embed_tokens.weight", "embedding"),
        ("transformer.wte.weight", "embedding"),
        ("transformer.wpe.weight", "embedding"),
        ("gpt_neox.embed_in.weight", "embedding"),
        ("model.layers.0.self_attn.q_proj.weight", "attention"),
        ("model.layers.0.self_attn.dense.bias", "attention"),
        ("transformer.h.3.attn.c_attn.weight", "attention"),
        ("gpt_neox.layers.0.attention.query_key_value.weight", "attention"),
        ("model.layers.0.self_attn.q_norm.weight", "norm"),
        ("model.layers.0.mlp.down_proj.weight", "mlp"),
        ("model.layers.0.mlp.fc1.bias", "mlp"),
        ("model.layers.0.feed_forward.w1.weight", "mlp"),
        ("model.layers.0.mlp.experts.gate_up_proj", "mlp"),
        ("model.layers.0.input_layernorm.weight", "norm"),
        ("model.layers.0.pre_feedforward_layernorm.weight", "norm"),
        ("transformer.h.0.ln_1.bias", "norm"),
        ("transformer.ln_f.weight", "norm"),
        ("model.final_layernorm.weight", "norm"),
        ("model.norm.weight", "norm"),
        ("lm_head.weight", "lm_head"),
        ("embed_out.weight", "lm_head"),
        ("model.rotary_emb.inv_freq", "other"),
        ("transformer.word_embeddings.weight", "embedding"),  # falcon
        ("transformer.h.0.self_attention.query_key_value.weight", "attention"),
        ("transformer.h.0.mlp.dense_h_to_4h.weight", "mlp"),
        ("model.layers.0.block_sparse_moe.experts.3.w1.weight", "mlp"),  # mixtral (transformers 4)
        ("model.layers.0.mlp.gate.weight", "mlp"),  # MoE router
        ("gpt_neox.final_layer_norm.weight", "norm"),
    ],
)
def test_tensor_group_examples(name: str, group: str) -> None:
    assert tensor_group(name) == group


def test_tied_embeddings_fallbacks() -> None:
    names = ["model.embed_tokens.weight", "model.norm.weight"]
    assert tied_embeddings({"tie_word_embeddings": False}, names)  # no head saved: must be tied
    assert not tied_embeddings({"model_type": "llama"}, [*names, "lm_head.weight"])
    assert tied_embeddings({"model_type": "gemma"}, [*names, "lm_head.weight"])  # transformers' default
    assert tied_embeddings({"model_type": "gpt2"})
    assert tied_embeddings({"text_config": {"tie_word_embeddings": True}}, [*names, "lm_head.weight"])
    assert not tied_embeddings({})


def test_layer_index_patterns() -> None:
    assert layer_index("model.layers.12.mlp.up_proj.weight") == 12
    assert layer_index("transformer.h.3.ln_1.weight") == 3
    assert layer_index("encoder.block.4.layer.1.DenseReluDense.wi.weight") == 4  # outermost wins
    assert layer_index("blocks.0.attn.weight") == 0
    assert layer_index("model.layers.0.mlp.experts.5.w1.weight") == 0  # experts are not layers
    assert layer_index("model.embed_tokens.weight") is None
    assert layer_index("model.hidden.3.weight") is None  # `h` must be a whole module name
    assert with_layer_index("transformer.h.3.ln_1.weight", 10) == "transformer.h.10.ln_1.weight"
    with pytest.raises(ValueError, match=r"model\.norm\.weight"):
        with_layer_index("model.norm.weight", 1)


def test_num_layers_variants() -> None:
    assert num_layers({"num_hidden_layers": 4}) == 4
    assert num_layers({"n_layer": 6}) == 6
    assert num_layers({"model_type": "x", "text_config": {"num_hidden_layers": 3}}) == 3
    assert num_layers({"hidden_size": 8}) is None


def test_with_num_layers_updates_copies_and_layer_types() -> None:
    config = {"num_hidden_layers": 4, "layer_types": ["sliding_attention", "full_attention"] * 2}
    stacked = with_num_layers(config, 6)
    assert config["num_hidden_layers"] == 4  # not modified in place
    assert stacked["num_hidden_layers"] == 6
    assert stacked["layer_types"] == ["sliding_attention", "full_attention"] * 3
    mapped = with_num_layers(config, 3, source_layers=[1, 1, 0])
    assert mapped["layer_types"] == ["full_attention", "full_attention", "sliding_attention"]
    nested = with_num_layers(
        {"text_config": {"num_hidden_layers": 2}, "vision_config": {"num_hidden_layers": 9}}, 5
    )
    assert (
        nested["text_config"]["num_hidden_layers"] == 5 and nested["vision_config"]["num_hidden_layers"] == 9
    )
    assert with_num_layers({"n_layer": 2}, 3) == {"n_layer": 3}
    with pytest.raises(ValueError, match="at least one layer"):
        with_num_layers(config, 0)


def test_with_num_layers_config_loads_in_transformers(tmp_path: Path) -> None:
    import transformers

    source = _save("qwen3", tmp_path, None)
    config = with_num_layers(json.loads((source / "config.json").read_text()), 5)
    (tmp_path / "stacked").mkdir()
    (tmp_path / "stacked" / "config.json").write_text(json.dumps(config))
    loaded = transformers.AutoConfig.from_pretrained(tmp_path / "stacked")
    assert loaded.num_hidden_layers == 5
    assert len(getattr(loaded, "layer_types", None) or [None] * 5) == 5
