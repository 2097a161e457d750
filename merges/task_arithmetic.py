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

from weightspace.merges.generalized_ta import WEIGHT, TaskVectorMerge, task_vector_params
from weightspace.methods import register


@register
class TaskArithmetic(TaskVectorMerge):
    elementwise = True
    name = "task_arithmetic"
    pretty_name = "Task Arithmetic"
    paper = "Ilharco et al. 2023, Editing Models with Task Arithmetic"
    reference_url = "https://arxiv.org/abs/2212.04089"
    global_params = task_vector_params(normalize=False, rescale=None)
    model_params = (WEIGHT,)
    # mergekit 0.1.5 accepts these for task_arithmetic and ignores them: nothing is sparsified
    ignored_params = {
        "density": "task_arithmetic sparsifies nothing, so density has no effect (mergekit accepts "
                   "and ignores it); remove it, or use ties or dare_linear to keep part of each task "
                   "vector",
        "rescale": "task_arithmetic sparsifies nothing, so there is nothing to rescale (mergekit "
                   "accepts and ignores it); remove it",
    }
    sparsification = None
    consensus = None
