"""The compiled streaming TIES (`merge/streaming.py`) against the torch kernel: the same bits, every tensor."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from evomerge.merge import streaming
from evomerge.merge.config import MergeConfig
from evomerge.merge.engine import compute_tensor, merge_to_dir
from evomerge.merge.plan import build_plan
from evomerge.merge.sources import SourceSet
from evomerge.zoo.random_models import FamilySpec

from .engine_helpers import family, load_state

pytestmark = pytest.mark.skipif(not streaming.available(), reason="numba (the `fast` extra) is not installed")


@pytest.fixture(scope="module")
def bf16(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """bf16 base + 3 fine-tunes whose deltas are a few ulps: many equal magnitudes at every threshold."""
    spec = FamilySpec(n_finetunes=3, dtype=torch.bfloat16, delta_scale=0.002, seed=3)
    return family(tmp_path_factory.getbasetemp() / "families", "bf16_ties_heavy", spec)


def _config(models: dict[str, Path], per_model: list[str], extra: str = "") -> MergeConfig:
    lines = ["merge_method: ties", f"base_model: {models['base']}", "models:"]
    for name, params in zip(("ft0", "ft1", "ft2"), per_model, strict=True):
        lines.append(f"  - model: {models[name]}\n    parameters: {{{params}}}")
    lines += [f"parameters: {{{extra}}}" if extra else "", "dtype: bfloat16", ""]
    return MergeConfig.from_yaml("\n".join(lines))


CASES = {
    "default": (["weight: 1, density: 0.5"] * 3, "normalize: true"),
    "weights": (["weight: 0.3, density: 0.5", "weight: 1.7, density: 0.2", "weight: -0.6, density: 0.9"], ""),
    "dense": (["weight: 1, density: 1.0", "weight: 1, density: 0.01", "weight: 0.5, density: 0.7"], ""),
    "no_normalize": (["weight: 1, density: 0.4"] * 3, "normalize: false"),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("tie_break", ["mergekit", "stable"])
@pytest.mark.parametrize("keep_bytes", [streaming.KEEP_BYTES, 0], ids=["kept", "recomputed"])
def test_same_bits_as_the_kernel(bf16: dict[str, Path], case: str, tie_break: str, keep_bytes: int) -> None:
    per_model, extra = CASES[case]
    config = _config(bf16, per_model, extra)
    with SourceSet.open(config) as sources:
        plan = build_plan(config, sources)
        for task in plan.tasks:
            assert streaming.supported(task, plan.method, sources, tie_break)  # type: ignore[arg-type]
            # blocks of 1000 entries: every tensor spans several, and ties straddle block edges
            fast = streaming.merge_tensor(task, sources, tie_break, block=1000, keep_bytes=keep_bytes)  # type: ignore[arg-type]
            slow = compute_tensor(task, plan.method, sources.get, None, tie_break=tie_break)  # type: ignore[arg-type]
            assert fast is not None, task.name
            assert torch.equal(fast.view(torch.int16), slow.view(torch.int16)), task.name


def test_merge_to_dir_writes_the_kernels_bits(
    bf16: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = _config(bf16, ["weight: 1, density: 0.5"] * 3, "normalize: true")
    merge_to_dir(config, tmp_path / "fast")
    monkeypatch.setattr(streaming, "supported", lambda *args: False)
    merge_to_dir(config, tmp_path / "slow")
    fast, slow = load_state(tmp_path / "fast"), load_state(tmp_path / "slow")
    assert fast.keys() == slow.keys()
    for name in fast:
        assert torch.equal(fast[name].view(torch.int16), slow[name].view(torch.int16)), name


@pytest.mark.parametrize("codes_dtype", [np.int32, np.int64])  # int64: tensors of 2^31 entries or more
@pytest.mark.parametrize("seed", range(6))
def test_replay_matches_torch_sort(seed: int, codes_dtype: type[np.signedinteger]) -> None:
    """The compiled replay keeps the tied entries torch.sort puts first (blocks of stops and the plain
    loop both run: segments from 5000 entries down to 16; the vector scans' 16-entry tails too)."""
    from evomerge.merge import _ties_jit

    generator = torch.Generator().manual_seed(seed)
    keys = torch.randint(0, 12, (5000,), generator=generator, dtype=torch.int16)  # (N,) tie-heavy
    for k in (1, 777, 2500, 4999):
        order = torch.sort(keys.float(), descending=True).indices
        expected = torch.zeros(keys.numel(), dtype=torch.bool)
        expected[order[:k]] = True
        boundary = int(keys.float()[order[k - 1]])
        codes = np.empty(keys.numel(), dtype=codes_dtype)
        tied = int((keys == boundary).sum())
        positions = np.empty(tied + 1, dtype=np.int64)
        assert _ties_jit.tie_codes(keys.numpy(), boundary, tied, codes, 0, 0, positions) == tied
        assert np.array_equal(positions[:tied], np.flatnonzero(keys.numpy() == boundary))
        chosen = np.zeros(tied, dtype=bool)
        assert _ties_jit.replay_top_k(codes, k, boundary, tied, chosen)
        got = keys.numpy() > boundary
        got[positions[:tied][chosen]] = True
        assert np.array_equal(got, expected.numpy()), k


def test_non_finite_input_falls_back(tmp_path: Path) -> None:
    """A NaN in a source: the streaming path declines, so the kernel's error names tensor and model."""
    from evomerge.io import ShardedWriter

    models = {}
    for index, name in enumerate(("base", "ft0", "ft1", "ft2")):
        tensor = torch.randn(64, 64, generator=torch.Generator().manual_seed(index)).to(torch.bfloat16)
        if name == "ft1":
            tensor[3, 5] = float("nan")
        writer = ShardedWriter(tmp_path / name)
        writer.add("model.embed_tokens.weight", tensor)
        writer.finish()
        models[name] = tmp_path / name
    config = _config(models, ["weight: 1, density: 0.5"] * 3)
    with SourceSet.open(config) as sources:
        task = build_plan(config, sources).tasks[0]
        assert streaming.merge_tensor(task, sources) is None


def test_rows_for_another_vocabulary_take_the_kernels_path(bf16: dict[str, Path]) -> None:
    """A union (or re-indexed) tokenizer aligns embedding rows in compute_tensor: never the compiled path."""
    import dataclasses

    config = _config(bf16, ["weight: 1, density: 0.5"] * 3, "normalize: true")
    with SourceSet.open(config) as sources:
        plan = build_plan(config, sources)
        task = plan.tasks[0]
        assert streaming.supported(task, plan.method, sources, "mergekit")
        aligned = dataclasses.replace(task, vocab=object())
        assert not streaming.supported(aligned, plan.method, sources, "mergekit")


@pytest.mark.parametrize("tie_break", ["mergekit", "stable"])
def test_ties_exactly_filling_the_top_k(tmp_path: Path, tie_break: str) -> None:
    """Every entry tied at the threshold is kept (above + tied == k: no replay), beside a model whose
    ties straddle the threshold and one kept whole: the same bits as the kernel."""
    from evomerge.io import ShardedWriter

    generator = torch.Generator().manual_seed(0)
    signs = torch.where(torch.rand(64, 64, generator=generator) < 0.5, -1.0, 1.0)
    halves = torch.randperm(64 * 64, generator=generator).reshape(64, 64) < 64 * 32  # (64, 64) half True
    deltas = {
        "ft0": torch.where(halves, 1.0, 0.5) * signs,  # k = n / 2 = the 1.0s: all tied ones kept
        "ft1": torch.where(halves, 0.25, 0.5) * signs,  # the 0.5s, then ties at 0.25 straddling the cut
        "ft2": torch.randint(0, 3, (64, 64), generator=generator).float() * signs,  # density 1
    }
    models = {}
    for name in ("base", "ft0", "ft1", "ft2"):
        writer = ShardedWriter(tmp_path / name)
        writer.add("model.embed_tokens.weight", deltas.get(name, torch.zeros(64, 64)).to(torch.bfloat16))
        writer.finish()
        models[name] = tmp_path / name
    per_model = ["weight: 1, density: 0.5", "weight: 1, density: 0.6", "weight: 1, density: 1.0"]
    config = _config(models, per_model, "normalize: true")
    with SourceSet.open(config) as sources:
        plan = build_plan(config, sources)
        task = plan.tasks[0]
        assert streaming.supported(task, plan.method, sources, tie_break)  # type: ignore[arg-type]
        fast = streaming.merge_tensor(task, sources, tie_break, block=1000)  # type: ignore[arg-type]
        slow = compute_tensor(task, plan.method, sources.get, None, tie_break=tie_break)  # type: ignore[arg-type]
        assert fast is not None
        assert torch.equal(fast.view(torch.int16), slow.view(torch.int16))
