"""Shared by the engine's tests: tiny model families built once, config files, reading outputs, ulp checks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

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
