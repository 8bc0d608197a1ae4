"""Data-aware merges end to end: the calibration block, statistics gathered once and cached, bad input."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from evomerge.errors import ConfigError
from evomerge.merge import calibration as calibration_module
from evomerge.merge.calibration import Calibration, gather, read_texts, statistics_file
from evomerge.merge.config import MergeConfig
from evomerge.merge.engine import merge_into, merge_to_dir
from evomerge.merge.methods.regmean import regmean
from evomerge.merge.sources import SourceSet
from evomerge.zoo.random_models import FamilySpec, build_family
from evomerge.zoo.tokenizer import build_tokenizer, save_tokenizer


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny Llama base + 2 fine-tunes, each with the zoo's character tokenizer (the forward pass needs one)."""
    root = tmp_path_factory.mktemp("data_aware")
    paths = build_family(root / "family", FamilySpec(n_finetunes=2, delta_scale=0.05))
    tokenizer = build_tokenizer()
    for path in paths.values():
        save_tokenizer(tokenizer, path)
    return paths


@pytest.fixture(scope="module")
def prompts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("calibration") / "prompts.jsonl"
    lines = [{"prompt": f"what is {i} plus {i + 3}? ", "answer": str(2 * i + 3)} for i in range(12)]
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    return path


def _config(method: str, models: dict[str, Path], calibration: dict[str, Any] | None) -> dict[str, Any]:
    data: dict[str, Any] = {
        "merge_method": method,
        "models": [{"model": str(models["ft0"])}, {"model": str(models["ft1"])}],
        "dtype": "float32",
    }
    if calibration is not None:
        data["calibration"] = calibration
    return data


# ---- statistics ---------------------------------------------------------------------------------


