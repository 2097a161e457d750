"""NearSwap: take the other model's value where it is near the base's, keep the
base's where they are far apart, and blend in between.

    merge_method: nearswap
    base_model: ./base
    models: [{model: ./base}, {model: ./ft_a}]
    parameters: {t: 0.0001}

Entry by entry, with a the base and b the other model (mergekit 0.1.5's `nearswap`):

    w    = clamp(t / max(|a - b|, 1e-6), 0, 1)      1 where |a - b| <= t
    out  = w b + (1 - w) a

Elementwise, so large tensors stream in row blocks. Precision: in float16
and bfloat16 it is computed in float32 and rounded once. (mergekit divides
in float16, where t / x is t * (1/x) and 1/x overflows to Inf below
x = 1.5e-5: t = 0 then gives 0 * Inf = NaN there, and any t below 1.5e-5 gets
weight 1 instead of t / x.)
alchemonaut 2024, QuartetAnemoi-70B-t0.0001 (model card, Hugging Face).
"""

from __future__ import annotations

import torch

from weightspace.merges._precision import working_dtype
from weightspace.methods import MergeMethod, Param, TensorParams, register

DIFF_FLOOR = 1e-6  # |a - b| is clamped to at least this before dividing (mergekit's value)


def nearswap(base: torch.Tensor, other: torch.Tensor, t: float) -> torch.Tensor:
    """w * other + (1 - w) * base with w = clamp(t / max(|base - other|, 1e-6), 0, 1).

    >>> nearswap(torch.tensor([0.0, 0.0, 0.0]), torch.tensor([0.1, 0.2, 0.4]), 0.2)
    tensor([0.1000, 0.2000, 0.2000])
    """
    wd = working_dtype(base.dtype)
    a, b = base.to(wd), other.to(wd)
    weight = (t / torch.abs(a - b).clamp(min=DIFF_FLOOR)).clamp(min=0, max=1)
    return (weight * b + (1 - weight) * a).to(base.dtype)


@register
class NearSwap(MergeMethod):
    elementwise = True
    name = "nearswap"
    pretty_name = "NearSwap"
    paper = "alchemonaut 2024, QuartetAnemoi-70B-t0.0001 (model card)"
    reference_url = "https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001"
    uses_base = "required"
    global_params = (
        Param("t", required=True, ge=0.0,
              doc="distance below which the other model's value is taken whole; farther entries "
                  "get weight t / |base - other|"),
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
        return nearswap(base, tensors[0], params["t"])
