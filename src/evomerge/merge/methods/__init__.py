"""Built-in merge methods. Each module registers its methods with `evomerge.merge.registry.register`."""

from evomerge.merge.methods import (  # noqa: F401
    karcher,
    linear,
    model_stock,
    passthrough,
    sce,
    slerp,
    task_arithmetic,
)
