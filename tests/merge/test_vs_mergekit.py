"""evomerge merge == mergekit 0.1.5 on every deterministic method: max abs diff within one ulp of the output dtype.

The matrix: fp32 and bf16 sources, tied and untied embeddings, 2-4 sources, sharded and single-file
inputs, gradient lists and filter lists, slices (passthrough frankenmerges and merged slices). All configs
are written first; mergekit runs them in one subprocess (its `run_merge`, as mergekit-yaml calls it), and
one case also goes through the real `mergekit-yaml` command line.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from evomerge.merge.api import merge
from evomerge.zoo.random_models import FamilySpec

from .engine_helpers import (
    assert_within_one_ulp,
    config_dict,
    family,
    load_state,
    run_mergekit,
    run_mergekit_batch,
    write_config,
)

pytestmark = [pytest.mark.oracle, pytest.mark.slow]

FAMILIES = {
    "fp32": FamilySpec(n_finetunes=3),
    "bf16_sharded": FamilySpec(n_finetunes=3, dtype=torch.bfloat16, max_shard_size="20KB", seed=1),
    "fp32_tied": FamilySpec(n_finetunes=3, tie_word_embeddings=True, seed=2),
    "bf16_tied": FamilySpec(n_finetunes=3, dtype=torch.bfloat16, tie_word_embeddings=True, seed=3),
}

GRADIENT = "[0.1, 0.9, 0.4]"
FILTERED = """
        - filter: self_attn
          value: [0.2, 0.7]
        - filter: mlp
          value: 0.6
        - value: 0.45"""


def _models(*entries: str) -> str:
    return "models:\n" + "\n".join(entries)


def _entry(model: str, params: str = "") -> str:
    return f"  - model: {model}" + (f"\n    parameters:\n{params}" if params else "")


def _weights(n: int, density: str | None = None) -> list[str]:
    """Per-model parameters for ft0..ft{n-1}: a gradient, a filter list, then plain scalars."""
    weights = [
        f"      weight: {GRADIENT}",
        f"      weight:{FILTERED}",
        "      weight: 0.7",
        "      weight: 0.35",
    ]
    extra = f"\n      density: {density}" if density else ""
    return [weights[i] + extra for i in range(n)]


def _task_family(method: str, n: int, density: str | None = "0.6", extra: str = "") -> str:
    entries = [_entry(f"{{ft{i}}}", params) for i, params in enumerate(_weights(n, density))]
    return f"merge_method: {method}\nbase_model: {{base}}\n{_models(*entries)}\n{extra}"


CONFIGS: dict[str, str] = {
    "linear": "merge_method: linear\n"
    + _models(*(_entry(f"{{ft{i}}}", p) for i, p in enumerate(_weights(3))))
    + "\nparameters: {normalize: true}\n",
    "linear_with_base_listed": "merge_method: linear\nbase_model: {base}\n"
    + _models(_entry("{base}", "      weight: 0.5"), _entry("{ft0}", "      weight: [1.0, 0.0]")),
    "task_arithmetic": _task_family("task_arithmetic", 3, None, "parameters: {lambda: 0.8}\n"),
    "ties": _task_family("ties", 3, "[0.3, 0.9]"),
    "ties_4_sources_int8": _task_family(
        "ties", 3, "0.5", "parameters: {int8_mask: true, normalize: false}\n"
    ),
    "ties_cast_dtypes": _task_family("ties", 2, "0.5", "dtype: float32\nout_dtype: bfloat16\n"),
    "breadcrumbs": _task_family("breadcrumbs", 2, "0.8", "parameters: {gamma: 0.05}\n"),
    "breadcrumbs_ties": _task_family("breadcrumbs_ties", 3, "0.7"),
    "sce": "merge_method: sce\nbase_model: {base}\n"
    + _models(_entry("{ft0}"), _entry("{ft1}"), _entry("{ft2}"))
    + "\nparameters: {select_topk: 0.5}\n",
    "slerp": "merge_method: slerp\nbase_model: {base}\n"
    + _models(_entry("{base}"), _entry("{ft0}"))
    + "\nparameters:\n  t:\n    - filter: self_attn\n      value: [0, 0.5, 0.3, 0.7, 1]\n    - filter: mlp\n"
    "      value: [1, 0.5, 0.7, 0.3, 0]\n    - value: 0.5\n",
    "nuslerp": "merge_method: nuslerp\n"
    + _models(_entry("{ft0}", "      weight: [0.3, 0.8]"), _entry("{ft1}", "      weight: 0.5")),
    "nuslerp_base": "merge_method: nuslerp\nbase_model: {base}\n"
    + _models(_entry("{ft0}", "      weight: 0.3"), _entry("{ft1}", "      weight: 0.5"))
    + "\nparameters: {nuslerp_flatten: false, nuslerp_row_wise: true}\n",
    "multislerp": "merge_method: multislerp\nbase_model: {base}\n"
    + _models(
        *(_entry(f"{{ft{i}}}", f"      weight: {w}") for i, w in enumerate(["1.0", "[0.5, 2.0]", "0.7"]))
    ),
    "karcher": "merge_method: karcher\n"
    + _models(_entry("{ft0}"), _entry("{ft1}"), _entry("{ft2}"))
    + "\nparameters: {max_iter: 5}\n",
    "model_stock": "merge_method: model_stock\nbase_model: {base}\n"
    + _models(_entry("{ft0}"), _entry("{ft1}"), _entry("{ft2}")),
    "nearswap": "merge_method: nearswap\nbase_model: {base}\n"
    + _models(_entry("{base}"), _entry("{ft0}"))
    + "\nparameters:\n  t:\n    - filter: mlp\n      value: [0.001, 0.05]\n    - value: 0.02\n",
    "arcee_fusion": "merge_method: arcee_fusion\nbase_model: {base}\n"
    + _models(_entry("{base}"), _entry("{ft1}")),
    "ram": "merge_method: ram\nbase_model: {base}\n"
    + _models(_entry("{ft0}"), _entry("{ft1}"), _entry("{ft2}"))
    + "\nparameters: {epsilon: 0.01}\n",
    "ramplus_tl": "merge_method: ramplus_tl\nbase_model: {base}\n"
    + _models(_entry("{ft0}"), _entry("{ft1}"), _entry("{ft2}"))
    + "\nparameters: {r: 0.5, alpha: [0.1, 0.9], epsilon: 0.01}\n",
    "passthrough_frankenmerge": """merge_method: passthrough
