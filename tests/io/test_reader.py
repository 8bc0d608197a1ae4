"""ModelDir: lazy reading of single-file and sharded safetensors dirs, pickle refusal, clear errors."""

from __future__ import annotations

import json
import os
import pickle
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from evomerge.errors import SourceError, TensorMismatchError, UnsafeCheckpointError
from evomerge.io import reader
from evomerge.io.reader import ModelDir
from evomerge.zoo.random_models import FamilySpec

SHARDED = FamilySpec(max_shard_size="20KB", dtype=torch.bfloat16, tie_word_embeddings=True, n_finetunes=1)


def _reference(model_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a dir, loaded eagerly by safetensors itself."""
    state: dict[str, torch.Tensor] = {}
    for path in sorted(model_dir.glob("*.safetensors")):
        state.update(load_file(path))
    return state


def test_single_file_matches_safetensors(tiny_family: dict[str, Path]) -> None:
    reference = _reference(tiny_family["ft0"])
    with ModelDir(tiny_family["ft0"]) as model:
        assert sorted(model.tensor_names()) == sorted(reference)
        for name, expected in reference.items():
            got = model.get(name)
            assert got.dtype == expected.dtype == torch.float32
            assert torch.equal(got, expected), name
            assert model.info(name).shape == tuple(expected.shape)
        assert model.config["model_type"] == "llama"


def test_sharded_bf16_tied(make_family) -> None:  # type: ignore[no-untyped-def]
    paths = make_family(SHARDED)
    index = json.loads((paths["base"] / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(index.values())) > 1, "the fixture should be sharded"
    reference = _reference(paths["base"])
    model = ModelDir(paths["base"])
    assert sorted(model.tensor_names()) == sorted(index)
    assert not model.has("lm_head.weight")  # tied: transformers does not save it
    for name in model.tensor_names():
        info = model.info(name)
        assert info.file == paths["base"] / index[name]
        assert info.dtype == torch.bfloat16
        assert info.nbytes == reference[name].numel() * 2
        assert torch.equal(model.get(name), reference[name]), name


@pytest.mark.parametrize("use_mmap", [True, False])
def test_get_returns_a_fresh_tensor(tiny_family: dict[str, Path], use_mmap: bool) -> None:
    file_bytes = (tiny_family["base"] / "model.safetensors").read_bytes()
    model = ModelDir(tiny_family["base"], use_mmap=use_mmap)
    name = "model.norm.weight"
    first = model.get(name)
    expected = first.clone()
    first.add_(1.0)
    assert torch.equal(model.get(name), expected)
    del first
    model.close()
    assert (tiny_family["base"] / "model.safetensors").read_bytes() == file_bytes  # copy-on-write


def test_tensor_outlives_close(tiny_family: dict[str, Path]) -> None:
    with ModelDir(tiny_family["base"]) as model:
        tensor = model.get("model.embed_tokens.weight")
        expected = tensor.clone()
    assert torch.equal(tensor, expected)  # the mapping belongs to the tensor, not to the open file


@pytest.mark.parametrize("use_mmap", [True, False])
def test_concurrent_reads(make_family, use_mmap: bool) -> None:  # type: ignore[no-untyped-def]
    paths = make_family(SHARDED)
    reference = _reference(paths["ft0"])
    model = ModelDir(paths["ft0"], use_mmap=use_mmap)
    names = model.tensor_names() * 20
    failures: list[str] = []

    def work(offset: int) -> None:
        for name in names[offset::8]:
            if not torch.equal(model.get(name), reference[name]):
                failures.append(name)

    threads = [threading.Thread(target=work, args=(offset,)) for offset in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []


def test_mapping_budget_falls_back_to_copies(tiny_family: dict[str, Path], monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Holding more tensors than the descriptor budget allows: the extra ones are read as copies."""
    import gc

    gc.collect()
    live_before = reader._MAPPINGS.live
    monkeypatch.setattr(reader._MAPPINGS, "limit", live_before + 3)
    reference = _reference(tiny_family["base"])
    model = ModelDir(tiny_family["base"])
    held = {name: model.get(name) for name in model.tensor_names()}
    assert reader._MAPPINGS.live == live_before + 3
    assert all(torch.equal(held[name], reference[name]) for name in reference)
    del held
    gc.collect()
    assert reader._MAPPINGS.live == live_before


def test_misaligned_tensor_is_read_by_copy(tmp_path: Path) -> None:
    """A float32 tensor starting at an odd offset cannot be a view of the mapping: it is copied."""
    from evomerge.io.writer import ShardedWriter

    tensors = {"a": torch.tensor([1.0, 2.0, 3.0], dtype=torch.bfloat16), "b": torch.tensor([4.0, 5.0])}
    with ShardedWriter(tmp_path) as writer:
        for name, tensor in tensors.items():
            writer.add(name, tensor)
    model = ModelDir(tmp_path)
    assert all(torch.equal(model.get(name), tensor) for name, tensor in tensors.items())


def test_odd_tensors_roundtrip(tmp_path: Path) -> None:
    tensors = {
        "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0, 4),
        "flags": torch.tensor([True, False, True]),
        "ints": torch.arange(7, dtype=torch.int64),
        "half": torch.randn(3, 5).half(),
    }
    save_file(tensors, tmp_path / "model.safetensors")
    model = ModelDir(tmp_path)
    assert model.config == {}
    for name, expected in tensors.items():
        got = model.get(name)
        assert got.dtype == expected.dtype and got.shape == expected.shape
        assert torch.equal(got, expected), name


# ---- errors -----------------------------------------------------------------------------------------


def test_missing_dir(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match=r"does-not-exist.*does not exist"):
        ModelDir(tmp_path / "does-not-exist")


def test_dir_without_weights(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(SourceError, match=r"no model weights.*model\.safetensors.*pytorch_model\.bin"):
        ModelDir(tmp_path)


def test_missing_tensor_names_dir_and_tensor(tiny_family: dict[str, Path]) -> None:
    model = ModelDir(tiny_family["base"])
    with pytest.raises(TensorMismatchError, match=r"base.*'model\.layers\.99\.mlp\.up_proj\.weight'"):
        model.get("model.layers.99.mlp.up_proj.weight")
    with pytest.raises(TensorMismatchError):
        model.info("nope")


def test_malformed_index(make_family) -> None:  # type: ignore[no-untyped-def]
    base = make_family(SHARDED)["base"]
    (base / "model.safetensors.index.json").write_text('{"weight_map": {"a": ')
    with pytest.raises(SourceError, match=r"model\.safetensors\.index\.json.*JSON"):
        ModelDir(base)
    (base / "model.safetensors.index.json").write_text('{"weights": {}}')
    with pytest.raises(SourceError, match="weight_map"):
        ModelDir(base)


def test_index_names_a_missing_shard(make_family) -> None:  # type: ignore[no-untyped-def]
    base = make_family(SHARDED)["base"]
    shard = sorted(base.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(SourceError, match=f"'{shard.name}'.*missing"):
        ModelDir(base)


def test_index_and_shard_disagree(make_family) -> None:  # type: ignore[no-untyped-def]
    base = make_family(SHARDED)["base"]
    index_path = base / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["model.ghost.weight"] = next(iter(index["weight_map"].values()))
    index_path.write_text(json.dumps(index))
    with pytest.raises(SourceError, match=r"'model\.ghost\.weight'"):
        ModelDir(base)


@pytest.mark.parametrize(
    "corrupt",
    [
        lambda data: data[:5],  # shorter than the length prefix
        lambda data: (10**9).to_bytes(8, "little") + data[8:],  # length beyond the file
        lambda data: data[:8] + b"#" + data[9:],  # header is not JSON
        lambda data: data[:-10],  # data truncated
    ],
    ids=["too-short", "bad-length", "bad-json", "truncated"],
)
def test_corrupt_header_names_the_file(tiny_family: dict[str, Path], corrupt) -> None:  # type: ignore[no-untyped-def]
    path = tiny_family["base"] / "model.safetensors"
    path.write_bytes(corrupt(path.read_bytes()))
    with pytest.raises(SourceError, match=r"model\.safetensors"):
        ModelDir(tiny_family["base"])


# ---- pickle checkpoints -----------------------------------------------------------------------------


def _pickle_dir(tmp_path: Path, sharded: bool) -> tuple[Path, dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    state = {f"layer.{i}.weight": torch.randn(4, 3, generator=generator) for i in range(4)}
    model_dir = tmp_path / ("sharded" if sharded else "single")
    model_dir.mkdir()
    if not sharded:
        torch.save(state, model_dir / "pytorch_model.bin")
        return model_dir, state
    names = list(state)
    weight_map = {}
    for number, part in enumerate((names[:2], names[2:]), start=1):
        file_name = f"pytorch_model-{number:05d}-of-00002.bin"
        torch.save({name: state[name] for name in part}, model_dir / file_name)
        weight_map.update(dict.fromkeys(part, file_name))
    (model_dir / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return model_dir, state


@pytest.mark.parametrize("sharded", [False, True])
def test_pickle_refused_then_allowed(tmp_path: Path, sharded: bool) -> None:
    model_dir, state = _pickle_dir(tmp_path, sharded)
    with pytest.raises(UnsafeCheckpointError, match=r"pytorch_model.*arbitrary code.*--allow-pickle"):
        ModelDir(model_dir)
    model = ModelDir(model_dir, allow_pickle=True)
    assert sorted(model.tensor_names()) == sorted(state)
    for name, expected in state.items():
        assert model.info(name).shape == (4, 3)
        assert torch.equal(model.get(name), expected)


class _Payload:
    """An object whose unpickling would run code: weights_only must refuse it."""

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (os.system, ("touch pwned",))


def test_pickle_with_code_is_refused_even_when_allowed(tmp_path: Path) -> None:
    with open(tmp_path / "pytorch_model.bin", "wb") as handle:
        pickle.dump({"w": _Payload()}, handle)
    with pytest.raises(SourceError, match=r"pytorch_model\.bin.*weights_only"):
        ModelDir(tmp_path, allow_pickle=True)
    assert not (Path.cwd() / "pwned").exists()


def test_safetensors_preferred_over_pickle(tiny_family: dict[str, Path]) -> None:
    base = tiny_family["base"]
    torch.save({"x": torch.zeros(1)}, base / "pytorch_model.bin")
    assert ModelDir(base).has("model.embed_tokens.weight")  # no pickle error: safetensors wins