def test_gram_of_lm_head_is_the_final_hidden_states(models: dict[str, Path], prompts: Path) -> None:
    """The hook sees what the layer sees: lm_head's input is the last (normed) hidden state."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    texts = read_texts(prompts, 4)
    grams, scale = gather(models["ft0"], texts, "gram")
    model = AutoModelForCausalLM.from_pretrained(str(models["ft0"]))
    tokenizer = AutoTokenizer.from_pretrained(str(models["ft0"]))
    states = []
    with torch.no_grad():
        for text in texts:
            ids = tokenizer(text, return_tensors="pt")["input_ids"]
            states.append(model(input_ids=ids, output_hidden_states=True).hidden_states[-1][0])
    hidden = torch.cat(states).double()  # (tokens, hidden)
    torch.testing.assert_close(grams["lm_head.weight"], (hidden.T @ hidden / hidden.shape[0]).float())
    assert scale == 1.0
    assert "model.layers.0.mlp.down_proj.weight" in grams and "model.norm.weight" not in grams


def test_fisher_covers_every_parameter_and_is_deterministic(models: dict[str, Path], prompts: Path) -> None:
    texts = read_texts(prompts, 3)
    first, scale = gather(models["ft1"], texts, "fisher")
    again, _ = gather(models["ft1"], texts, "fisher")
    assert set(first) == set(load_file(str(models["ft1"] / "model.safetensors")))
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert all(bool((f >= 0).all()) for f in first.values()) and scale > 0


def test_statistics_are_gathered_once_and_keyed_by_the_data(
    models: dict[str, Path], prompts: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calibration = Calibration(task=str(prompts), limit=5, cache=str(tmp_path / "cache"))
    path = statistics_file(models["ft0"], calibration, str(models["ft0"]), "gram")
    with safe_open(str(path), framework="pt") as handle:
        assert handle.metadata()["kind"] == "gram"

    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError("statistics were gathered again although the cache holds them")

    monkeypatch.setattr(calibration_module, "gather", fail)
    monkeypatch.setattr(calibration_module, "_KNOWN", {})  # a new process: only the disk cache is left
    assert statistics_file(models["ft0"], calibration, str(models["ft0"]), "gram") == path
    other = Calibration(task=str(prompts), limit=6, cache=str(tmp_path / "cache"))
    with pytest.raises(AssertionError, match="gathered again"):  # other data: another key
        statistics_file(models["ft0"], other, str(models["ft0"]), "gram")


# ---- merges -------------------------------------------------------------------------------------


def test_regmean_merge_equals_the_kernel_on_the_cached_grams(
    models: dict[str, Path], prompts: Path, tmp_path: Path
) -> None:
    calibration = {"task": str(prompts), "limit": 6, "cache": str(tmp_path / "cache")}
    config = MergeConfig.from_dict(_config("regmean", models, calibration) | {"parameters": {"alpha": 0.7}})
    merge_to_dir(config, tmp_path / "out")
    merged = load_file(str(tmp_path / "out" / "model.safetensors"))
    parsed = Calibration(**calibration)
    name = "model.layers.1.self_attn.o_proj.weight"
    grams, weights = [], []
    for key in ("ft0", "ft1"):
        with safe_open(str(statistics_file(models[key], parsed, str(models[key]), "gram")), "pt") as handle:
            grams.append(handle.get_tensor(name))
        weights.append(load_file(str(models[key] / "model.safetensors"))[name])
    torch.testing.assert_close(merged[name], regmean(weights, alpha=0.7, statistics=grams))
    mean = (weights[0] + weights[1]) / 2
    assert not torch.allclose(merged[name], mean, atol=1e-4)  # the Gram matrices did something
    norm = "model.layers.1.input_layernorm.weight"
    sources = [load_file(str(models[k] / "model.safetensors"))[norm] for k in ("ft0", "ft1")]
    torch.testing.assert_close(merged[norm], (sources[0] + sources[1]) / 2)  # no Gram: the mean


@pytest.mark.parametrize("method", ["regmean", "regmean_plusplus", "fisher"])
def test_merge_into_matches_merge_to_dir(
    method: str, models: dict[str, Path], prompts: Path, tmp_path: Path
) -> None:
    from transformers import AutoModelForCausalLM

    calibration = {"models": {str(models["ft0"]): str(prompts), str(models["ft1"]): str(prompts)}, "limit": 4}
    calibration["cache"] = str(tmp_path / "cache")
    config = MergeConfig.from_dict(_config(method, models, calibration))
    merge_to_dir(config, tmp_path / "out")
    live = AutoModelForCausalLM.from_pretrained(str(models["base"]))
    with SourceSet.load(config) as sources:
        merge_into(live, config, sources)
    written = load_file(str(tmp_path / "out" / "model.safetensors"))
    for name, tensor in live.state_dict().items():
        torch.testing.assert_close(tensor, written[name], msg=name)


def test_tsv_and_iso_c_need_no_calibration(models: dict[str, Path], tmp_path: Path) -> None:
    for method in ("tsv", "iso_c"):
        data = _config(method, models, None) | {"base_model": str(models["base"])}
        merge_to_dir(MergeConfig.from_dict(data), tmp_path / method)
        assert (tmp_path / method / "model.safetensors").is_file()


# ---- bad input: refused while the config is read, before any model loads ----------------------------


def test_data_aware_method_without_calibration(models: dict[str, Path]) -> None:
    with pytest.raises(
        ConfigError, match="'regmean' is data-aware: it needs calibration data; add `calibration:"
    ):
        MergeConfig.from_dict(_config("regmean", models, None))


def test_missing_calibration_file(models: dict[str, Path], tmp_path: Path) -> None:
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(ConfigError, match=f"calibration.task: {missing} does not exist; give a JSONL file"):
        MergeConfig.from_dict(_config("fisher", models, {"task": str(missing)}))


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("not json\n", "line 1: not JSON"),
        ("[1, 2]\n", "line 1: expected a JSON object, got list"),
        ('{"prompt": "a"}\n{"features": [1, 2], "label": 0}\n', "line 2: no 'prompt' \\(or 'text'\\) string"),
        ("\n\n", "holds no example"),
    ],
)
def test_calibration_file_of_the_wrong_kind(
    models: dict[str, Path], tmp_path: Path, content: str, expected: str
) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(ConfigError, match=expected):
        MergeConfig.from_dict(_config("regmean", models, {"task": str(path)}))


def test_calibration_dir_instead_of_file(models: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="is a directory; give a JSONL file"):
        MergeConfig.from_dict(_config("regmean", models, {"task": str(tmp_path)}))


def test_calibration_for_a_method_that_reads_none(models: dict[str, Path], prompts: Path) -> None:
    with pytest.raises(
        ConfigError, match=r"'linear' reads no calibration data.*remove the calibration block"
    ):
        MergeConfig.from_dict(
            _config("linear", models, {"task": str(prompts)}) | {"parameters": {"weight": 1.0}}
        )


def test_calibration_names_an_unknown_model(models: dict[str, Path], prompts: Path) -> None:
    calibration = {"task": str(prompts), "models": {"elsewhere/model": str(prompts)}}
    with pytest.raises(
        ConfigError, match=r"calibration\.models: 'elsewhere/model' is not a model this merge reads"
    ):
        MergeConfig.from_dict(_config("regmean", models, calibration))


def test_a_model_without_a_calibration_file(models: dict[str, Path], prompts: Path) -> None:
    calibration = {"models": {str(models["ft0"]): str(prompts)}}
    with pytest.raises(ConfigError, match=r"no file for model .*ft1"):
        MergeConfig.from_dict(_config("regmean", models, calibration))


def test_a_model_without_a_tokenizer(models: dict[str, Path], prompts: Path, tmp_path: Path) -> None:
    import shutil

    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(models["ft1"] / name, bare / name)
    data = _config("regmean", models, {"task": str(prompts)})
    data["models"][1]["model"] = str(bare)
    with pytest.raises(ConfigError, match=r"bare has no tokenizer files .*copy the model's tokenizer"):
        MergeConfig.from_dict(data)


def test_calibration_block_is_strict(models: dict[str, Path], prompts: Path) -> None:
    with pytest.raises(ConfigError, match=r"calibration\.limit"):
        MergeConfig.from_dict(_config("regmean", models, {"task": str(prompts), "limit": 0}))
    with pytest.raises(ConfigError, match=r"calibration\.split"):
        MergeConfig.from_dict(_config("regmean", models, {"task": str(prompts), "split": "dev"}))


def test_calibration_round_trips_through_yaml(models: dict[str, Path], prompts: Path) -> None:
    config = MergeConfig.from_dict(_config("regmean", models, {"task": str(prompts), "limit": 8}))
    again = MergeConfig.from_yaml(config.to_yaml())
    assert again.calibration == config.calibration and again.calibration is not None
    assert again.calibration.limit == 8
