"""Built-in merge methods. Importing this package registers each of them
(it is the `weightspace.methods` entry point)."""

from weightspace.merges import (  # noqa: F401  (imported for their @register side effect)
    arcee_fusion,
    atlas,
    breadcrumbs,
    dare,
    della,
    fisher,
    karcher,
    linear,
    model_stock,
    multislerp,
    nearswap,
    nuslerp,
    passthrough,
    ram,
    regmean,
    sce,
    slerp,
    task_arithmetic,
    ties,
)
