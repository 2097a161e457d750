"""Model Breadcrumbs: cut both the smallest entries and the largest outliers of
each task vector, then combine linearly (`breadcrumbs`) or with TIES sign
election (`breadcrumbs_ties`).

    merge_method: breadcrumbs
    base_model: ./base
    models:
      - {model: ./ft_a, parameters: {weight: 1.0, density: 0.9, gamma: 0.01}}

Davari & Belilovsky 2024, "Model Breadcrumbs: Scaling Multi-Task Model Merging
with Sparse Masks" (arXiv:2312.06795).
"""

from __future__ import annotations

from weightspace.merges.generalized_ta import (
    DENSITY,
    GAMMA,
    WEIGHT,
    TaskVectorMerge,
    task_vector_params,
)
from weightspace.methods import register

_PAPER = (
    "Davari & Belilovsky 2024, Model Breadcrumbs: Scaling Multi-Task Model Merging "
    "with Sparse Masks"
)


@register
class Breadcrumbs(TaskVectorMerge):
    name = "breadcrumbs"
    pretty_name = "Model Breadcrumbs"
    paper = _PAPER
    reference_url = "https://arxiv.org/abs/2312.06795"
    global_params = task_vector_params(normalize=False, rescale=False)
    model_params = (WEIGHT, DENSITY, GAMMA)
    sparsification = "magnitude_outliers"
    consensus = None


@register
class BreadcrumbsTies(TaskVectorMerge):
    name = "breadcrumbs_ties"
    pretty_name = "Model Breadcrumbs with TIES"
    paper = _PAPER
    reference_url = "https://arxiv.org/abs/2312.06795"
    global_params = task_vector_params(normalize=False, rescale=False)
    model_params = (WEIGHT, DENSITY, GAMMA)
    sparsification = "magnitude_outliers"
    consensus = "sum"
