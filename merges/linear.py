"""Linear merge (model soup): the weighted average of the models' tensors.

    merge_method: linear
    models:
      - {model: ./ft_a, parameters: {weight: 0.7}}
      - {model: ./ft_b, parameters: {weight: 0.3}}

Wortsman et al. 2022, "Model soups: averaging weights of multiple fine-tuned
models improves accuracy without increasing inference time" (arXiv:2203.05482).
"""

from __future__ import annotations

import torch

from weightspace.errors import SpecError
from weightspace.methods import MergeMethod, Param, TensorParams, register


def weighted_average(
    tensors: list[torch.Tensor], weights: list[float], normalize: bool = True
) -> torch.Tensor:
    """sum_i w_i x_i, divided by sum_i w_i when `normalize`, computed in float32 (float64 for
    float64 inputs) and returned in the inputs' dtype, as mergekit 0.1.5's linear does.

    >>> weighted_average([torch.tensor([1.0]), torch.tensor([3.0])], [1.0, 3.0])
    tensor([2.5000])
    """
    dtype = tensors[0].dtype
    work = torch.float64 if dtype == torch.float64 else torch.float32
    w = torch.tensor(weights, dtype=work)
    out = torch.zeros_like(tensors[0], dtype=work)
    for x, wi in zip(tensors, w):
        out.addcmul_(x, wi)  # one rounding per model, as mergekit's addcmul_
    if normalize:
        total = w.sum()
        if total == 0:
            raise SpecError(
                "linear: the weights sum to 0, so they cannot be normalized; "
                "change the weights or set normalize: false"
            )
        out /= total
    return out.to(dtype)


@register
class Linear(MergeMethod):
    elementwise = True
    name = "linear"
    pretty_name = "Linear"
    paper = (
        "Wortsman et al. 2022, Model soups: averaging weights of multiple fine-tuned "
        "models improves accuracy without increasing inference time"
    )
    reference_url = "https://arxiv.org/abs/2203.05482"
    uses_base = "none"
    global_params = (
        Param("normalize", default=True, kind=bool, doc="divide by the sum of the weights"),
    )
    model_params = (Param("weight", required=True, doc="weight of this model"),)

    def check_params(self, params: TensorParams, where: list[str]) -> None:
        if params["normalize"] and sum(params.model_values("weight")) == 0:
            raise SpecError("linear: the weights sum to 0, so they cannot be normalized; "
                            "change the weights or set normalize: false")

    def merge(
        self,
        name: str,
        base: torch.Tensor | None,
        tensors: list[torch.Tensor],
        params: TensorParams,
        companions: dict[str, list[torch.Tensor]],
    ) -> torch.Tensor:
        return weighted_average(tensors, params.model_values("weight"), params["normalize"])
