"""The exported path model with scales: a Llama whose decoder layer i multiplies its input by a scale.

This file is self-contained (torch and transformers only): `export` copies it into the model dir as
`modeling_evomerge_dataflow.py` and names it in config.json's `auto_map`, so plain transformers loads the
dir with `trust_remote_code=True`; evomerge itself registers these classes and needs no remote code.

The layers are stored laid out in path order (`model.layers.{i}` is the path's i-th layer, a repeated
source layer stored once per position), exactly as a plain Llama of `num_hidden_layers` = path length;
`dataflow_scales[i]` scales the hidden state entering layer i (1.0 leaves it untouched).
"""

from __future__ import annotations

from typing import Any

from transformers import LlamaConfig, LlamaForCausalLM

MODEL_TYPE = "evomerge_dataflow"


class DataflowLlamaConfig(LlamaConfig):
    """A Llama config plus the scale of each layer's input (`dataflow_scales`, one per layer) and the
    path it was built from (`dataflow_path`: [source model, source layer] per layer; for reading only)."""

    model_type = MODEL_TYPE

    def __init__(
        self,
        dataflow_scales: list[float] | None = None,
        dataflow_path: list[Any] | None = None,
        **kwargs: Any,
    ) -> None:
        self.dataflow_scales = list(dataflow_scales or [])
        self.dataflow_path = list(dataflow_path or [])
        super().__init__(**kwargs)


class DataflowLlamaForCausalLM(LlamaForCausalLM):
    """LlamaForCausalLM with each decoder layer's input scaled by `config.dataflow_scales`."""

    config_class = DataflowLlamaConfig

    def __init__(self, config: DataflowLlamaConfig) -> None:
        super().__init__(config)
        scales = list(config.dataflow_scales) or [1.0] * config.num_hidden_layers
        if len(scales) != config.num_hidden_layers:
            raise ValueError(
                f"dataflow_scales holds {len(scales)} scales for {config.num_hidden_layers} layers; "
                "config.json must give one scale per layer."
            )
        for layer, scale in zip(self.model.layers, scales, strict=True):
            if float(scale) != 1.0:
                layer.register_forward_pre_hook(_Scale(float(scale)), with_kwargs=True)


class _Scale:
    """A pre-hook multiplying a layer's hidden-state input (its first argument) by a constant."""

    def __init__(self, scale: float) -> None:
        self.scale = scale

    def __call__(
        self, module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        if args:
            return (args[0] * self.scale, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": kwargs["hidden_states"] * self.scale}


def register() -> None:
    """Make AutoConfig / AutoModelForCausalLM load `evomerge_dataflow` dirs without remote code."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        AutoConfig.register(MODEL_TYPE, DataflowLlamaConfig)
        AutoModelForCausalLM.register(DataflowLlamaConfig, DataflowLlamaForCausalLM)
    except ValueError:  # registered already (this process imported it before)
        pass
