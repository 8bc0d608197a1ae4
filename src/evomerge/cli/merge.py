"""`evomerge merge CONFIG.yaml OUT_DIR`: run a mergekit merge config with the streaming engine."""

from __future__ import annotations

import enum
import re
import time
from pathlib import Path
from typing import Annotated

import typer

from evomerge.cli import app
from evomerge.cli._common import user_errors


class TieBreakChoice(str, enum.Enum):
    mergekit = "mergekit"
    stable = "stable"


_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
}


def parse_size(text: str) -> int:
    """'5GB' -> 5_000_000_000, '500MB', '1.5GiB', '1000' (bytes)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", text)
    unit = match.group(2).upper() if match else ""
    if match is None or unit not in _UNITS:
        raise typer.BadParameter(f"expected a size such as 5GB, 500MB or 1.5GiB, got {text!r}")
    return int(float(match.group(1)) * _UNITS[unit])


@app.command()
def merge(
    config: Annotated[Path, typer.Argument(help="mergekit merge config (YAML).")],
    out_dir: Annotated[Path, typer.Argument(help="Model dir to create.")],
    force: Annotated[bool, typer.Option("--force", help="Replace OUT_DIR if it exists.")] = False,
    allow_pickle: Annotated[
        bool,
        typer.Option("--allow-pickle", help="Load pytorch_model.bin pickles (only from sources you trust)."),
    ] = False,
    random_seed: Annotated[
        int | None,
        typer.Option("--random-seed", help="Seed for methods that draw random masks (dare, della)."),
    ] = None,
    shard_size: Annotated[
        str, typer.Option("--shard-size", help="Largest output shard, e.g. 5GB, 500MB.")
    ] = "5GB",
    threads: Annotated[
        int | None, typer.Option("--threads", help="Tensors computed at once (default: cores).")
    ] = None,
    dtype: Annotated[str | None, typer.Option("--dtype", help="Override the config's compute dtype.")] = None,
    out_dtype: Annotated[
        str | None, typer.Option("--out-dtype", help="Override the config's output dtype.")
    ] = None,
    tie_break: Annotated[
        TieBreakChoice,
        typer.Option(
            "--tie-break",
            help="Equal magnitudes at a TIES/breadcrumbs threshold: kept as mergekit's sort keeps them "
            "(exact, default) or lowest index first ('stable': linear time, faster; differs from mergekit "
            "only among those ties).",
        ),
    ] = TieBreakChoice.mergekit,
) -> None:
    """Merge the models named in CONFIG (mergekit YAML) into the new model dir OUT_DIR."""
    max_shard_bytes = parse_size(shard_size)
    with user_errors():
        import torch

        from evomerge.merge.config import MergeConfig
        from evomerge.merge.engine import merge_to_dir

        torch.set_num_threads(1)  # parallelism comes from the engine's threads, one tensor each
        parsed = MergeConfig.from_yaml(config)
        overrides = {key: value for key, value in (("dtype", dtype), ("out_dtype", out_dtype)) if value}
        if overrides:
            parsed = MergeConfig.from_dict({**parsed.to_dict(), **overrides}, label=str(config))
        started = time.perf_counter()
        result = merge_to_dir(
            parsed,
            out_dir,
            force=force,
            allow_pickle=allow_pickle,
            random_seed=random_seed,
            max_shard_bytes=max_shard_bytes,
            threads=threads,
            config_yaml=None if overrides else config.read_text(encoding="utf-8"),
            tie_break=tie_break.value,
        )
        seconds = time.perf_counter() - started
    seed = f", seed {result.seed}" if result.seed is not None else ""
    typer.echo(
        f"merged {result.num_tensors} tensors with {parsed.merge_method} into {result.out_dir} "
        f"({len(result.files)} weight file(s), {seconds:.1f} s{seed})"
    )
