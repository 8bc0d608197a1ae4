"""`evomerge.merge(config, out_dir)`: the one-call Python API behind `evomerge merge`."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from evomerge.merge.config import MergeConfig


def merge(
    config: MergeConfig | str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    force: bool = False,
    allow_pickle: bool = False,
    random_seed: int | None = None,
    max_shard_bytes: int | float = 5e9,
    threads: int | None = None,
    tie_break: Literal["mergekit", "stable"] = "mergekit",
) -> Path:
    """Merge the models a mergekit config names into the new model dir `out_dir` and return its path.

    `config` is a `MergeConfig`, a path to its YAML file, or YAML text. Nothing is written if any check
    fails (missing model, missing tensor, shape mismatch, bad parameter, existing `out_dir` without
    `force`); the output appears at `out_dir` only once complete. `tie_break="stable"` trades mergekit's
    exact choice among equal magnitudes at a top-k threshold for linear-time selection.
    """
    from evomerge.merge.engine import merge_to_dir

    recipe_yaml: str | None = None
    if not isinstance(config, MergeConfig):
        source = Path(config) if isinstance(config, os.PathLike) else config
        if isinstance(source, Path) or _looks_like_path(source):
            recipe_yaml = Path(source).read_text(encoding="utf-8") if Path(source).is_file() else None
        config = MergeConfig.from_yaml(source)
    result = merge_to_dir(
        config,
        out_dir,
        force=force,
        allow_pickle=allow_pickle,
        random_seed=random_seed,
        max_shard_bytes=int(max_shard_bytes),
        threads=threads,
        config_yaml=recipe_yaml,
        tie_break=tie_break,
    )
    return result.out_dir


def _looks_like_path(text: str) -> bool:
    return "\n" not in text and text.endswith((".yaml", ".yml"))
