"""Model Stock: move from the base towards the average of the fine-tuned models
by a ratio set by the angle between their task vectors.

    merge_method: model_stock
    base_model: ./base
    models: [{model: ./ft_a}, {model: ./ft_b}, {model: ./ft_c}]

With k models and cos the mean pairwise cosine between task vectors,
t = k cos / (1 + (k - 1) cos) and the result is t * mean(models) + (1 - t) * base.
Jang et al. 2024, "Model Stock: All we need is just a few fine-tuned models"
(arXiv:2403.19522).
"""

from __future__ import annotations

import torch

from weightspace.methods import MergeMethod, Param, TensorParams, register

NORM_EPS = 1e-6


def model_stock(
    base: torch.Tensor, tensors: list[torch.Tensor], filter_wise: bool = False
) -> torch.Tensor:
    """t * mean(tensors) + (1 - t) * base, with t from the task vectors' mean cosine.

    With `filter_wise`, cosines and t are per row (vectors along the last dim)
    instead of one for the whole tensor.

        >>> model_stock(torch.zeros(2), [torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])])
        tensor([0., 0.])
    """
    shape = base.shape
    if filter_wise:
        # a bias (or any vector) is one row
        w0 = base.reshape(1, -1) if base.dim() < 2 else base
        ws = [x.reshape(1, -1) if x.dim() < 2 else x for x in tensors]
    else:
        w0 = base.reshape(-1)
        ws = [x.reshape(-1) for x in tensors]
    offsets = [w - w0 for w in ws]
    norms = [torch.linalg.vector_norm(o, dim=-1) for o in offsets]
    cosines = []
    for i in range(len(offsets)):
        for j in range(i + 1, len(offsets)):
            dot = (offsets[i] * offsets[j]).sum(dim=-1)
            cosines.append((dot / (norms[i] * norms[j]).clamp(min=NORM_EPS)).clamp(-1, 1))
    cos = torch.stack(cosines).mean(dim=0).unsqueeze(-1)
    k = len(ws)
    t = k * cos / (1 + (k - 1) * cos)
    average = sum(ws) / k
    return (t * average + (1 - t) * w0).reshape(shape)


@register
class ModelStock(MergeMethod):
    name = "model_stock"
    pretty_name = "Model Stock"
    paper = "Jang et al. 2024, Model Stock: All we need is just a few fine-tuned models"
    reference_url = "https://arxiv.org/abs/2403.19522"
    uses_base = "required"
    global_params = (
        Param(
            "filter_wise",
            default=False,
            kind=bool,
            doc="compute the ratio per row instead of per tensor",
        ),
    )
    min_models = 2

    def merge(
        self,
        name: str,
        base: torch.Tensor | None,
        tensors: list[torch.Tensor],
        params: TensorParams,
        companions: dict[str, list[torch.Tensor]],
    ) -> torch.Tensor:
        assert base is not None, "the planner supplies the base for uses_base='required'"
        return model_stock(base, tensors, filter_wise=params["filter_wise"])
