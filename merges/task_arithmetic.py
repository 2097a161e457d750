"""Task arithmetic: add the weighted sum of task vectors (model - base) to the base.

    merge_method: task_arithmetic
    base_model: ./base
    models:
      - {model: ./ft_a, parameters: {weight: 1.0}}
      - {model: ./ft_b, parameters: {weight: 0.5}}
    parameters: {lambda: 1.0}

Ilharco et al. 2023, "Editing Models with Task Arithmetic" (arXiv:2212.04089).
"""

from __future__ import annotations

from weightspace.merges.generalized_ta import DENSITY, WEIGHT, TaskVectorMerge, task_vector_params

from weightspace.methods import register


@register
class TaskArithmetic(TaskVectorMerge):
    elementwise = True
    name = "task_arithmetic"
    pretty_name = "Task Arithmetic"
    paper = "Ilharco et al. 2023, Editing Models with Task Arithmetic"
    reference_url = "https://arxiv.org/abs/2212.04089"
    # `density` and `rescale` are accepted as in mergekit but unused: nothing is sparsified.
    global_params = task_vector_params(normalize=False, rescale=False)
    model_params = (WEIGHT, DENSITY)
    sparsification = None
    consensus = None
