"""What a tensor is, from its name and the model config: layer index, group, layer count, tied embeddings.

Patterns, not one table per architecture: Hugging Face decoders name their blocks `layers.N` (llama,
mistral, qwen2/3, gemma, phi, phi3, gpt_neox), `h.N` (gpt2, falcon, gptj) or `blocks.N` / `layer.N`,
and their sub-modules with a small shared vocabulary (`self_attn`/`attn`/`attention`, `mlp`/
`feed_forward`, `*norm*`/`ln_*`, `embed_tokens`/`wte`/`embed_in`, `lm_head`/`embed_out`). A family that
follows these conventions works without a line of code here.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Literal

TensorGroup = Literal["embedding", "attention", "mlp", "norm", "lm_head", "other"]

# `.layers.3.` / `.h.3.` / `.blocks.3.` / `.layer.3.` / `.block.3.` (also at the start of a name).
_LAYER = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)(?=\.|$)")
_LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")
_NESTED_CONFIGS = ("text_config", "language_config", "llm_config")

_LM_HEAD = {"lm_head", "embed_out"}
_EMBEDDING = {
    "embed_tokens",
    "wte",
    "wpe",
    "embed_in",
    "word_embeddings",
    "tok_embeddings",
    "embed_positions",
}
_ATTENTION = {"self_attn", "attn", "attention", "self_attention", "cross_attn", "mixer"}
_MLP = {"mlp", "feed_forward", "ffn", "block_sparse_moe", "moe"}
_NORM = re.compile(r"norm|^ln(_\w+|\d+)?$")
_OUTPUT_NAMES = ("lm_head.weight", "embed_out.weight")

# Model types whose transformers config ties the output projection to the input embedding by default
# (used only when neither the config nor the tensors say, and transformers cannot be asked).
_TIED_BY_DEFAULT = {
    "gemma",
    "gemma2",
    "gemma3",
    "gemma3_text",
    "gpt2",
    "starcoder2",
    "falcon",
    "cohere",
    "cohere2",
}


def layer_index(name: str) -> int | None:
    """The decoder layer a tensor belongs to (`model.layers.3.mlp.up_proj.weight` -> 3), None outside layers."""
    match = _LAYER.search(name)
    return int(match.group(1)) if match else None


def with_layer_index(name: str, index: int) -> str:
    """The same tensor name in layer `index` (`model.layers.3.x` -> `model.layers.7.x`)."""
    match = _LAYER.search(name)
    if match is None:
        raise ValueError(f"tensor '{name}' is not inside a numbered layer; cannot move it to layer {index}.")
    return f"{name[: match.start(1)]}{index}{name[match.end(1) :]}"


def tensor_group(name: str) -> TensorGroup:
    """The role of a tensor in a decoder, from the module names along its path."""
    parts = name.split(".")
    modules = parts[:-1] if parts[-1] in {"weight", "bias"} and len(parts) > 1 else parts
    if any(part in _LM_HEAD for part in modules):
        return "lm_head"
    if any(part in _EMBEDDING for part in modules):
        return "embedding"
    if modules and _NORM.search(modules[-1]):
        return "norm"  # checked before attention so that self_attn.q_norm counts as a norm
    if any(part in _ATTENTION for part in modules):
        return "attention"
    if any(part in _MLP for part in modules):
        return "mlp"
    return "other"


def _layer_config(config: dict[str, Any]) -> dict[str, Any] | None:
    """The (possibly nested) dict that holds the layer count: the top level, or e.g. `text_config`."""
    if any(isinstance(config.get(key), int) for key in _LAYER_COUNT_KEYS):
        return config
    for nested in _NESTED_CONFIGS:
        inner = config.get(nested)
        if isinstance(inner, dict) and _layer_config(inner) is not None:
            return _layer_config(inner)
    return None


def num_layers(config: dict[str, Any]) -> int | None:
    """The decoder's layer count (`num_hidden_layers`, `n_layer`, `num_layers`, nested `text_config`)."""
    holder = _layer_config(config)
    if holder is None:
        return None
    return next(holder[key] for key in _LAYER_COUNT_KEYS if isinstance(holder.get(key), int))


