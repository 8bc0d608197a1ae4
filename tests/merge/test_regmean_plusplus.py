"""RegMean's embedding rule (token counts) and RegMean++ (sequential Gram matrices), on hand-made cases."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from evomerge.errors import ConfigError
from evomerge.merge.calibration import gather, read_texts
from evomerge.merge.config import MergeConfig
from evomerge.merge.engine import merge_to_dir
from evomerge.merge.methods.regmean import regmean, row_weighted_mean
from evomerge.merge.registry import get_method
from evomerge.merge.sequential import stage_of

EMBED = "model.embed_tokens.weight"


# ---- the embedding: a per-row mean weighted by token counts ------------------------------------------


def test_embedding_rows_follow_each_models_token_counts() -> None:
    first, second = torch.arange(12.0).reshape(4, 3), -torch.arange(12.0).reshape(4, 3)
    counts = [torch.tensor([0.5, 0.5, 0.0, 0.0]), torch.tensor([0.0, 0.25, 0.75, 0.0])]
    merged = regmean([first, second], weight=[1.0, 3.0], statistics=counts)
    torch.testing.assert_close(merged[0], first[0])  # only the first model's data used token 0
    torch.testing.assert_close(merged[2], second[2])  # only the second's used token 2
    # token 1: 1 x 0.5 (first) against 3 x 0.25 (second)
    torch.testing.assert_close(merged[1], (0.5 * first[1] + 0.75 * second[1]) / 1.25)
    torch.testing.assert_close(merged[3], (first[3] + 3 * second[3]) / 4)  # nobody's: the weighted mean
    plain = regmean([first, second], weight=[1.0, 3.0], statistics=counts, token_counts=False)
    torch.testing.assert_close(plain, (first + 3 * second) / 4)


def test_embedding_rule_is_regmean_on_one_hot_inputs() -> None:
    """The row rule is RegMean's closed form with the diagonal Gram matrix of one-hot inputs."""
    generator = torch.Generator().manual_seed(0)
    tables = [torch.randn(5, 3, generator=generator) for _ in range(3)]
    counts = [torch.rand(5, generator=generator) for _ in range(3)]
    weights = [1.0, 0.5, 2.0]
    # the embedding as a linear layer y = E^T x over a one-hot x: weight E^T (3, 5), Gram diag(c)
    as_linear = regmean(
        [t.T for t in tables], weight=weights, alpha=0.3, statistics=[torch.diag(c) for c in counts]
    )
    torch.testing.assert_close(row_weighted_mean(tables, counts, weights), as_linear.T, atol=1e-5, rtol=1e-4)


def test_token_counts_of_another_vocabulary_are_refused() -> None:
    with pytest.raises(ConfigError, match="token counts have shape"):
        regmean([torch.ones(4, 2), torch.ones(4, 2)], statistics=[torch.ones(4), torch.ones(5)])


def _merge(
    method: str,
    one_layer_family: dict[str, Path],
    calibration_prompts: dict[str, Path],
    out: Path,
    **extra: Any,
) -> dict:
    data: dict[str, Any] = {
        "merge_method": method,
        "models": [{"model": str(one_layer_family["ft0"])}, {"model": str(one_layer_family["ft1"])}],
        "dtype": "float32",
        "parameters": {"alpha": 0.8},
        "calibration": {
            "models": {str(one_layer_family[k]): str(calibration_prompts[k]) for k in ("ft0", "ft1")},
            "limit": 6,
            "cache": str(out.parent / "cache"),
        },
        **extra,
    }
    merge_to_dir(MergeConfig.from_dict(data), out)
    return load_file(str(out / "model.safetensors"))


# ---- statistics -----------------------------------------------------------------------------------------


def test_gram_statistics_hold_each_token_share(
    one_layer_family: dict[str, Path], calibration_prompts: dict[str, Path]
) -> None:
    from transformers import AutoTokenizer

    texts = read_texts(calibration_prompts["ft0"], 5)
    grams, _ = gather(one_layer_family["ft0"], texts, "gram")
    tokenizer = AutoTokenizer.from_pretrained(str(one_layer_family["ft0"]))
    ids = torch.cat([tokenizer(text, return_tensors="pt")["input_ids"][0] for text in texts])
    vocab = grams[EMBED].shape[0]
    torch.testing.assert_close(grams[EMBED], torch.bincount(ids, minlength=vocab).float() / ids.numel())
    assert (
        grams[EMBED].dim() == 1
        and vocab == load_file(str(one_layer_family["ft0"] / "model.safetensors"))[EMBED].shape[0]
    )


