"""Shared by the engine's tests: tiny model families built once, config files, reading outputs, ulp checks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from evomerge.zoo.random_models import FamilySpec, build_family

_FAMILIES: dict[str, dict[str, Path]] = {}
MERGEKIT_YAML = Path(sys.executable).parent / "mergekit-yaml"


def family(root: Path, key: str, spec: FamilySpec) -> dict[str, Path]:
    """A family built once per test session under `root` (a session tmp dir), keyed by `key`."""
    if key not in _FAMILIES:
        _FAMILIES[key] = build_family(root / key, spec)
    return _FAMILIES[key]


def write_config(directory: Path, text: str, name: str = "merge.yaml") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_text(text)
    return path


def load_state(model_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors model dir, single-file or sharded."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    state: dict[str, torch.Tensor] = {}
    for file_name in files:
        state.update(load_file(model_dir / file_name))
    return state


def run_mergekit(config: Path, out: Path, *extra: str) -> None:
    """mergekit-yaml 0.1.5 on CPU, in a subprocess (its own process state, like a user's run)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    command = [str(MERGEKIT_YAML), str(config), str(out), "--no-cuda", "--quiet", *extra]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300, check=False)
    if done.returncode != 0:
        raise AssertionError(f"mergekit-yaml failed:\n{done.stderr[-3000:]}")


_MANTISSA_BITS = {torch.float32: 23, torch.bfloat16: 7, torch.float16: 10, torch.float64: 52}


def ulp(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The spacing of `dtype` at each |value| (the smallest normal spacing at zero)."""
    magnitude = values.double().abs().clamp_min(torch.finfo(dtype).tiny)
    return torch.exp2(torch.floor(torch.log2(magnitude)) - _MANTISSA_BITS[dtype])


def assert_within_one_ulp(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> None:
    """Same tensor names, shapes and dtypes, and every entry within one ulp of the output dtype."""
    assert sorted(ours) == sorted(theirs), (sorted(set(ours) ^ set(theirs)))[:5]
    for name, tensor in ours.items():
        other = theirs[name]
        assert tensor.shape == other.shape and tensor.dtype == other.dtype, (name, tensor.dtype, other.dtype)
        difference = (tensor.double() - other.double()).abs()
        allowed = ulp(torch.maximum(tensor.double().abs(), other.double().abs()), tensor.dtype)
        worst = float((difference - allowed).max())
        assert worst <= 0, f"{name}: max abs diff {float(difference.max()):.3g} exceeds one ulp"


def config_dict(model_dir: Path) -> dict[str, Any]:
    return json.loads((model_dir / "config.json").read_text())


_BATCH_DRIVER = """
import sys, yaml, torch
torch.set_num_threads(1)
from mergekit.config import MergeConfiguration
from mergekit.merge import run_merge
from mergekit.options import MergeOptions
args = sys.argv[1:]
for config_path, out_path in zip(args[::2], args[1::2]):
    text = open(config_path, encoding="utf-8").read()
    config = MergeConfiguration.model_validate(yaml.safe_load(text))
    run_merge(config, out_path, options=MergeOptions(quiet=True), config_source=text)
"""


def run_mergekit_batch(jobs: list[tuple[Path, Path]]) -> None:
    """Many merges in one mergekit process (mergekit-yaml's own `run_merge`, imported once)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    args = [str(part) for job in jobs for part in job]
    command = [sys.executable, "-c", _BATCH_DRIVER, *args]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900, check=False)
    if done.returncode != 0:
        raise AssertionError(f"mergekit failed:\n{done.stderr[-3000:]}")


# ---- models whose tokenizers differ (tokenizer_source: union) ------------------------------------------

SPECIALS = ["<unk>", "<s>", "</s>"]


@dataclass(frozen=True)
class VocabSpec:
    """One model's tokenizer: word-level `words` after the three specials, then `added` special tokens;
    `rows`: its embedding rows and config vocab_size (more than its tokens: padded)."""

    words: tuple[str, ...]
    added: tuple[str, ...] = ()
    rows: int | None = None


def words(*ranges: tuple[str, int, int]) -> tuple[str, ...]:
    """("w", 3, 90) -> w3 .. w89, joined over the ranges."""
    return tuple(f"{prefix}{i}" for prefix, start, stop in ranges for i in range(start, stop))


def save_word_tokenizer(model_dir: Path, spec: VocabSpec) -> int:
    """A word-level fast tokenizer saved as transformers saves it; returns its number of tokens."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {token: index for index, token in enumerate([*SPECIALS, *spec.words])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    for token in spec.added:
        tokenizer.add_tokens([transformers.AddedToken(token, special=True)], special_tokens=True)
    tokenizer.save_pretrained(model_dir)
    return len(tokenizer.get_vocab())


def vocab_family(root: Path, key: str, spec: FamilySpec, vocabs: dict[str, VocabSpec]) -> dict[str, Path]:
    """A family (built once per session) whose models get the tokenizers `vocabs` names, their embedding
    and output rows cut or extended (with random rows) to match, and their config's vocab_size set."""
    key = f"vocab-{key}"  # the cache is shared with `family`, whose keys these must not shadow
    if key in _FAMILIES:
        return _FAMILIES[key]
    paths = build_family(root / key, spec)
    generator = torch.Generator().manual_seed(spec.seed + 100)
    for name, vocab in vocabs.items():
        rows = vocab.rows or save_word_tokenizer(paths[name], vocab)
        if vocab.rows:
            save_word_tokenizer(paths[name], vocab)
        _resize_vocab_rows(paths[name], rows, generator)
    _FAMILIES[key] = paths
    return paths


def _resize_vocab_rows(model_dir: Path, rows: int, generator: torch.Generator) -> None:
    state = load_file(model_dir / "model.safetensors")
    for name, tensor in state.items():
        if name.endswith(("embed_tokens.weight", "lm_head.weight")):
            extra = 0.02 * torch.randn(max(0, rows - tensor.shape[0]), tensor.shape[1], generator=generator)
            state[name] = torch.cat([tensor[:rows], extra.to(tensor.dtype)]).contiguous()
    save_file(state, model_dir / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps({**config, "vocab_size": rows}, indent=2))
