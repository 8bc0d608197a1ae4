"""Synthetic 7B-shaped model families for merge benchmarks: a base and fine-tunes, bf16, sharded safetensors.

The tensors have the names and shapes of Llama-2-7B (hidden 4096, intermediate 11008, 32 heads, vocab
32000, untied; `--shape mistral` gives Mistral-7B's 14336 and 8 KV heads) with any number of layers.
Weights are N(0, 0.02) (norms 1), a fine-tune adds N(0, delta_scale) to the base before rounding to
bf16, so the task vectors are full of the equal magnitudes that real bf16 fine-tunes have. Every tensor
is drawn from a generator seeded by (seed, tensor name), one tensor at a time, and streamed to
`ShardedWriter`: the whole family is never in memory, and the same seed gives the same bytes.

    python -m benchmarks.synthetic OUT_DIR [--layers 32] [--finetunes 3] [--seed 0]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
from collections.abc import Iterator
from pathlib import Path

import torch

from evomerge.io import ShardedWriter

SHAPES: dict[str, dict[str, int]] = {
    "llama2": {"hidden": 4096, "intermediate": 11008, "heads": 32, "kv_heads": 32, "vocab": 32000},
    "mistral": {"hidden": 4096, "intermediate": 14336, "heads": 32, "kv_heads": 8, "vocab": 32000},
}
SHARD_BYTES = 5_000_000_000  # transformers' default shard size


def tensor_shapes(shape: str, layers: int) -> Iterator[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every tensor of a Llama-architecture model, in the order transformers saves them."""
    s = SHAPES[shape]
    hidden, kv = s["hidden"], s["hidden"] * s["kv_heads"] // s["heads"]
    yield "model.embed_tokens.weight", (s["vocab"], hidden)
    for layer in range(layers):
        prefix = f"model.layers.{layer}."
        yield prefix + "self_attn.q_proj.weight", (hidden, hidden)
        yield prefix + "self_attn.k_proj.weight", (kv, hidden)
        yield prefix + "self_attn.v_proj.weight", (kv, hidden)
        yield prefix + "self_attn.o_proj.weight", (hidden, hidden)
        yield prefix + "mlp.gate_proj.weight", (s["intermediate"], hidden)
        yield prefix + "mlp.up_proj.weight", (s["intermediate"], hidden)
        yield prefix + "mlp.down_proj.weight", (hidden, s["intermediate"])
        yield prefix + "input_layernorm.weight", (hidden,)
        yield prefix + "post_attention_layernorm.weight", (hidden,)
    yield "model.norm.weight", (hidden,)
    yield "lm_head.weight", (s["vocab"], hidden)


def config_json(shape: str, layers: int) -> dict[str, object]:
    s = SHAPES[shape]
    return {
        "architectures": ["LlamaForCausalLM" if shape == "llama2" else "MistralForCausalLM"],
        "model_type": "llama" if shape == "llama2" else "mistral",
        "hidden_size": s["hidden"],
        "intermediate_size": s["intermediate"],
        "num_attention_heads": s["heads"],
        "num_key_value_heads": s["kv_heads"],
        "num_hidden_layers": layers,
        "vocab_size": s["vocab"],
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
    }


_SHIFT = 1_000_003  # entries between the windows of a tensor's noise that the models take


def _noise(seed: int, name: str, numel: int, models: int) -> torch.Tensor:
    """One N(0, 1) draw per tensor, seeded by (seed, name); model m takes the window starting at
    m * _SHIFT. Windows of one draw are independent entry by entry (each entry of a model sees another
    draw), and drawing once instead of once per model makes building a 7B family ~2x faster."""
    digest = hashlib.blake2b(f"{seed}:{name}".encode(), digest_size=8).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(digest, "little") & ((1 << 63) - 1))
    return torch.randn(numel + models * _SHIFT, generator=generator)


def build(
    out_dir: Path,
    *,
    layers: int = 32,
    finetunes: int = 3,
    shape: str = "llama2",
    seed: int = 0,
    delta_scale: float = 0.002,
    max_shard_bytes: int = SHARD_BYTES,
) -> dict[str, Path]:
    """Write `base` and `ft0..` model dirs under `out_dir`, one tensor of all of them at a time.

    Base weights are 0.02 * noise (norms 1), fine-tune i adds delta_scale * its window of the noise."""
    names = ["base", *(f"ft{index}" for index in range(finetunes))]
    dirs = {name: out_dir / name for name in names}
    writers = {name: ShardedWriter(path, max_shard_bytes=max_shard_bytes) for name, path in dirs.items()}
    for tensor_name, tensor_shape in tensor_shapes(shape, layers):
        numel = math.prod(tensor_shape)
        noise = _noise(seed, tensor_name, numel, finetunes)
        if len(tensor_shape) == 1:  # norms start at 1, as in a real checkpoint
            base = torch.ones(tensor_shape)
        else:
            base = noise[:numel].mul(0.02).reshape(tensor_shape)
        writers["base"].add(tensor_name, base.to(torch.bfloat16))
        for index, name in enumerate(names[1:], start=1):
            window = noise[index * _SHIFT : index * _SHIFT + numel].reshape(tensor_shape)
            writers[name].add(tensor_name, torch.add(base, window, alpha=delta_scale).to(torch.bfloat16))
        del noise, base
    for name, writer in writers.items():
        writer.finish()
        (dirs[name] / "config.json").write_text(json.dumps(config_json(shape, layers), indent=2) + "\n")
    return dirs


def model_bytes(shape: str, layers: int) -> int:
    """Bytes of one model's bf16 weights."""
    return sum(2 * math.prod(size) for _, size in tensor_shapes(shape, layers))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--finetunes", type=int, default=3)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama2")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(build(args.out, layers=args.layers, finetunes=args.finetunes, shape=args.shape, seed=args.seed))


if __name__ == "__main__":
    main()
