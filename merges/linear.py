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

from weightspace.buffers import empty_like
from weightspace.errors import SpecError
from weightspace.methods import MergeMethod, Param, TensorParams, register

# On CPU, inputs narrower than float32 are summed over blocks of this many entries in two
# float32 buffers that stay in cache: a bfloat16 block is widened with a plain copy, because
# addcmul_ of a bfloat16 tensor into a float32 one converts entry by entry (0.14-0.15 s against
# 0.04 s of CPU time for three 16.8M-entry bfloat16 tensors, one thread), and no tensor-sized
# float32 result is held next to the inputs. float32 inputs are summed whole (blocks gained
# nothing there: 0.044-0.058 s either way).
BLOCK = 1 << 16


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
    total = w.sum()
    if normalize and total == 0:
        raise SpecError(
            "linear: the weights sum to 0, so they cannot be normalized; "
            "change the weights or set normalize: false"
        )
    if tensors[0].device.type != "cpu" or all(t.dtype == work for t in tensors):
        out = empty_like(tensors[0], work).zero_()
        for x, wi in zip(tensors, w):
            out.addcmul_(x, wi)  # one rounding per model, as mergekit's addcmul_
        if normalize:
            out /= total
        return out.to(dtype)
    n = tensors[0].numel()
    flat = [x.reshape(-1) for x in tensors]
    out = empty_like(tensors[0])
    flat_out = out.view(-1)
    acc_, wide_ = (torch.empty(min(BLOCK, n), dtype=work) for _ in range(2))
    for s in range(0, n, BLOCK):
        e = min(n, s + BLOCK)
        acc, wide = acc_[: e - s], wide_[: e - s]
        acc.zero_()
        for x, wi in zip(flat, w):
            part = x[s:e]
            if part.dtype != work:
                part = wide.copy_(part)
            acc.addcmul_(part, wi)  # one rounding per model, as mergekit's addcmul_
        if normalize:
            acc /= total
        flat_out[s:e].copy_(acc)
    return out


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
