"""Zoo dirs for the benchmark scripts (imported as a sibling: run the scripts as `python benchmarks/X.py`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def load_or_build(zoo_dir: Path, size: str) -> Any:
    """An existing zoo dir as it is (no rebuild when the zoo code changed since), else build it."""
    from evomerge.zoo import ZooManifest, build

    if (zoo_dir / "zoo.json").is_file():
        return ZooManifest.load(zoo_dir)
    return build("lm", zoo_dir, size=size)  # type: ignore[arg-type]
