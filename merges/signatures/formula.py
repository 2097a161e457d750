"""The robust weight signature of one tensor: the part of the robust change orthogonal to the
clean change.

    rws = robust_weight_signature(theta_c - theta_pre, theta_std - theta_pre)
"""

from __future__ import annotations

import torch


def robust_weight_signature(d_robust: torch.Tensor, d_clean: torch.Tensor) -> torch.Tensor:
    """RWS = d_robust - (<d_robust, d_clean> / <d_clean, d_clean>) d_clean, over flattened tensors.

        robust_weight_signature(theta_c - theta_pre, theta_std - theta_pre)

    Inner products in float64; the result is float32 and orthogonal to `d_clean`.
    A zero `d_clean` leaves `d_robust` unchanged.
    """
    dc = d_robust.detach().to(torch.float64)
    ds = d_clean.detach().to(torch.float64)
    ss = float(torch.dot(ds.reshape(-1), ds.reshape(-1)))
    if ss == 0.0:
        return dc.to(torch.float32)
    coef = float(torch.dot(dc.reshape(-1), ds.reshape(-1))) / ss
    return (dc - coef * ds).to(torch.float32)
