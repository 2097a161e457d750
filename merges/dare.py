"""DARE: drop task-vector entries at random and rescale the rest, then combine
linearly (`dare_linear`) or with TIES sign election (`dare_ties`).

    merge_method: dare_ties
    base_model: ./base
    models:
      - {model: ./ft_a, parameters: {weight: 0.5, density: 0.3}}
      - {model: ./ft_b, parameters: {weight: 0.5, density: 0.3}}
    parameters: {seed: 0}

Yu et al. 2024, "Language Models are Super Mario: Absorbing Abilities from
Homologous Models as a Free Lunch" (arXiv:2311.03099).
"""

from __future__ import annotations

from weightspace.merges.generalized_ta import DENSITY, WEIGHT, TaskVectorMerge, task_vector_params
from weightspace.methods import register

_PAPER = (
    "Yu et al. 2024, Language Models are Super Mario: Absorbing Abilities from "
    "Homologous Models as a Free Lunch"
)


@register
class DareTies(TaskVectorMerge):
    name = "dare_ties"
    pretty_name = "DARE TIES"
    paper = _PAPER
    reference_url = "https://arxiv.org/abs/2311.03099"
    global_params = task_vector_params(normalize=False, rescale=True)
    model_params = (WEIGHT, DENSITY)
    randomized = True
    sparsification = "random"
    consensus = "sum"


@register
class DareLinear(TaskVectorMerge):
    name = "dare_linear"
    pretty_name = "Linear DARE"
    paper = _PAPER
    reference_url = "https://arxiv.org/abs/2311.03099"
    global_params = task_vector_params(normalize=False, rescale=True)
    model_params = (WEIGHT, DENSITY)
    randomized = True
    sparsification = "random"
    consensus = None