def count_layers(config: dict[str, Any], tensor_names: Callable[[], Iterable[str]]) -> int:
    """The layer count the config gives, else one more than the highest `*.{i}.*` layer index among the
    tensor names (read only when needed); 0 when neither has layers."""
    count = num_layers(config)
    if count is not None:
        return count
    indices = (layer_index(name) for name in tensor_names())
    return max((index + 1 for index in indices if index is not None), default=0)


def with_num_layers(
    config: dict[str, Any], count: int, *, source_layers: Sequence[int] | None = None
) -> dict[str, Any]:
    """A copy of `config` with `count` layers (after layer stacking); the input is not modified.

    Per-layer lists of the config (`layer_types`, e.g. sliding/full attention in gemma2/3 and qwen3)
    are rebuilt too: from `source_layers` (output layer i comes from source layer source_layers[i]) when
    given, else by repeating the source pattern.
    """
    if count <= 0:
        raise ValueError(f"a model needs at least one layer, got num_layers={count}.")
    if source_layers is not None and len(source_layers) != count:
        raise ValueError(f"source_layers has {len(source_layers)} entries for {count} layers.")
    updated = copy.deepcopy(config)
    holder = _layer_config(updated)
    if holder is None:
        updated["num_hidden_layers"] = count
        return updated
    for key in _LAYER_COUNT_KEYS:
        if isinstance(holder.get(key), int):
            holder[key] = count
    layer_types = holder.get("layer_types")
    if isinstance(layer_types, list) and layer_types:
        order = source_layers if source_layers is not None else range(count)
        holder["layer_types"] = [layer_types[index % len(layer_types)] for index in order]
    return updated


def tied_embeddings(config: dict[str, Any], tensor_names: Iterable[str] | None = None) -> bool:
    """Whether the output projection reuses the input embedding matrix.

    The tensors decide first: an embedding without an output matrix can only be tied (transformers does
    not save `lm_head.weight` of a tied model). Then the config's `tie_word_embeddings` (top level or
    nested `text_config`), then the default transformers gives the model type.
    """
    if tensor_names is not None:
        names = set(tensor_names)
        has_output = any(name.endswith(suffix) for name in names for suffix in _OUTPUT_NAMES)
        has_embedding = any(tensor_group(name) == "embedding" for name in names)
        if has_embedding and not has_output:
            return True
    for holder in (config, *(config.get(key) for key in _NESTED_CONFIGS)):
        if isinstance(holder, dict) and isinstance(holder.get("tie_word_embeddings"), bool):
            return bool(holder["tie_word_embeddings"])
    return _default_tie(str(config.get("model_type", "")))


def _default_tie(model_type: str) -> bool:
    """transformers' default `tie_word_embeddings` for a model type (its own config class), else a table."""
    if not model_type:
        return False
    try:
        import transformers

        return bool(getattr(transformers.AutoConfig.for_model(model_type), "tie_word_embeddings", False))
    except (ImportError, ValueError, KeyError, TypeError):
        return model_type in _TIED_BY_DEFAULT


def output_embedding_name(tensor_names: Iterable[str]) -> str | None:
    """The name the output projection has (or would have, once untied) in this naming scheme."""
    names = list(tensor_names)
    for suffix in _OUTPUT_NAMES:
        found = [name for name in names if name.endswith(suffix)]
        if found:
            return found[0]
    if any(name.startswith("gpt_neox.") for name in names):
        return "embed_out.weight"
    return "lm_head.weight" if names else None


def input_embedding_name(tensor_names: Iterable[str]) -> str | None:
    """The token embedding's name (`model.embed_tokens.weight`, `transformer.wte.weight`, ...)."""
    token_embeddings = {"embed_tokens", "wte", "embed_in", "word_embeddings", "tok_embeddings"}
    for name in tensor_names:
        parts = name.split(".")
        if len(parts) >= 2 and parts[-2] in token_embeddings and parts[-1] == "weight":
            return name
    return None
