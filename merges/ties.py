"""TIES merging: trim each task vector to its largest entries, elect a sign per
entry, and average only the entries that agree with it.

    merge_method: ties
    base_model: ./base
    models:
      - {model: ./ft_a, parameters: {weight: 1.0, density: 0.2}}
      - {model: ./ft_b, parameters: {weight: 1.0, density: 0.2}}

Yadav et al. 2023, "TIES-Merging: Resolving Interference When Merging Models"
(arXiv:2306.01708).
"""

from __future__ import annotations

from weightspace.merges.generalized_ta import DENSITY, WEIGHT, TaskVectorMerge, task_vector_params
from weightspace.methods import register


@register
class Ties(TaskVectorMerge):
    name = "ties"
    pretty_name = "TIES"
    paper = "Yadav et al. 2023, TIES-Merging: Resolving Interference When Merging Models"
    reference_url = "https://arxiv.org/abs/2306.01708"
    global_params = task_vector_params(normalize=True, rescale=False)
    model_params = (WEIGHT, DENSITY)
    sparsification = "magnitude"
    consensus = "sum"
    # thresholds are counted in integer histograms and the rest is elementwise: one thread gives
    # the same bits, and was faster (134M fp32: 4.65-4.72 s against 5.3-7.6 s with two)
    thread_invariant = True