slices:
  - sources: [{{model: {ft0}, layer_range: [0, 3]}}]
  - sources: [{{model: {ft1}, layer_range: [1, 4]}}]
  - sources: [{{model: {ft2}, layer_range: [2, 4], parameters: {{scale: [0.5, 1.5]}}}}]
""",
    "slices_ties": """merge_method: ties
base_model: {base}
slices:
  - sources:
      - {{model: {base}, layer_range: [0, 2]}}
      - {{model: {ft0}, layer_range: [0, 2], parameters: {{weight: 0.6, density: [0.4, 0.9]}}}}
      - {{model: {ft1}, layer_range: [2, 4], parameters: {{weight: 0.4}}}}
    parameters: {{density: 0.5}}
  - sources:
      - {{model: {base}, layer_range: [2, 4]}}
      - {{model: {ft0}, layer_range: [2, 4], parameters: {{weight: 1.0}}}}
      - {{model: {ft1}, layer_range: [0, 2], parameters: {{weight: [0.2, 0.8]}}}}
""",
}

# Every config on fp32 and sharded bf16; the two-model ones and linear also on the tied families.
TIED_TOO = {
    "linear", "linear_with_base_listed", "breadcrumbs", "slerp", "nuslerp", "nuslerp_base", "nearswap",
    "arcee_fusion",
}  # fmt: skip
CASES = [(name, key) for name in CONFIGS for key in ("fp32", "bf16_sharded")]
CASES += [(name, key) for name in sorted(TIED_TOO) for key in ("fp32_tied", "bf16_tied")]
CASES += [("mixed_tied_untied", "fp32")]


def _render(name: str, key: str, families: dict[str, dict[str, Path]]) -> str:
    if name == "mixed_tied_untied":
        untied, tied = families["fp32"], families["fp32_tied"]
        return (
            "merge_method: linear\n"
            + _models(
                _entry(str(untied["ft0"]), "      weight: 0.3"), _entry(str(tied["ft0"]), "      weight: 0.7")
            )
            + "\n"
        )
    return _fill(CONFIGS[name], families[key])


def _fill(template: str, paths: dict[str, Path]) -> str:
    """Put model paths in for `{base}`, `{ft0}`, ...; `{{`/`}}` are literal YAML braces."""
    for key, path in paths.items():
        template = template.replace("{" + key + "}", str(path))
    return template.replace("{{", "{").replace("}}", "}")


@pytest.fixture(scope="module")
def merged(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], tuple[Path, Path]]:
    """Every case merged by both tools once: {(config, family): (evomerge dir, mergekit dir)}."""
    root = tmp_path_factory.mktemp("vs_mergekit")
    families = {
        key: family(tmp_path_factory.getbasetemp() / "families", key, spec) for key, spec in FAMILIES.items()
    }
    jobs, result = [], {}
    for name, key in CASES:
        config = write_config(root / "configs", _render(name, key, families), f"{name}-{key}.yaml")
        ours, theirs = root / "evomerge" / f"{name}-{key}", root / "mergekit" / f"{name}-{key}"
        merge(config, ours, threads=2)
        jobs.append((config, theirs))
        result[(name, key)] = (ours, theirs)
    run_mergekit_batch(jobs)
    return result


@pytest.mark.parametrize(("name", "key"), CASES, ids=[f"{n}-{k}" for n, k in CASES])
def test_equal_to_mergekit(merged: dict[tuple[str, str], tuple[Path, Path]], name: str, key: str) -> None:
    ours, theirs = merged[(name, key)]
    assert_within_one_ulp(load_state(ours), load_state(theirs))
    ours_config, theirs_config = config_dict(ours), config_dict(theirs)
    assert ours_config["num_hidden_layers"] == theirs_config["num_hidden_layers"]


def test_through_the_mergekit_yaml_command(tmp_path: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    """The real `mergekit-yaml` CLI (not only its run_merge) on a sharded bf16 TIES merge."""
    paths = family(tmp_path_factory.getbasetemp() / "families", "bf16_sharded", FAMILIES["bf16_sharded"])
    config = write_config(tmp_path, _fill(CONFIGS["ties"], paths))
    run_mergekit(config, tmp_path / "mergekit")
    merge(config, tmp_path / "evomerge", max_shard_bytes=30_000)
    assert (tmp_path / "evomerge" / "model.safetensors.index.json").is_file()
    assert_within_one_ulp(load_state(tmp_path / "evomerge"), load_state(tmp_path / "mergekit"))


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_to_yaml_is_read_by_mergekit(name: str) -> None:
    """MergeConfig.to_yaml() parses as mergekit's own MergeConfiguration, with the same content."""
    import yaml
    from mergekit.config import MergeConfiguration

    from evomerge.merge.config import MergeConfig

    paths = {key: Path(f"/models/{key}") for key in ("base", "ft0", "ft1", "ft2")}
    ours = MergeConfig.from_yaml(_fill(CONFIGS[name], paths))
    theirs = MergeConfiguration.model_validate(yaml.safe_load(ours.to_yaml()))
    assert yaml.safe_load(theirs.to_yaml()) == yaml.safe_load(ours.to_yaml())
