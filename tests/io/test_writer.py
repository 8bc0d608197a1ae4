"""ShardedWriter (transformers' shard names, index, streaming) and atomic_output_dir."""

from __future__ import annotations

import json
import stat
import threading
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from evomerge.errors import OutputExistsError
from evomerge.io import writer as writer_module
from evomerge.io.reader import ModelDir
from evomerge.io.writer import ShardedWriter, atomic_output_dir, header_room_for
from evomerge.zoo.random_models import FamilySpec


def _state(seed: int = 0, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {f"layers.{i}.weight": torch.randn(16, 8, generator=generator).to(dtype) for i in range(6)}


def _load_dir(out_dir: Path) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for path in sorted(out_dir.glob("*.safetensors")):
        state.update(load_file(path))
    return state


def test_single_shard(tmp_path: Path) -> None:
    state = _state()
    writer = ShardedWriter(tmp_path)
    for name, tensor in state.items():
        writer.add(name, tensor)
    files = writer.finish()
    assert files == [tmp_path / "model.safetensors"]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["model.safetensors"]  # no temp files left
    loaded = load_file(files[0])
    assert loaded.keys() == state.keys()
    assert all(torch.equal(loaded[name], tensor) for name, tensor in state.items())
    with safe_open(files[0], framework="pt") as handle:
        assert handle.metadata() == {"format": "pt"}
    header_length = int.from_bytes(files[0].read_bytes()[:8], "little")
    assert header_length % 8 == 0


def test_many_shards_named_like_transformers(tmp_path: Path) -> None:
    state = _state(dtype=torch.bfloat16)  # 256 bytes each
    writer = ShardedWriter(tmp_path, max_shard_bytes=600)  # two tensors a shard
    for name, tensor in state.items():
        writer.add(name, tensor)
    files = writer.finish()
    expected = [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)] + ["model.safetensors.index.json"]
    assert [path.name for path in files] == expected
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == 6 * 256
    assert index["weight_map"]["layers.0.weight"] == "model-00001-of-00003.safetensors"
    assert index["weight_map"]["layers.5.weight"] == "model-00003-of-00003.safetensors"
    loaded = _load_dir(tmp_path)
    assert all(torch.equal(loaded[name], tensor) for name, tensor in state.items())
    assert sorted(ModelDir(tmp_path).tensor_names()) == sorted(state)


def test_large_tensor_gets_its_own_shard(tmp_path: Path) -> None:
    writer = ShardedWriter(tmp_path, max_shard_bytes=100)
    writer.add("small", torch.zeros(4))  # 16 bytes
    writer.add("big", torch.zeros(1000))  # 4000 bytes: over the limit alone
    writer.add("small2", torch.zeros(4))
    writer.finish()
    weight_map = json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(weight_map.values())) == 3


def test_full_header_closes_the_shard_early(tmp_path: Path) -> None:
    state = {f"model.layers.{i}.self_attn.q_proj.weight": torch.full((1,), float(i)) for i in range(200)}
    writer = ShardedWriter(tmp_path, max_shard_bytes=1_000_000)  # 800 bytes of data, 4 KiB of header room
    for name, tensor in state.items():
        writer.add(name, tensor)
    files = writer.finish()
    assert len(files) > 2  # several shards and the index, although the data would fit one shard
    loaded = _load_dir(tmp_path)
    assert loaded.keys() == state.keys()
    assert all(torch.equal(loaded[name], tensor) for name, tensor in state.items())


