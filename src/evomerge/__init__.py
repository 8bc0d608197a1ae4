"""evomerge: breed new models out of existing ones."""

from __future__ import annotations

__version__ = "0.1.0"

from evomerge.errors import EvomergeError

__all__ = ["EvomergeError", "__version__", "merge"]


def __getattr__(name: str) -> object:
    # Lazy: `import evomerge` stays cheap (no torch import) for the CLI's --help.
    if name == "merge":
        from evomerge.merge.api import merge

        return merge
    raise AttributeError(f"module 'evomerge' has no attribute {name!r}")
