"""SLERP: spherical linear interpolation between the base and one other model.

    merge_method: slerp
    base_model: ./ft_a
    models: [{model: ./ft_a}, {model: ./ft_b}]
    parameters: {t: 0.5}

The angle is measured between the whole tensors seen as vectors (normalized
copies); the interpolation is applied to the originals, so norms are blended,
not forced to one. Nearly colinear tensors fall back to linear interpolation.
Shoemake 1985, "Animating Rotation with Quaternion Curves".
"""

from __future__ import annotations

import math

import torch

from weightspace.methods import MergeMethod, Param, TensorParams, register

# Above this |cos(angle)| the tensors count as colinear and are lerped (mergekit's value).
DOT_THRESHOLD = 0.9995
NORM_EPS = 1e-8


def _dot_dtype(x: torch.Tensor) -> torch.dtype:
    return x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32


def slerp(t: float, v0: torch.Tensor, v1: torch.Tensor) -> torch.Tensor:
    """Interpolate from `v0` (t=0) to `v1` (t=1) along the great circle.

    >>> slerp(0.5, torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]))
    tensor([0.7071, 0.7071])
    """
    dtype = _dot_dtype(v0)
    a = v0.reshape(-1).to(dtype)
    b = v1.reshape(-1).to(dtype)
    na, nb = float(torch.linalg.vector_norm(a)), float(torch.linalg.vector_norm(b))
    # A (near-)zero tensor is left unnormalized, as mergekit does.
    na = na if na > NORM_EPS else 1.0
    nb = nb if nb > NORM_EPS else 1.0
    dot = float(torch.dot(a, b)) / (na * nb)
    if abs(dot) > DOT_THRESHOLD:
        return (1 - t) * v0 + t * v1
    theta = math.acos(dot)
    sin_theta = math.sin(theta)
    s0 = math.sin(theta - theta * t) / sin_theta
    s1 = math.sin(theta * t) / sin_theta
    return s0 * v0 + s1 * v1


@register
class Slerp(MergeMethod):
    name = "slerp"
    pretty_name = "SLERP"
    paper = "Shoemake 1985, Animating Rotation with Quaternion Curves"
    reference_url = "https://doi.org/10.1145/325165.325242"
    uses_base = "required"
    global_params = (
        Param("t", required=True, ge=0.0, le=1.0,
              doc="interpolation factor: 0 gives the base, 1 the other model"),
    )
    min_models = 1
    max_models = 1

    def merge(
        self,
        name: str,
        base: torch.Tensor | None,
        tensors: list[torch.Tensor],
        params: TensorParams,
        companions: dict[str, list[torch.Tensor]],
    ) -> torch.Tensor:
        assert base is not None, "the planner supplies the base for uses_base='required'"
        return slerp(params["t"], base, tensors[0])
