"""Built-in merge methods. Each module registers its methods with `evomerge.merge.registry.register`."""

from evomerge.merge.methods import (  # noqa: F401
    arcee_fusion,
    fisher,
    karcher,
    linear,
    model_stock,
    nearswap,
    passthrough,
    prodistill,
    ram,
    regmean,
    sce,
    slerp,
    subspace,
    task_arithmetic,
)
