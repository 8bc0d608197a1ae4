"""merge_into: candidates written into one live model in place, equal to the on-disk merge."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from evomerge.merge.config import MergeConfig
from evomerge.merge.engine import LiveModelMismatchError, merge_into, merge_to_dir
from evomerge.merge.plan import build_plan
from evomerge.merge.registry import get_method
from evomerge.merge.sources import NonFiniteTensorError, SourceSet
from evomerge.zoo.random_models import FamilySpec

from .engine_helpers import family, load_state


def _ties(
    fam: dict[str, Path], method: str = "ties", weights: tuple[float, float] = (0.6, 0.4)
) -> MergeConfig:
    return MergeConfig.from_yaml(
        f"merge_method: {method}\nbase_model: {fam['base']}\nmodels:\n"
        f"  - {{model: {fam['ft0']}, parameters: {{weight: [{weights[0]}, 1.0], density: 0.5}}}}\n"
        f"  - {{model: {fam['ft1']}, parameters: {{weight: {weights[1]}, density: 0.7}}}}\n"
    )


def _model(path: Path) -> Any:
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(path).eval()


@pytest.mark.parametrize("method", ["ties", "dare_ties"])
def test_equals_the_merge_on_disk(tmp_path: Path, fam: dict[str, Path], method: str) -> None:
    config = _ties(fam, method)
    on_disk = load_state(merge_to_dir(config, tmp_path / "out", random_seed=5).out_dir)
    model = _model(fam["base"])
    with SourceSet.load(config) as sources:
        merge_into(model, config, sources, seed=5)
    state = model.state_dict()
    for name, tensor in on_disk.items():
        assert torch.equal(state[name], tensor), name


def test_updates_in_place_across_candidates(fam: dict[str, Path]) -> None:
    model = _model(fam["base"])
    pointers = {name: p.data_ptr() for name, p in model.named_parameters()}
    name = "model.layers.2.mlp.up_proj.weight"
    with SourceSet.load(_ties(fam)) as sources:
        merge_into(model, _ties(fam), sources)
        first = model.get_parameter(name).detach().clone()
        merge_into(model, _ties(fam, weights=(0.1, 0.9)), sources)
    assert not torch.equal(first, model.get_parameter(name))
    assert pointers == {n: p.data_ptr() for n, p in model.named_parameters()}


def test_tied_model_stays_tied(tied: dict[str, Path]) -> None:
    config = _ties(tied)
    model = _model(tied["base"])
    with SourceSet.load(config) as sources:
        merge_into(model, config, sources)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    base = load_state(tied["base"])["model.embed_tokens.weight"]
    assert not torch.equal(model.model.embed_tokens.weight, base)


def test_load_keeps_tensors_in_memory_as_float32(fam: dict[str, Path]) -> None:
    config = _ties(fam)
    with SourceSet.load(config, dtype=torch.float64) as sources:
        assert sources.in_memory
        name = "model.norm.weight"
        assert sources.get(str(fam["ft0"]), name).dtype == torch.float64
        delta = sources.task_vector((str(fam["ft0"]), name), (str(fam["base"]), name))
        expected = load_state(fam["ft0"])[name] - load_state(fam["base"])[name]
        torch.testing.assert_close(delta, expected)


def test_model_without_a_merged_tensor_is_refused(fam: dict[str, Path]) -> None:
    config = _ties(fam)
    model = torch.nn.Linear(2, 2)
    with (
        SourceSet.load(config) as sources,
        pytest.raises(LiveModelMismatchError, match=r"model\.embed_tokens\.weight"),
    ):
        merge_into(model, config, sources)


def test_load_rejects_a_nan_source_once(tmp_path: Path, fam: dict[str, Path]) -> None:
    poisoned = tmp_path / "poisoned"
    shutil.copytree(fam["ft1"], poisoned)
    state = load_file(poisoned / "model.safetensors")
    state["model.norm.weight"][0] = float("inf")
    save_file(state, poisoned / "model.safetensors", metadata={"format": "pt"})
    config = _ties({**fam, "ft1": poisoned})
    with pytest.raises(NonFiniteTensorError, match=r"model\.norm\.weight of .*poisoned"):
        SourceSet.load(config)


def test_bf16_sources_merge_in_the_loaded_dtype(tmp_path_factory: pytest.TempPathFactory) -> None:
    spec = FamilySpec(n_finetunes=3, dtype=torch.bfloat16, max_shard_size="20KB", seed=1)
    bf16 = family(tmp_path_factory.getbasetemp() / "families", "bf16_sharded", spec)
    config = _ties(bf16)
    model = _model(bf16["base"]).float()
    with SourceSet.load(config) as sources:
        merge_into(model, config, sources)
        name = "model.layers.1.mlp.up_proj.weight"
        task = next(t for t in build_plan(config, sources).tasks if t.name == name)
        tensors = [sources.get(*ref) for ref in task.inputs]
        expected = get_method("ties").kernel(
            tensors, base=sources.get(*task.base), generator=None, **task.params
        )  # type: ignore[misc]
    assert expected.dtype == torch.float32
    assert torch.equal(model.get_parameter(name), expected)


def test_threads_give_the_same_model(fam: dict[str, Path]) -> None:
    config = _ties(fam, "dare_ties")
    one, two = _model(fam["base"]), _model(fam["base"])
    with SourceSet.load(config) as sources:
        merge_into(one, config, sources, seed=3)
        merge_into(two, config, sources, seed=3, threads=2)
    first, second = one.state_dict(), two.state_dict()
    assert all(torch.equal(first[name], second[name]) for name in first)
