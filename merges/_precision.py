"""Which dtype the reductions and divisions of a merge run in.

    >>> working_dtype(torch.float16), working_dtype(torch.float64)
    (torch.float32, torch.float64)

A spec's `dtype: float16` (or bfloat16) is the dtype tensors are read and merged
in, but a norm, a dot product, a variance or a softmax taken in float16 loses
what the method needs: squares of task-vector entries below ~2.4e-4 underflow
to zero, a dot product near 1 has a resolution of 2^-11 (so angles between
nearly parallel tensors jump in steps of ~0.03 rad), and an epsilon such as
1e-8 is 0 in float16, so `x / (norm + 1e-8)` is 0/0 for a zero tensor. The
methods that reduce or divide therefore work in `working_dtype` and cast the
result back; float64 stays float64.
"""

from __future__ import annotations

import torch


def working_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64 inputs, float32 for every other floating dtype."""
    return torch.float64 if dtype == torch.float64 else torch.float32


__all__ = ["working_dtype"]
