"""What a run compares itself with: each source alone and default-parameter merges of the same sources.

The warm start evaluates these on dev (and the run's best is chosen among them too); the results table
scores them on test beside the evolved merge. One list for both, so the run never reports a baseline it
did not also try.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from evomerge.runs.config import EvolveConfig


def baseline_recipes(config: EvolveConfig) -> dict[str, dict[str, Any]]:
    """Default-parameter merges of the same sources: what a user would try without a search."""
    base, models = str(config.base_model), [str(m) for m in config.models]

    def entries(**params: float) -> list[dict[str, Any]]:
        return [{"model": m, "parameters": dict(params)} for m in models]

    common = {"base_model": base, "dtype": config.dtype}
    return {
        "linear average": {"merge_method": "linear", "models": entries(weight=1.0), "dtype": config.dtype},
        "task arithmetic (weight 1)": {
            "merge_method": "task_arithmetic",
            "models": entries(weight=1.0),
            **common,
        },
        "ties (weight 1, density 0.5)": {
            "merge_method": "ties",
            "models": entries(weight=1.0, density=0.5),
            **common,
        },
        "dare_ties (weight 1, density 0.5)": {
            "merge_method": "dare_ties",
            "models": entries(weight=1.0, density=0.5),
            **common,
        },
    }


def source_recipes(config: EvolveConfig, *, with_base: bool = True) -> dict[str, dict[str, Any]]:
    """Each source (and the base) alone, written as a one-model linear merge so the live model can hold it."""
    named = {**({"base": config.base_model} if with_base else {}), **{Path(m).name: m for m in config.models}}
    return {
        name: {
            "merge_method": "linear",
            "models": [{"model": str(path), "parameters": {"weight": 1.0}}],
            "dtype": config.dtype,
        }
        for name, path in named.items()
    }


def union_recipe(config: EvolveConfig) -> dict[str, Any]:
    """A recipe naming the base and every source, so a backend loads every tensor any of these reads."""
    return {
        "merge_method": "task_arithmetic",
        "base_model": str(config.base_model),
        "models": [{"model": str(m), "parameters": {"weight": 1.0}} for m in config.models],
    }
