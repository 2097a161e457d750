"""Built-in merge methods. Importing this package registers each of them
(it is the `weightspace.methods` entry point)."""

from weightspace.merges import (  # noqa: F401  (imported for their @register side effect)
    atlas,
    breadcrumbs,
    dare,
    della,
    fisher,
    linear,
    model_stock,
    nuslerp,
    passthrough,
    regmean,
    slerp,
    task_arithmetic,
    ties,
)
