"""Fixtures shared by the engine's tests: the tiny families most of them merge (built once per session), and
a one-layer family with calibration prompts for the sequential data-aware methods."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from evomerge.zoo.random_models import FamilySpec, build_family
from evomerge.zoo.tokenizer import build_tokenizer, save_tokenizer

from .engine_helpers import family


@pytest.fixture(scope="module")
def fam(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """fp32 Llama base + 3 fine-tunes, untied, one file each."""
    return family(tmp_path_factory.getbasetemp() / "families", "fp32", FamilySpec(n_finetunes=3))


@pytest.fixture(scope="module")
def tied(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The same with tied embeddings (no lm_head tensor)."""
    spec = FamilySpec(n_finetunes=3, tie_word_embeddings=True, seed=2)
    return family(tmp_path_factory.getbasetemp() / "families", "fp32_tied", spec)


EMBED = "model.embed_tokens.weight"


@pytest.fixture(scope="module")
def one_layer_family(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A one-layer Llama base + 2 fine-tunes that share the base's embedding (so layer 0 sees one input)."""
    root = tmp_path_factory.mktemp("regmeanpp")
    spec = FamilySpec(n_finetunes=2, delta_scale=0.1, overrides={"num_hidden_layers": 1})
    paths = build_family(root / "family", spec)
    base = load_file(str(paths["base"] / "model.safetensors"))
    for name in ("ft0", "ft1"):
        file = paths[name] / "model.safetensors"
        tensors = load_file(str(file)) | {EMBED: base[EMBED]}
        save_file(tensors, str(file), metadata={"format": "pt"})
    tokenizer = build_tokenizer()
    for path in paths.values():
        save_tokenizer(tokenizer, path)
    return paths


@pytest.fixture(scope="module")
def calibration_prompts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("prompts")
    files = {}
    for key, make in (("ft0", lambda i: (f"add {i} and {i + 2}: ", str(2 * i + 2))),
                      ("ft1", lambda i: (f"reverse word{i}: ", f"{i}drow"))):  # fmt: skip
        files[key] = root / f"{key}.jsonl"
        lines = [{"prompt": make(i)[0], "answer": make(i)[1]} for i in range(8)]
        files[key].write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    return files
