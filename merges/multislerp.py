"""Multi-SLERP: a weighted spherical average of any number of models (or of
their task vectors, with a base): barycentric interpolation on the hypersphere.

    merge_method: multislerp
    base_model: ./base            # optional: average the task vectors x_i - base
    models:
      - {model: ./ft_a, parameters: {weight: 0.5}}
      - {model: ./ft_b, parameters: {weight: 0.3}}
      - {model: ./ft_c, parameters: {weight: 0.2}}

Per tensor, each flattened to one vector v_i (mergekit 0.1.5's `multislerp`):

    w      weights, divided by their sum when normalize_weights (a zero sum is a spec error)
    u_i    v_i / (|v_i| + eps)                      onto the unit sphere
    m      sum_i w_i u_i, normalized                the weighted Euclidean mean's direction
    g      sum_i w_i (u_i - (u_i . m) m)            the weighted tangent vectors at m
    out    (sum_i w_i |v_i|) (m cos r + g sin(r) / r) with r = |g| + eps: back onto the
           sphere from m, scaled to the weighted mean norm; plus the base when there is one

A single model is returned as it is. When the weighted mean of the unit vectors
has norm below eps (antipodal inputs that cancel), two models fall back to
w_0 v_0 + w_1 v_1; more models are an error, as in mergekit, except where every
v_i is exactly zero (a tensor no fine-tune changed), which returns the base
(mergekit stops with an error there).

Memory: the whole tensor; the n inputs are stacked, plus their unit and tangent
vectors (about 3n tensors). Precision: in float16 and bfloat16 the whole
computation runs in float32 and is rounded once (mergekit's 1e-8 is 0 in
float16, so a zero task vector or a zero tangent gives 0/0 = NaN there).
Goddard 2024, "Multi-SLERP" (https://goddard.blog/posts/multislerp-wow-what-a-cool-idea).
"""

from __future__ import annotations

import torch

from weightspace.errors import InputError, SpecError
from weightspace.merges._precision import working_dtype
from weightspace.methods import MergeMethod, Param, TensorParams, register


def multislerp(
    tensors: list[torch.Tensor],
    weights: list[float],
    base: torch.Tensor | None = None,
    *,
    normalize_weights: bool = True,
    eps: float = 1e-8,
    name: str = "",
) -> torch.Tensor:
    """The weighted spherical average of `tensors` (of their task vectors with `base`).

    >>> multislerp([torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])], [0.5, 0.5])
    tensor([0.7071, 0.7071])
    """
    if len(tensors) == 1:
        return tensors[0]
    dtype = tensors[0].dtype
    wd = working_dtype(dtype)
    stacked = torch.stack([x.to(wd) for x in tensors], dim=0)
    b = base.to(wd) if base is not None else None
    if b is not None:
        stacked -= b
    flat = stacked.view(stacked.shape[0], -1)
    w = torch.tensor(weights, dtype=wd, device=flat.device)
    if normalize_weights:
        w = w / w.sum()
    norms = torch.norm(flat, dim=-1, keepdim=True)
    units = flat / (norms + eps)
    mean = (units * w.view(-1, 1)).sum(0)
    mean_norm = torch.norm(mean)
    if mean_norm < eps:
        if len(tensors) == 2:  # mergekit's fallback: the weighted sum
            out = stacked[0] * w[0] + stacked[1] * w[1]
        elif bool((norms == 0).all()):  # every v_i is zero, so is any weighted sum
            out = torch.zeros_like(stacked[0])
        else:
            raise InputError(
                f"multislerp: tensor {name!r}: the weighted mean of the models' directions is zero "
                "(antipodal tensors whose weights cancel, or zero weights); change the weights"
            )
        return (out if b is None else out + b).to(dtype)
    mean = mean / mean_norm
    dots = (units * mean).sum(-1, keepdim=True)
    tangents = units - dots * mean
    tangent = (tangents * w.view(-1, 1)).sum(0)
    tangent_norm = torch.norm(tangent) + eps
    out = mean * torch.cos(tangent_norm) + tangent * (torch.sin(tangent_norm) / tangent_norm)
    out = out * (norms.squeeze(-1) * w).sum()
    out = out.view(stacked.shape[1:])
    if b is not None:
        out = out + b
    return out.to(dtype)


@register
class MultiSlerp(MergeMethod):
    name = "multislerp"
    pretty_name = "Multi-SLERP"
    paper = "Goddard 2024, Multi-SLERP (blog post): barycentric interpolation on the hypersphere"
    reference_url = "https://goddard.blog/posts/multislerp-wow-what-a-cool-idea"
    uses_base = "optional"
    global_params = (
        Param("normalize_weights", default=True, kind=bool, doc="divide the weights by their sum"),
        Param("eps", default=1e-8, gt=0.0,
              doc="added to norms before dividing; a mean direction shorter than it counts as zero"),
    )
    model_params = (Param("weight", required=True, doc="weight of this model"),)
    min_models = 1

    def check_params(self, params: TensorParams, where: list[str]) -> None:
        weights = params.model_values("weight")
        if len(weights) > 1 and params["normalize_weights"] and sum(weights) == 0:
            raise SpecError(f"{', '.join(where)}: multislerp: the weights sum to 0, so they cannot "
                            "be normalized; change the weights or set normalize_weights: false")

    def merge(
        self,
        name: str,
        base: torch.Tensor | None,
        tensors: list[torch.Tensor],
        params: TensorParams,
        companions: dict[str, list[torch.Tensor]],
    ) -> torch.Tensor:
        return multislerp(tensors, params.model_values("weight"), base,
                          normalize_weights=params["normalize_weights"], eps=params["eps"], name=name)
