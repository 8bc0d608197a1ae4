"""The zoo: tiny models evomerge builds itself, for demos, tests and benchmarks (no hub needed)."""

from __future__ import annotations

from evomerge.zoo.build import build
from evomerge.zoo.manifest import TaskSplits, ZooManifest

__all__ = ["TaskSplits", "ZooManifest", "build"]
