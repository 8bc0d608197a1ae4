"""Built-in merge methods. Each module registers its methods with `evomerge.merge.registry.register`."""

from evomerge.merge.methods import (  # noqa: F401
    fisher,
    karcher,
    linear,
    model_stock,
    passthrough,
    regmean,
    sce,
    slerp,
    subspace,
    task_arithmetic,
)
