"""DELLA: drop task-vector entries at random with keep probabilities that grow
with magnitude rank (MagPrune), rescale, then combine with TIES sign election
(`della`) or linearly (`della_linear`).

    merge_method: della
    base_model: ./base
    models:
      - {model: ./ft_a, parameters: {weight: 1.0, density: 0.5, epsilon: 0.1}}
      - {model: ./ft_b, parameters: {weight: 1.0, density: 0.5, epsilon: 0.1}}
    parameters: {lambda: 1.0, seed: 0}

Deep et al. 2024, "DELLA-Merging: Reducing Interference in Model Merging through
Magnitude-Based Sampling" (arXiv:2406.11617).
"""

from __future__ import annotations

from weightspace.merges.generalized_ta import (
    DENSITY,
    EPSILON,
    WEIGHT,
    TaskVectorMerge,
    task_vector_params,
)
from weightspace.methods import register

_PAPER = (
    "Deep et al. 2024, DELLA-Merging: Reducing Interference in Model Merging through "
    "Magnitude-Based Sampling"
)


@register
class Della(TaskVectorMerge):
    name = "della"
    pretty_name = "DELLA"
    paper = _PAPER
    reference_url = "https://arxiv.org/abs/2406.11617"
    global_params = task_vector_params(normalize=True, rescale=True)
    model_params = (WEIGHT, DENSITY, EPSILON)
    randomized = True
    sparsification = "della_magprune"
    consensus = "sum"


@register
class DellaLinear(TaskVectorMerge):
    name = "della_linear"
    pretty_name = "Linear DELLA"
    paper = _PAPER
    reference_url = "https://arxiv.org/abs/2406.11617"
    global_params = task_vector_params(normalize=False, rescale=True)
    model_params = (WEIGHT, DENSITY, EPSILON)
    randomized = True
    sparsification = "della_magprune"
    consensus = None
