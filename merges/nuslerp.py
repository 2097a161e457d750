"""NuSLERP: SLERP between two models by weight, optionally of their task
vectors, row-wise, column-wise or over the whole tensor.

    merge_method: nuslerp
    base_model: ./base            # optional: slerp the task vectors instead
    models:
      - {model: ./ft_a, parameters: {weight: 0.6}}
      - {model: ./ft_b, parameters: {weight: 0.4}}
    parameters: {nuslerp_flatten: false, nuslerp_row_wise: true}

The interpolation factor is w_b / (w_a + w_b). With `nuslerp_flatten` (the
default) the tensor is one vector; otherwise each row (`nuslerp_row_wise`) or
each vector along the last dimension is interpolated on its own. mergekit's
method; Goddard et al. 2024, "Arcee's MergeKit" (arXiv:2403.13257).
"""

from __future__ import annotations

import torch

from weightspace.methods import MergeMethod, Param, TensorParams, register

COLINEAR_EPS = 1e-8
NORM_EPS = 1e-7


def nuslerp(
    t: float, v0: torch.Tensor, v1: torch.Tensor, dim: int = -1, flatten: bool = False
) -> torch.Tensor:
    """Slerp each vector along `dim` of `v0` towards `v1` (or the flattened tensors).

    >>> nuslerp(0.5, torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]]))
    tensor([[0.7071, 0.7071]])
    """
    shape = v0.shape
    if flatten or v0.dim() == 0:
        a, b = v0.reshape(-1), v1.reshape(-1)
    elif dim != -1:
        a, b = v0.transpose(dim, -1), v1.transpose(dim, -1)
    else:
        a, b = v0, v1
    a_unit = a / torch.linalg.vector_norm(a, dim=-1, keepdim=True).clamp(min=NORM_EPS)
    b_unit = b / torch.linalg.vector_norm(b, dim=-1, keepdim=True).clamp(min=NORM_EPS)
    cos_theta = (a_unit * b_unit).sum(dim=-1, keepdim=True).clamp(-1, 1)
    # mergekit's test and order of operations: 1 - cos^2 <= eps^2 stays true for identical
    # vectors in float16/bfloat16 (where eps^2 rounds to 0), and the curved branch is computed
    # at theta = 0 for them, so no 0/0 is ever formed
    colinear = (1 - cos_theta.square()) <= COLINEAR_EPS**2
    theta = torch.acos(torch.where(colinear, 0, cos_theta))
    sin_theta = torch.sin(theta)
    curved = (torch.sin((1 - t) * theta) * a + torch.sin(t * theta) * b) / sin_theta
    out = torch.where(colinear, (1 - t) * a + t * b, curved)
    if dim != -1 and not flatten and v0.dim() > 0:
        out = out.transpose(dim, -1)
    return out.reshape(shape)


def interpolation_factor(weights: list[float]) -> float:
    """t = w_1 / (w_0 + w_1); 0.5 when the weights cancel out."""
    total = weights[0] + weights[1]
    return 0.5 if abs(total) < 1e-6 else weights[1] / total


@register
class NuSlerp(MergeMethod):
    name = "nuslerp"
    pretty_name = "NuSLERP"
    paper = "Goddard et al. 2024, Arcee's MergeKit: A Toolkit for Merging Large Language Models"
    reference_url = "https://arxiv.org/abs/2403.13257"
    uses_base = "optional"
    global_params = (
        Param(
            "nuslerp_flatten",
            default=True,
            kind=bool,
            doc="treat the whole tensor as one vector",
        ),
        Param(
            "nuslerp_row_wise",
            default=False,
            kind=bool,
            doc="without flattening, slerp rows (dim 0) instead of vectors along the last dim",
        ),
    )
    model_params = (Param("weight", required=True, doc="relative weight of this model"),)
    min_models = 2
    max_models = 2

    def merge(
        self,
        name: str,
        base: torch.Tensor | None,
        tensors: list[torch.Tensor],
        params: TensorParams,
        companions: dict[str, list[torch.Tensor]],
    ) -> torch.Tensor:
        t = interpolation_factor(params.model_values("weight"))
        dim = 0 if params["nuslerp_row_wise"] else -1
        flatten = params["nuslerp_flatten"]
        a, b = tensors
        if base is None:
            return nuslerp(t, a, b, dim=dim, flatten=flatten)
        return base + nuslerp(t, a - base, b - base, dim=dim, flatten=flatten)
