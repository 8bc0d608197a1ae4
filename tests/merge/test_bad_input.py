"""Bad input: one clear error naming the file, tensor or field, and no OUT_DIR left behind."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from evomerge.errors import EvomergeError, OutputExistsError, UnsafeCheckpointError
from evomerge.merge.api import merge

from .engine_helpers import write_config


def _variant(source: Path, dest: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> Path:
    """A copy of a model dir whose tensors went through `edit`."""
    shutil.copytree(source, dest)
    state = load_file(dest / "model.safetensors")
    edit(state)
    save_file(state, dest / "model.safetensors", metadata={"format": "pt"})
    return dest


def _ties(fam: dict[str, Path], other: Path | str, extra: str = "") -> str:
    return (
        f"merge_method: ties\nbase_model: {fam['base']}\nmodels:\n"
        f"  - {{model: {fam['ft0']}, parameters: {{weight: 0.5, density: 0.5}}}}\n"
        f"  - {{model: {other}, parameters: {{weight: 0.5, density: 0.5}}}}\n{extra}"
    )


def _fails(
    tmp_path: Path, text: str, *needles: str, error: type[Exception] = EvomergeError, **kwargs: object
) -> None:
    config = write_config(tmp_path, text)
    out = tmp_path / "out"
    with pytest.raises(error) as caught:
        merge(config, out, **kwargs)  # type: ignore[arg-type]
    for needle in needles:
        assert needle in str(caught.value), str(caught.value)
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith((".out", "out"))]  # no temp dir either


def test_missing_model_dir(tmp_path: Path, fam: dict[str, Path]) -> None:
    missing = tmp_path / "no_such_model"
    _fails(tmp_path, _ties(fam, missing), str(missing), "does not exist")


def test_tensor_missing_from_one_source(tmp_path: Path, fam: dict[str, Path]) -> None:
    broken = _variant(fam["ft1"], tmp_path / "broken", lambda s: s.pop("model.layers.2.mlp.up_proj.weight"))
    _fails(tmp_path, _ties(fam, broken), "model.layers.2.mlp.up_proj.weight", str(broken))


def test_shape_mismatch_between_sources(tmp_path: Path, fam: dict[str, Path]) -> None:
    def grow_vocab(state: dict[str, torch.Tensor]) -> None:
        state["model.embed_tokens.weight"] = torch.zeros(128, 32)

    other = _variant(fam["ft1"], tmp_path / "vocab128", grow_vocab)
    _fails(tmp_path, _ties(fam, other), "model.embed_tokens.weight", "[96, 32]", "[128, 32]", str(other))


def test_unknown_method(tmp_path: Path, fam: dict[str, Path]) -> None:
    _fails(
        tmp_path, f"merge_method: tiez\nmodels: [{{model: {fam['ft0']}}}]\n", "unknown method 'tiez'", "ties"
    )


def test_unknown_parameter(tmp_path: Path, fam: dict[str, Path]) -> None:
    _fails(tmp_path, _ties(fam, fam["ft1"], "parameters: {densty: 0.5}\n"), "parameters.densty", "density")


@pytest.mark.parametrize("density", ["0", "1.5", "-0.1"])
def test_density_outside_the_unit_interval(tmp_path: Path, fam: dict[str, Path], density: str) -> None:
    _fails(
        tmp_path,
        _ties(fam, fam["ft1"], f"parameters: {{density: {density}}}\n"),
        "parameters.density",
        "(0, 1]",
    )


def test_slerp_with_three_models(tmp_path: Path, fam: dict[str, Path]) -> None:
    text = (
        f"merge_method: slerp\nbase_model: {fam['base']}\nparameters: {{t: 0.5}}\n"
        f"models: [{{model: {fam['base']}}}, {{model: {fam['ft0']}}}, {{model: {fam['ft1']}}}]\n"
    )
    _fails(tmp_path, text, "slerp", "exactly 1 model(s) besides the base; got 2")


def test_gradient_list_where_none_is_taken(tmp_path: Path, fam: dict[str, Path]) -> None:
    _fails(
        tmp_path,
        _ties(fam, fam["ft1"], "parameters: {normalize: [true, false]}\n"),
        "parameters.normalize",
        "gradient",
    )


def test_malformed_yaml(tmp_path: Path, fam: dict[str, Path]) -> None:
    _fails(tmp_path, "merge_method: ties\nmodels: [{model: a\n", "merge.yaml", "malformed YAML at line")


def test_nan_in_a_source_tensor(tmp_path: Path, fam: dict[str, Path]) -> None:
    def poison(state: dict[str, torch.Tensor]) -> None:
        state["model.layers.1.self_attn.k_proj.weight"][3, 4] = float("nan")

    other = _variant(fam["ft1"], tmp_path / "nan", poison)
    _fails(tmp_path, _ties(fam, other), "model.layers.1.self_attn.k_proj.weight", str(other), "NaN")


def test_existing_out_dir_is_refused_unless_force(tmp_path: Path, fam: dict[str, Path]) -> None:
    config = write_config(tmp_path, _ties(fam, fam["ft1"]))
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match="--force"):
        merge(config, out)
    assert (out / "keep.txt").read_text() == "mine"
    merge(config, out, force=True)
    assert (out / "model.safetensors").is_file() and not (out / "keep.txt").exists()


def test_pickle_checkpoint_needs_allow_pickle(tmp_path: Path, fam: dict[str, Path]) -> None:
    pickled = tmp_path / "pickled"
    shutil.copytree(fam["ft1"], pickled)
    torch.save(load_file(pickled / "model.safetensors"), pickled / "pytorch_model.bin")
    (pickled / "model.safetensors").unlink()
    _fails(tmp_path, _ties(fam, pickled), "pytorch_model.bin", "--allow-pickle", error=UnsafeCheckpointError)
    out = merge(write_config(tmp_path, _ties(fam, pickled), "ok.yaml"), tmp_path / "ok", allow_pickle=True)
    assert (out / "model.safetensors").is_file()


def test_unknown_tokenizer_source(tmp_path: Path, fam: dict[str, Path]) -> None:
    _fails(  # the family's models have no tokenizer at all
        tmp_path,
        _ties(fam, fam["ft1"], "tokenizer_source: union\n"),
        str(fam["base"]),
        "cannot be loaded",
        "tokenizer_source: base",
    )
    _fails(
        tmp_path, _ties(fam, fam["ft1"], f"tokenizer_source: {tmp_path / 'nowhere'}\n"), "tokenizer_source"
    )
