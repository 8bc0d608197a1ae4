"""merge_to_dir: the output dir, sharding, threads, seeds, random masks, and transformers loading the result."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from evomerge.merge.api import merge
from evomerge.merge.config import MergeConfig
from evomerge.merge.engine import merge_to_dir, tensor_seed
from evomerge.zoo.random_models import FamilySpec

from .engine_helpers import config_dict, family, load_state, write_config


def _linear(fam: dict[str, Path], extra: str = "") -> str:
    return (
        f"merge_method: linear\nmodels:\n  - {{model: {fam['ft0']}, parameters: {{weight: 0.25}}}}\n"
        f"  - {{model: {fam['ft1']}, parameters: {{weight: 0.75}}}}\n{extra}"
    )


def _one_model(fam: dict[str, Path], method: str, params: str) -> str:
    """A random method on one fine-tune, weight 1, no normalize: out - base is the sparsified delta."""
    return (
        f"merge_method: {method}\nbase_model: {fam['base']}\n"
        f"models: [{{model: {fam['ft0']}, parameters: {{weight: 1.0, {params}}}}}]\n"
        "parameters: {normalize: false}\n"
    )


def test_output_dir_is_a_complete_model(tmp_path: Path, fam: dict[str, Path]) -> None:
    donor = tmp_path / "donor"
    shutil.copytree(fam["base"], donor)
    (donor / "tokenizer.json").write_text('{"fake": true}')
    (donor / "tokenizer_config.json").write_text("{}")
    config = write_config(tmp_path, _linear(fam, f"tokenizer_source: {donor}\nout_dtype: bfloat16\n"))
    out = merge(config, tmp_path / "out")
    names = {path.name for path in out.iterdir()}
    assert {
        "model.safetensors",
        "config.json",
        "README.md",
        "tokenizer.json",
        "tokenizer_config.json",
    } <= names
    assert "generation_config.json" in names
    assert config_dict(out)["dtype"] == "bfloat16"
    assert {t.dtype for t in load_state(out).values()} == {torch.bfloat16}
    card = (out / "README.md").read_text()
    assert "linear" in card and str(fam["ft1"]) in card
    assert (out / "mergekit_config.yml").read_text() == config.read_text()


def test_linear_values(tmp_path: Path, fam: dict[str, Path]) -> None:
    out = merge(write_config(tmp_path, _linear(fam)), tmp_path / "out")
    merged, a, b = load_state(out), load_state(fam["ft0"]), load_state(fam["ft1"])
    for name, tensor in merged.items():
        torch.testing.assert_close(tensor, 0.25 * a[name] + 0.75 * b[name], rtol=1e-6, atol=1e-7)


def test_sharded_output_equals_single_file(tmp_path: Path, fam: dict[str, Path]) -> None:
    config = write_config(tmp_path, _linear(fam))
    single = merge(config, tmp_path / "single")
    sharded = merge(config, tmp_path / "sharded", max_shard_bytes=20_000)
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    one, many = load_state(single), load_state(sharded)
    assert one.keys() == many.keys() and all(torch.equal(one[k], many[k]) for k in one)


def test_thread_count_does_not_change_the_result(tmp_path: Path, fam: dict[str, Path]) -> None:
    config = MergeConfig.from_yaml(_one_model(fam, "dare_ties", "density: 0.5"))
    first = merge_to_dir(config, tmp_path / "one", threads=1, random_seed=7).out_dir
    second = merge_to_dir(config, tmp_path / "three", threads=3, random_seed=7).out_dir
    a, b = load_state(first), load_state(second)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_seed_reproduces_bit_for_bit_and_another_seed_differs(tmp_path: Path, fam: dict[str, Path]) -> None:
    config = MergeConfig.from_yaml(_one_model(fam, "dare_linear", "density: 0.3"))
    runs = [
        load_state(merge_to_dir(config, tmp_path / f"r{i}", random_seed=s).out_dir)
        for i, s in enumerate((1, 1, 2))
    ]
    name = "model.layers.0.mlp.up_proj.weight"
    assert torch.equal(runs[0][name], runs[1][name])
    assert not torch.equal(runs[0][name], runs[2][name])


def test_unseeded_random_merge_records_its_seed(tmp_path: Path, fam: dict[str, Path]) -> None:
    config = MergeConfig.from_yaml(_one_model(fam, "dare_ties", "density: 0.5"))
    result = merge_to_dir(config, tmp_path / "out")
    assert (
        result.seed is not None
        and f"--random-seed {result.seed}" in (result.out_dir / "README.md").read_text()
    )


@pytest.mark.parametrize(
    ("method", "params", "density"),
    [
        ("dare_ties", "density: 0.3", 0.3),
        ("dare_linear", "density: 0.7", 0.7),
        ("della", "density: 0.4, epsilon: 0.1", 0.4),
    ],
)
def test_random_masks_keep_density_and_rescale_the_l1_norm(
    tmp_path: Path, fam: dict[str, Path], method: str, params: str, density: float
) -> None:
    config = MergeConfig.from_yaml(_one_model(fam, method, params))
    out = merge_to_dir(config, tmp_path / "out", random_seed=3).out_dir
    merged, base, tuned = load_state(out), load_state(fam["base"]), load_state(fam["ft0"])
    name = "model.layers.1.mlp.down_proj.weight"  # (32, 64): 2048 entries
    kept_delta, delta = merged[name] - base[name], tuned[name] - base[name]
    kept = float((kept_delta != 0).float().mean())
    assert abs(kept - density) < 0.05, kept
    # mergekit's DARE/DELLA rescale: the kept delta is scaled so its L1 norm equals the full delta's.
    assert float(kept_delta.abs().sum()) == pytest.approx(float(delta.abs().sum()), rel=1e-4)
    kept_entries = kept_delta != 0
    ratio = kept_delta[kept_entries] / delta[kept_entries]
    assert float(ratio.std()) < 1e-3 * float(ratio.mean())  # one common factor (about 1/density)


def test_tensor_seed_depends_on_name_and_seed_only() -> None:
    assert tensor_seed(1, "a") == tensor_seed(1, "a")
    assert len({tensor_seed(1, "a"), tensor_seed(2, "a"), tensor_seed(1, "b")}) == 3


def test_passthrough_frankenmerge_loads_in_transformers(tmp_path: Path, fam: dict[str, Path]) -> None:
    import transformers

    text = (
        "merge_method: passthrough\nslices:\n"
        f"  - sources: [{{model: {fam['ft0']}, layer_range: [0, 3]}}]\n"
        f"  - sources: [{{model: {fam['ft1']}, layer_range: [1, 4]}}]\n"
    )
    out = merge(write_config(tmp_path, text), tmp_path / "out")
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_hidden_layers == 6
    state, ft1 = load_state(out), load_state(fam["ft1"])
    assert torch.equal(
        state["model.layers.5.self_attn.o_proj.weight"], ft1["model.layers.3.self_attn.o_proj.weight"]
    )


def test_transformers_logits_equal_the_directly_merged_state_dict(
    tmp_path: Path, fam: dict[str, Path]
) -> None:
    """The output dir, loaded by transformers, computes what the merged tensors (built here by hand) compute."""
    import transformers

    out = merge(write_config(tmp_path, _linear(fam)), tmp_path / "out")
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    direct = transformers.AutoModelForCausalLM.from_pretrained(fam["base"]).eval()
    a, b = load_state(fam["ft0"]), load_state(fam["ft1"])
    direct.load_state_dict({name: (0.25 * a[name] + 0.75 * b[name]) for name in a}, strict=True)
    tokens = torch.arange(12).reshape(2, 6) % 96  # (B, T)
    with torch.no_grad():
        torch.testing.assert_close(loaded(tokens).logits, direct(tokens).logits, rtol=1e-5, atol=1e-6)


def test_top_level_api_is_callable(tmp_path: Path, fam: dict[str, Path]) -> None:
    import evomerge
    import evomerge.merge.engine  # as in any program that used the engine before

    out = evomerge.merge(write_config(tmp_path, _linear(fam)), tmp_path / "out")  # type: ignore[operator]
    assert (out / "model.safetensors").is_file()


def test_stable_tie_break_keeps_as_many_and_differs_only_among_ties(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    spec = FamilySpec(n_finetunes=3, dtype=torch.bfloat16, max_shard_size="20KB", seed=1)
    bf16 = family(tmp_path_factory.getbasetemp() / "families", "bf16_sharded", spec)
    config = MergeConfig.from_yaml(_one_model(bf16, "ties", "density: 0.5"))
    exact = load_state(merge_to_dir(config, tmp_path / "exact").out_dir)
    stable = load_state(merge_to_dir(config, tmp_path / "stable", tie_break="stable").out_dir)
    base, tuned = load_state(bf16["base"]), load_state(bf16["ft0"])
    name = "model.layers.2.mlp.gate_proj.weight"
    delta = (tuned[name] - base[name]).abs()
    kept_exact, kept_stable = exact[name] != base[name], stable[name] != base[name]
    assert int(kept_exact.sum()) == int(kept_stable.sum())
    differ = kept_exact != kept_stable
    if bool(differ.any()):  # only entries of the threshold magnitude may be swapped
        assert delta[differ].unique().numel() == 1


def test_streaming_holds_the_inputs_of_at_most_threads_tensors(fam: dict[str, Path]) -> None:
    """Peak memory is bounded by the tensors in flight, not by the model: count live input tensors."""
    import threading
    import weakref

    from evomerge.merge.engine import stream_tensors
    from evomerge.merge.plan import build_plan
    from evomerge.merge.sources import SourceSet

    config = MergeConfig.from_yaml(
        f"merge_method: ties\nbase_model: {fam['base']}\nparameters: {{weight: 0.5, density: 0.5}}\n"
        f"models: [{{model: {fam['ft0']}}}, {{model: {fam['ft1']}}}]\n"
    )
    live, peak, lock = [0], [0], threading.Lock()

    def released() -> None:
        with lock:
            live[0] -= 1

    with SourceSet.open(config) as sources:
        plan = build_plan(config, sources)

        def fetch(model: str, name: str) -> torch.Tensor:
            tensor = SourceSet.read(sources, model, name).clone()
            with lock:
                live[0] += 1
                peak[0] = max(peak[0], live[0])
            weakref.finalize(tensor, released)
            return tensor

        sources.get = fetch  # type: ignore[method-assign]
        names = [name for name, _ in stream_tensors(plan, sources, threads=2)]
    assert len(names) == len(plan.tasks) == len(set(names))
    inputs_per_task = 3  # two fine-tunes and the base
    assert peak[0] <= 2 * inputs_per_task, peak[0]


def test_tie_break_option_reaches_only_kernels_that_declare_it() -> None:
    from evomerge.merge.engine import _extra_params
    from evomerge.merge.registry import get_method

    assert _extra_params(get_method("ties"), "stable") == {"tie_break": "stable"}
    assert _extra_params(get_method("breadcrumbs"), "stable") == {"tie_break": "stable"}
    assert _extra_params(get_method("ties"), "mergekit") == {}
    assert _extra_params(get_method("slerp"), "stable") == {}
