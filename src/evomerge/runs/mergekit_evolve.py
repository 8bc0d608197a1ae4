"""mergekit-evolve configs, read unchanged by `evomerge evolve`: their `genome` and `tasks` mapped onto ours.

mergekit-evolve (mergekit 0.1.5, `mergekit/evo/config.py` and `genome.py`) describes a run as a `genome`
(models, merge_method in linear / task_arithmetic / ties / dare_ties / slerp, base_model,
layer_granularity, normalize, allow_negative_weights, and tokenizer_source, filters, smooth) and `tasks`
(lm-eval task names, each with a weight and an lm-eval metric key such as "acc,none"), plus limit,
num_fewshot and four switches. The mapping:

- `layer_granularity` 0: one gene per model (`granularity: model`); 1: per layer; k: per k layers;
- the genes are mergekit's: weight (and density for ties / dare_ties; t for slerp), weights in [0, 1],
  or [-1, 1] with `allow_negative_weights`; density in evomerge's default range;
- `normalize` as mergekit reads it (unset: on for linear, ties and dare_ties), fixed in every recipe;
- no `base_model` (linear, slerp): the first model is the architecture (and slerp's base);
- each task becomes an `lm_eval` fitness task; "acc,none" is the metric `acc`; `limit` and `num_fewshot`
  apply to every task; local tasks are found in `task_search_path` (mergekit-evolve's
  `--task-search-path`).

What evomerge has no equivalent for is refused with its name: tokenizer_source, filters, smooth,
random_init, shuffle, apply_chat_template / fewshot_as_multiturn set to true (evomerge's lm-eval
fitness applies no chat template; mergekit's default is to apply one, so scores can differ from
mergekit-evolve's), a metric with a filter other than `none`, and keys mergekit-evolve does not have.
The budget and optimiser, command-line options in mergekit-evolve, are evomerge's defaults (CMA-ES, 100
evaluations like `--max-fevals`) unless the caller passes them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from evomerge.configfile import read_yaml_mapping
from evomerge.errors import ConfigError
from evomerge.runs.config import EvolveConfig

GENES = {  # mergekit-evolve's genes per method (its METHOD_PARAM_MAPS)
    "linear": ("weight",),
    "task_arithmetic": ("weight",),
    "ties": ("weight", "density"),
    "dare_ties": ("weight", "density"),
    "slerp": ("t",),
}
TOP_KEYS = {
    "genome", "tasks", "limit", "num_fewshot", "shuffle", "random_init", "apply_chat_template",
    "fewshot_as_multiturn",
}  # fmt: skip
GENOME_KEYS = {
    "models", "merge_method", "base_model", "tokenizer_source", "layer_granularity", "normalize",
    "allow_negative_weights", "filters", "smooth",
}  # fmt: skip


def is_mergekit_evolve(data: dict[str, Any]) -> bool:
    """A mergekit-evolve config has a `genome` block and `tasks`; an evomerge config has neither."""
    return "genome" in data


def load_evolve_config(path: str | Path, *, task_search_path: Path | None = None) -> EvolveConfig:
    """An evomerge evolve config, or a mergekit-evolve one mapped onto it (see the module doc)."""
    data, label = read_yaml_mapping(path, expected=EvolveConfig.yaml_expected)
    if not is_mergekit_evolve(data):
        return EvolveConfig.from_dict(data, label=label)
    return EvolveConfig.from_dict(from_mergekit_evolve(data, label, task_search_path), label=label)


def from_mergekit_evolve(
    data: dict[str, Any], label: str = "config", task_search_path: Path | None = None
) -> dict[str, Any]:
    """The evomerge config (a dict for EvolveConfig.from_dict) a mergekit-evolve config means."""
    _refuse_unmapped(data, label)
    genome = data["genome"]
    method = genome.get("merge_method")
    if method not in GENES:
        raise ConfigError(
            f"{label}: genome.merge_method: mergekit-evolve takes {sorted(GENES)}, got {method!r}"
        )
    models = [_model_path(m, label) for m in genome.get("models") or []]
    base = genome.get("base_model")
    return {
        "base_model": _model_path(base, label) if base is not None else (models[0] if models else None),
        "models": models,
        "merge_method": method,
        "search": _search(genome, method),
        "fitness": [_task(task, data, label, task_search_path) for task in data.get("tasks") or []],
    }


def _refuse_unmapped(data: dict[str, Any], label: str) -> None:
    unknown = sorted(set(data) - TOP_KEYS) + sorted(f"genome.{k}" for k in set(data["genome"]) - GENOME_KEYS)
    if unknown:
        raise ConfigError(f"{label}: {unknown} are not keys of a mergekit-evolve config; remove them")
    genome = data["genome"]
    unmapped = {
        "genome.tokenizer_source": genome.get("tokenizer_source") is not None,
        "genome.filters": bool(genome.get("filters")),
        "genome.smooth": bool(genome.get("smooth")),
        "random_init": bool(data.get("random_init")),
        "shuffle": bool(data.get("shuffle")),
        "apply_chat_template": data.get("apply_chat_template") is True,
        "fewshot_as_multiturn": data.get("fewshot_as_multiturn") is True,
    }
    named = [key for key, used in unmapped.items() if used]
    if named:
        raise ConfigError(
            f"{label}: {named} of this mergekit-evolve config have no equivalent in evomerge evolve "
            "(docs/evolve.md, 'mergekit-evolve configs'); remove them, or write an evomerge config"
        )


def _model_path(reference: Any, label: str) -> str:
    if not isinstance(reference, str) or "+" in reference:
        raise ConfigError(
            f"{label}: genome: model {reference!r}: evomerge reads a model dir path (no LoRA '+', no mapping)"
        )
    return reference


def _search(genome: dict[str, Any], method: str) -> dict[str, Any]:
    granularity = int(genome.get("layer_granularity") or 0)
    low = -1.0 if genome.get("allow_negative_weights") else 0.0
    bounds = {"weight": (low, 1.0), "t": (0.0, 1.0), "density": None}
    search: dict[str, Any] = {"parameters": {gene: bounds[gene] for gene in GENES[method]}}
    if granularity == 0:
        search["granularity"] = "model"
    elif granularity == 1:
        search["granularity"] = "layer"
    else:
        search |= {"granularity": "group", "group_size": granularity}
    normalize = genome.get("normalize")
    if normalize is None and method in ("linear", "ties", "dare_ties"):
        normalize = True  # mergekit-evolve's reading of an unset normalize
    if normalize is not None and method != "slerp":
        search["fixed"] = {"normalize": bool(normalize)}
    return search


def _task(task: Any, data: dict[str, Any], label: str, search_path: Path | None) -> dict[str, Any]:
    task = {"name": task} if isinstance(task, str) else dict(task)
    metric, _, kept = str(task.get("metric", "acc,none")).partition(",")
    if kept not in ("", "none"):
        raise ConfigError(
            f"{label}: tasks: {task.get('name')!r}: metric {task.get('metric')!r} keeps lm-eval filter "
            f"{kept!r}; evomerge scores the unfiltered metric only (use '{metric},none')"
        )
    entry: dict[str, Any] = {"lm_eval": task.get("name"), "weight": task.get("weight", 1.0), "metric": metric}
    for key in ("limit", "num_fewshot"):
        if data.get(key) is not None:
            entry[key] = data[key]
    if search_path is not None:
        entry["include_path"] = str(search_path)
    return entry
