"""Families of random Hugging Face decoder models: a base and fine-tunes that share its shapes.

Test fixtures and benchmarks use them wherever real weights are not needed: a "fine-tune" is the base
plus a random delta, so task vectors are real tensors of known size and sign.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

Family = Literal["llama", "mistral", "qwen2", "gpt2"]

_TINY: dict[str, Any] = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 96,
    "max_position_embeddings": 64,
}


@dataclass
class FamilySpec:
    """What to build. `overrides` go to the transformers config (e.g. hidden_size=1024)."""

    family: Family = "llama"
    n_finetunes: int = 2
    dtype: torch.dtype = torch.float32
    tie_word_embeddings: bool = False
    max_shard_size: str | int | None = None  # None: one file; e.g. "20KB" for many shards
    delta_scale: float = 0.02
    seed: int = 0
    overrides: dict[str, Any] = field(default_factory=dict)


def make_config(spec: FamilySpec) -> Any:
    """A transformers config of the family, tiny unless `spec.overrides` says otherwise."""
    import transformers

    values = {**_TINY, **spec.overrides, "tie_word_embeddings": spec.tie_word_embeddings}
    if spec.family == "gpt2":
        values = {
            "n_embd": values["hidden_size"],
            "n_layer": values["num_hidden_layers"],
            "n_head": values["num_attention_heads"],
            "n_positions": values["max_position_embeddings"],
            "vocab_size": values["vocab_size"],
            "tie_word_embeddings": spec.tie_word_embeddings,
            "bos_token_id": 0,
            "eos_token_id": 1,
        }
    config_class = transformers.AutoConfig.for_model(spec.family).__class__
    return config_class(**values)


def build_family(out_dir: Path, spec: FamilySpec | None = None) -> dict[str, Path]:
    """Write `base` and `ft0..ft{n-1}` model dirs under `out_dir`; return their paths by name."""
    import transformers

    spec = spec or FamilySpec()
    generator = torch.Generator().manual_seed(spec.seed)
    torch.manual_seed(spec.seed)  # transformers' init draws from the global generator
    base = transformers.AutoModelForCausalLM.from_config(make_config(spec))
    base_state = {name: tensor.detach().clone() for name, tensor in base.state_dict().items()}
    paths = {"base": _save(base, out_dir / "base", spec)}
    for index in range(spec.n_finetunes):
        with torch.no_grad():
            for name, parameter in base.named_parameters():
                delta = torch.randn(parameter.shape, generator=generator) * spec.delta_scale
                parameter.copy_(base_state[name] + delta)
        paths[f"ft{index}"] = _save(base, out_dir / f"ft{index}", spec)
    return paths


def _save(model: Any, path: Path, spec: FamilySpec) -> Path:
    model.to(spec.dtype)
    kwargs: dict[str, Any] = {"safe_serialization": True}
    if spec.max_shard_size is not None:
        kwargs["max_shard_size"] = spec.max_shard_size
    model.save_pretrained(path, **kwargs)
    model.to(torch.float32)
    return path
