"""Parameter-space merging: pure kernels, their registry, mergekit-config planning and the streaming engine."""

from __future__ import annotations

import sys
import types


class _CallableModule(types.ModuleType):
    """Keeps `evomerge.merge(config, out_dir)` a function call once `evomerge.merge.*` is imported.

    Importing a submodule binds the subpackage to the attribute `evomerge.merge`, which would shadow the
    lazily exported function; calling the package forwards to `evomerge.merge.api.merge` instead.
    """

    def __call__(self, *args: object, **kwargs: object) -> object:
        from evomerge.merge.api import merge

        return merge(*args, **kwargs)  # type: ignore[arg-type]


sys.modules[__name__].__class__ = _CallableModule

# Register the built-in merge methods once, before any module of this package looks one up.
import evomerge.merge.methods  # noqa: E402, F401