# ---- RegMean++ ---------------------------------------------------------------------------------------------


def test_first_layer_equals_regmean_when_the_inputs_agree(
    one_layer_family: dict[str, Path], calibration_prompts: dict[str, Path], tmp_path: Path
) -> None:
    """Same embedding everywhere: layer 0 sees the same inputs in RegMean and RegMean++, so it merges the
    same; lm_head (after the merged layer) does not."""
    plain = _merge("regmean", one_layer_family, calibration_prompts, tmp_path / "plain")
    plus = _merge("regmean_plusplus", one_layer_family, calibration_prompts, tmp_path / "plus")
    assert plain.keys() == plus.keys()
    for name in plain:
        if stage_of(name, 1) <= 0:
            torch.testing.assert_close(plus[name], plain[name], msg=name)
    assert not torch.allclose(plus["lm_head.weight"], plain["lm_head.weight"], atol=1e-5)


def test_lm_head_is_fitted_on_the_merged_hidden_states(
    one_layer_family: dict[str, Path], calibration_prompts: dict[str, Path], tmp_path: Path
) -> None:
    """The reference, computed by hand: model i's final norm over the merged model's last hidden states."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    plus = _merge("regmean_plusplus", one_layer_family, calibration_prompts, tmp_path / "plus")
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "plus")).eval()
    grams, heads = [], []
    for key in ("ft0", "ft1"):
        own = AutoModelForCausalLM.from_pretrained(str(one_layer_family[key])).eval()
        tokenizer = AutoTokenizer.from_pretrained(str(one_layer_family[key]))
        states: list[torch.Tensor] = []
        handle = merged.model.norm.register_forward_hook(lambda m, i, o, kept=states: kept.append(i[0][0]))
        with torch.no_grad():
            for text in read_texts(calibration_prompts[key], 6):
                merged(input_ids=tokenizer(text, return_tensors="pt")["input_ids"])
            handle.remove()
            x = own.model.norm(torch.cat(states)).double()  # (tokens, hidden)
        grams.append((x.T @ x / x.shape[0]).float())
        heads.append(own.lm_head.weight.detach())
    expected = regmean(heads, alpha=0.8, statistics=grams)
    torch.testing.assert_close(plus["lm_head.weight"], expected, atol=1e-5, rtol=1e-4)


def test_regmean_plusplus_is_registered_with_regmeans_parameters() -> None:
    method = get_method("regmean++")
    assert method.name == "regmean_plusplus" and method.sequential and method.statistics == "gram"
    assert [p.name for p in method.params] == [*(p.name for p in get_method("regmean").params), "own_targets"]
    assert not get_method("regmean").sequential


def test_regmean_plusplus_refuses_slices(
    one_layer_family: dict[str, Path], calibration_prompts: dict[str, Path]
) -> None:
    data = {
        "merge_method": "regmean_plusplus",
        "slices": [
            {"sources": [{"model": str(one_layer_family[k]), "layer_range": [0, 1]} for k in ("ft0", "ft1")]}
        ],
        "calibration": {"task": str(calibration_prompts["ft0"])},
    }
    with pytest.raises(ConfigError, match="slices: merge_method 'regmean_plusplus'"):
        MergeConfig.from_dict(data)


def test_regmean_plusplus_needs_calibration(one_layer_family: dict[str, Path]) -> None:
    data = {"merge_method": "regmean_plusplus", "models": [{"model": str(one_layer_family["ft0"])}]}
    with pytest.raises(ConfigError, match="needs calibration data"):
        MergeConfig.from_dict(data)


def test_own_targets_pair_solves_the_least_squares_to_each_models_own_outputs() -> None:
    """(G, C) pairs: min_W sum_i ||X~_i W^T - X_i W_i^T||^2, the merged inputs X~_i against the model's own
    X_i (alpha 1: exact), checked against torch.linalg.lstsq on the stacked system."""
    generator = torch.Generator().manual_seed(3)
    merged_inputs = [torch.randn(40, 6, generator=generator, dtype=torch.float64) for _ in range(2)]
    own_inputs = [
        x + 0.3 * torch.randn(40, 6, generator=generator, dtype=torch.float64) for x in merged_inputs
    ]
    weights = [torch.randn(4, 6, generator=generator, dtype=torch.float64) for _ in range(2)]
    pairs = [
        torch.stack([xm.T @ xm / 40, xm.T @ xo / 40])
        for xm, xo in zip(merged_inputs, own_inputs, strict=True)
    ]
    merged = regmean(weights, alpha=1.0, statistics=pairs)
    a = torch.cat(merged_inputs)
    b = torch.cat([xo @ w.T for xo, w in zip(own_inputs, weights, strict=True)])
    expected = torch.linalg.lstsq(a, b).solution.T
    torch.testing.assert_close(merged, expected, atol=1e-5, rtol=1e-5)
    same = [torch.stack([p[0], p[0]]) for p in pairs]  # C = G: RegMean itself
    torch.testing.assert_close(
        regmean(weights, statistics=same), regmean(weights, statistics=[p[0] for p in pairs])
    )


def test_own_targets_merge_of_one_model_is_regmeans(
    one_layer_family: dict[str, Path], calibration_prompts: dict[str, Path], tmp_path: Path
) -> None:
    """One model: the merged stages are the model's own, X~ = X, C = G, and the merge is RegMean's."""
    merged = {}
    for method, extra in (("regmean_plusplus", {"own_targets": True}), ("regmean", {})):
        data: dict[str, Any] = {
            "merge_method": method,
            "models": [{"model": str(one_layer_family["ft0"])}],
            "dtype": "float32",
            "parameters": {"alpha": 0.9, **extra},
            "calibration": {
                "task": str(calibration_prompts["ft0"]),
                "limit": 8,
                "cache": str(tmp_path / "cache"),
            },
        }
        merge_to_dir(MergeConfig.from_dict(data), tmp_path / method)
        merged[method] = load_file(str(tmp_path / method / "model.safetensors"))
    for name, tensor in merged["regmean"].items():
        torch.testing.assert_close(merged["regmean_plusplus"][name], tensor, atol=1e-4, rtol=1e-3, msg=name)


def test_own_targets_second_merge_reuses_the_sources_inputs_and_agrees(
    one_layer_family: dict[str, Path], calibration_prompts: dict[str, Path], tmp_path: Path
) -> None:
    from evomerge.merge import sequential

    sequential._ALONE.clear()
    first = _merge(
        "regmean_plusplus",
        one_layer_family,
        calibration_prompts,
        tmp_path / "a",
        parameters={"alpha": 0.8, "own_targets": True},
    )
    kept = len(sequential._ALONE)
    second = _merge(
        "regmean_plusplus",
        one_layer_family,
        calibration_prompts,
        tmp_path / "b",
        parameters={"alpha": 0.8, "own_targets": True},
    )
    assert kept > 0 and len(sequential._ALONE) == kept  # gathered once, read the second time
    plain = _merge("regmean_plusplus", one_layer_family, calibration_prompts, tmp_path / "c")
    for name, tensor in first.items():
        torch.testing.assert_close(second[name], tensor, msg=name)
    assert not torch.allclose(first["lm_head.weight"], plain["lm_head.weight"], atol=1e-5)


def test_merges_in_two_threads_give_what_each_gives_alone(
    one_layer_family: dict[str, Path], calibration_prompts: dict[str, Path], tmp_path: Path
) -> None:
    # the cached sources carry a pass's hooks: a second pass at the same time must not record into them
    from concurrent.futures import ThreadPoolExecutor

    from evomerge.merge import sequential

    settings = [{"alpha": 0.8, "own_targets": True}, {"alpha": 0.3}] * 3
    alone = [
        _merge(
            "regmean_plusplus", one_layer_family, calibration_prompts, tmp_path / f"alone{i}", parameters=p
        )
        for i, p in enumerate(settings)
    ]
    sequential._ALONE.clear()  # every pass gathers the sources' own inputs: the longest overlap
    with ThreadPoolExecutor(len(settings)) as pool:
        together = list(
            pool.map(
                lambda i: _merge(
                    "regmean_plusplus",
                    one_layer_family,
                    calibration_prompts,
                    tmp_path / f"together{i}",
                    parameters=settings[i],
                ),
                range(len(settings)),
            )
        )
    for first, second in zip(alone, together, strict=True):
        for name, tensor in first.items():
            torch.testing.assert_close(second[name], tensor, msg=name)
