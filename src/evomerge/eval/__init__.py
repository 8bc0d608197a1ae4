"""Evaluators: task files, metrics and fast batched scoring of live models or model dirs.

The names below are imported on first use, so `from evomerge.eval.result import EvalResult` stays light.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "EvalResult": "evomerge.eval.result",
    "TaskScore": "evomerge.eval.result",
    "Evaluator": "evomerge.eval.evaluator",
    "Example": "evomerge.eval.tasks",
    "Task": "evomerge.eval.tasks",
    "load_task": "evomerge.eval.tasks",
    "load_model": "evomerge.eval.loading",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'evomerge.eval' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
