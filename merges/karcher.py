"""Karcher mean: the point on the unit hypersphere that minimizes the summed
squared angles to the models' directions, scaled by their mean norm.

    merge_method: karcher
    models: [{model: ./ft_a}, {model: ./ft_b}, {model: ./ft_c}]
    parameters: {max_iter: 10, tol: 1.0e-5}

Every model counts equally; `base_model`, if given, is one more model (as in
mergekit, which adds a base_model not listed among the models to the inputs of
every method, last); a base listed among the models keeps its place.
Per tensor, each flattened to one vector x_i (mergekit 0.1.5's `karcher`):

    u_i     x_i / |x_i|; models with |x_i| <= tol take no part in the direction
            (all of them: the result is zero)
    m       the normalized mean of the u_i that take part (u_0 when it is shorter than tol)
    repeat  max_iter times, or until |g| < tol:
              g = sum_i a_i (theta_i / sin theta_i) (u_i - cos(theta_i) m), theta_i = angle(m, u_i),
                  skipping theta_i < tol (a_i: 1 / the number taking part)
              m <- normalize(m cos|g| + (g / |g|) sin|g|)
    out     (sum_i |x_i| / n) m, the mean of all n norms

A single model is returned as it is. `tol` must be > 0: angles below it are
skipped, and at 0 the ratio theta / sin theta would be 0/0.

Memory: the whole tensor; n unit vectors, the mean and the tangent (n + 3
tensors, in float32 for float16/bfloat16 inputs). Precision: in float16 and
bfloat16 everything is computed in float32 and rounded once (mergekit keeps the
unit vectors and dot products in float16, where cos theta near 1 has a
resolution of 2^-11, so theta moves in steps of ~0.03 rad).
Wang, Ye and Yin 2026, "Functionality-Oriented LLM Merging on the Fisher-Rao
Manifold" (arXiv:2603.04972).
"""

from __future__ import annotations

import torch

from weightspace.merges._precision import working_dtype
from weightspace.methods import MergeMethod, Param, TensorParams, register


def karcher_mean(tensors: list[torch.Tensor], max_iter: int = 10, tol: float = 1e-5) -> torch.Tensor:
    """The equally weighted Karcher mean of `tensors` (see the module docstring).

    >>> karcher_mean([torch.tensor([2.0, 0.0]), torch.tensor([0.0, 2.0])])
    tensor([1.4142, 1.4142])
    """
    if len(tensors) == 1:
        return tensors[0]
    dtype = tensors[0].dtype
    wd = working_dtype(dtype)
    xs = [x.to(wd) for x in tensors]
    alphas = [1.0 / len(xs)] * len(xs)
    norms = [torch.linalg.vector_norm(x) for x in xs]
    units = [torch.zeros_like(x) if norm.item() == 0.0 else x / norm for x, norm in zip(xs, norms)]
    taking_part = [i for i, norm in enumerate(norms) if norm.item() > tol]
    if not taking_part:
        return torch.zeros_like(tensors[0])
    total = sum(alphas[i] for i in taking_part)
    part_alphas = [alphas[i] / total for i in taking_part]
    part_units = [units[i] for i in taking_part]

    mean = torch.zeros_like(part_units[0])
    for alpha, unit in zip(part_alphas, part_units):
        mean += alpha * unit
    mean_norm = torch.linalg.vector_norm(mean)
    mean = part_units[0].clone() if mean_norm.item() < tol else mean / mean_norm

    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for alpha, unit in zip(part_alphas, part_units):
            dot = torch.clamp(torch.dot(mean.flatten(), unit.flatten()), -1.0, 1.0)
            theta = torch.arccos(dot)
            if theta.item() < tol:
                continue
            tangent += alpha * (theta / torch.sin(theta)) * (unit - dot * mean)
        tangent_norm = torch.linalg.vector_norm(tangent)
        if tangent_norm.item() < tol:
            break
        mean = torch.cos(tangent_norm) * mean + torch.sin(tangent_norm) * (tangent / tangent_norm)
        unit_norm = torch.linalg.vector_norm(mean)
        if unit_norm.item() > tol:
            mean = mean / unit_norm

    scale = sum(alpha * norm for alpha, norm in zip(alphas, norms))
    return (scale * mean).to(dtype)


@register
class Karcher(MergeMethod):
    name = "karcher"
    pretty_name = "Karcher Mean"
    paper = "Wang, Ye and Yin 2026, Functionality-Oriented LLM Merging on the Fisher-Rao Manifold"
    reference_url = "https://arxiv.org/abs/2603.04972"
    # no base in the task-vector sense: the planner merges base_model as one more model
    uses_base = "none"
    global_params = (
        Param("max_iter", default=10, kind=int, ge=0, doc="most fixed-point iterations"),
        Param("tol", default=1e-5, gt=0.0,
              doc="stop when the tangent step is shorter; smaller angles and norms are skipped"),
    )
    min_models = 1

    def merge(
        self,
        name: str,
        base: torch.Tensor | None,
        tensors: list[torch.Tensor],
        params: TensorParams,
        companions: dict[str, list[torch.Tensor]],
    ) -> torch.Tensor:
        return karcher_mean(tensors, max_iter=params["max_iter"], tol=params["tol"])