@pytest.mark.parametrize(("numel", "padded"), [(250_000, True), (100, False)])
def test_header_room_padded_or_compacted(tmp_path: Path, numel: int, padded: bool) -> None:
    """Big shards keep the reserved (space-padded) header; small ones are rewritten with a tight one."""
    tensors = {"big": torch.arange(numel, dtype=torch.float32), "small": torch.ones(3)}
    with ShardedWriter(tmp_path, max_shard_bytes=2_000_000) as writer:  # 4 KiB of header room
        for name, tensor in tensors.items():
            writer.add(name, tensor)
    data = (tmp_path / "model.safetensors").read_bytes()
    header_length = int.from_bytes(data[:8], "little")
    assert (header_length == header_room_for(2_000_000)) == padded
    assert header_length % 8 == 0 and len(data) == 8 + header_length + 4 * (numel + 3)
    assert data[8 + header_length - 1 : 8 + header_length] in (b" ", b"}")
    loaded = load_file(tmp_path / "model.safetensors")
    assert all(torch.equal(loaded[name], tensor) for name, tensor in tensors.items())
    model = ModelDir(tmp_path)
    assert all(torch.equal(model.get(name), tensor) for name, tensor in tensors.items())


def test_very_long_and_unicode_names(tmp_path: Path) -> None:
    names = ["x" * 20_000, "ünïcødé." * 1000, "short"]
    with ShardedWriter(tmp_path, max_shard_bytes=1_000_000) as writer:
        for index, name in enumerate(names):
            writer.add(name, torch.full((2,), float(index)))
    loaded = _load_dir(tmp_path)
    assert sorted(loaded) == sorted(names)
    assert torch.equal(loaded["short"], torch.full((2,), 2.0))


def test_views_shared_and_odd_tensors(tmp_path: Path) -> None:
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    tensors = {
        "transposed": base.t(),  # non-contiguous view
        "tied_a": base,
        "tied_b": base,  # same storage twice, as tied embeddings are
        "slice": base[1:3, 2:],
        "scalar": torch.tensor(2.5, dtype=torch.bfloat16),
        "empty": torch.zeros(0, 3),
        "flags": torch.tensor([True, False]),
        "param": torch.nn.Parameter(torch.ones(3)),
    }
    with ShardedWriter(tmp_path) as writer:
        for name, tensor in tensors.items():
            writer.add(name, tensor)
    loaded = load_file(tmp_path / "model.safetensors")
    for name, tensor in tensors.items():
        assert loaded[name].dtype == tensor.dtype and torch.equal(loaded[name], tensor.detach()), name


def test_duplicate_name_and_add_after_finish(tmp_path: Path) -> None:
    writer = ShardedWriter(tmp_path)
    writer.add("a", torch.zeros(2))
    with pytest.raises(ValueError, match="'a' was added twice"):
        writer.add("a", torch.zeros(2))
    writer.finish()
    with pytest.raises(RuntimeError, match="after finish"):
        writer.add("b", torch.zeros(2))


def test_abort_on_error_leaves_nothing(tmp_path: Path) -> None:
    with pytest.raises(KeyError), ShardedWriter(tmp_path, max_shard_bytes=10) as writer:
        writer.add("a", torch.zeros(4))
        writer.add("b", torch.zeros(4))
        raise KeyError("boom")
    assert list(tmp_path.iterdir()) == []


def test_add_from_threads(tmp_path: Path) -> None:
    state = {f"t{i}": torch.full((50,), float(i)) for i in range(64)}
    writer = ShardedWriter(tmp_path, max_shard_bytes=1000)
    threads = [
        threading.Thread(target=lambda part=part: [writer.add(n, state[n]) for n in part])
        for part in (list(state)[k::4] for k in range(4))
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    writer.finish()
    loaded = _load_dir(tmp_path)
    assert loaded.keys() == state.keys()
    assert all(torch.equal(loaded[name], tensor) for name, tensor in state.items())


@pytest.mark.parametrize("padded", [False, True])
def test_transformers_loads_the_output(make_family, tmp_path: Path, monkeypatch, padded: bool) -> None:  # type: ignore[no-untyped-def]
    import transformers

    if padded:  # keep the reserved, space-padded header even in these tiny shards
        monkeypatch.setattr(writer_module, "MAX_PADDING_SHARE", float("inf"))

    source = make_family(FamilySpec(dtype=torch.bfloat16, tie_word_embeddings=True, n_finetunes=0))["base"]
    out = tmp_path / "out"
    with ModelDir(source) as model, ShardedWriter(out, max_shard_bytes=20_000) as writer:
        for name in model.tensor_names():
            writer.add(name, model.get(name))
    (out / "config.json").write_bytes((source / "config.json").read_bytes())
    assert (out / "model.safetensors.index.json").is_file()
    first = sorted(out.glob("model-00001-of-*.safetensors"))[0].read_bytes()
    assert (int.from_bytes(first[:8], "little") == header_room_for(20_000)) == padded
    expected = transformers.AutoModelForCausalLM.from_pretrained(source).state_dict()
    got = transformers.AutoModelForCausalLM.from_pretrained(out).state_dict()
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[name], expected[name]) for name in expected)


# ---- atomic_output_dir --------------------------------------------------------------------------------


def test_atomic_success(tmp_path: Path) -> None:
    out = tmp_path / "nested" / "merged"
    with atomic_output_dir(out) as temporary:
        assert temporary.parent == out.parent and temporary.name.startswith(".merged.tmp-")
        (temporary / "file.txt").write_text("hi")
        assert not out.exists()
    assert (out / "file.txt").read_text() == "hi"
    assert sorted(path.name for path in out.parent.iterdir()) == ["merged"]
    assert stat.S_IMODE(out.stat().st_mode) & 0o055  # readable by others, not a private 0700 temp dir


def test_atomic_failure_removes_everything(tmp_path: Path) -> None:
    out = tmp_path / "merged"
    with pytest.raises(RuntimeError, match="boom"), atomic_output_dir(out) as temporary:
        (temporary / "half.safetensors").write_bytes(b"x")
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_atomic_refuses_existing(tmp_path: Path) -> None:
    out = tmp_path / "merged"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    with pytest.raises(OutputExistsError, match=r"merged.*--force"), atomic_output_dir(out):
        pytest.fail("the body must not run")
    assert (out / "keep.txt").read_text() == "old"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["merged"]


def test_atomic_force_replaces(tmp_path: Path) -> None:
    out = tmp_path / "merged"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with atomic_output_dir(out, force=True) as temporary:
        (temporary / "new.txt").write_text("new")
        assert (out / "old.txt").exists()  # the old output survives until the new one is complete
    assert sorted(path.name for path in out.iterdir()) == ["new.txt"]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["merged"]


def test_atomic_force_failure_keeps_old(tmp_path: Path) -> None:
    out = tmp_path / "merged"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(ValueError), atomic_output_dir(out, force=True):
        raise ValueError("bad config")
    assert (out / "old.txt").read_text() == "old"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["merged"]


def test_io_floor_benchmark_runs(tiny_family: dict[str, Path], tmp_path: Path) -> None:
    """benchmarks/io_floor.py (imported by the merge benchmark) reads everything and writes one model."""
    import importlib.util

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "io_floor.py"
    spec = importlib.util.spec_from_file_location("io_floor", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    seconds = module.io_floor([tiny_family["base"], tiny_family["ft0"]], tmp_path / "floor", threads=2)
    assert seconds > 0
    written = load_file(tmp_path / "floor" / "model.safetensors")
    expected = load_file(tiny_family["base"] / "model.safetensors")
    assert written.keys() == expected.keys()
    assert all(torch.equal(written[name], expected[name]) for name in expected)


@pytest.mark.oracle
def test_mergekit_reads_the_output(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """mergekit 0.1.5's loader reads our shards (space-padded headers) back to the same tensors."""
    loader_module = pytest.importorskip("mergekit.io.lazy_tensor_loader")
    monkeypatch.setattr(writer_module, "MAX_PADDING_SHARE", float("inf"))
    state = _state(dtype=torch.bfloat16)
    with ShardedWriter(tmp_path, max_shard_bytes=600) as writer:
        for name, tensor in state.items():
            writer.add(name, tensor)
    loader = loader_module.LazyTensorLoader(loader_module.ShardedTensorIndex.from_disk(str(tmp_path)))
    assert all(torch.equal(loader.get_tensor(name), tensor) for name, tensor in state.items())
