"""Which task vectors aTLAS trains under a budget: the ones the objective is most sensitive to.

    mask, info = select_budget(loss_of, data, (T, B, P), budget=2, mode="vectors", names=names,
                               device=device)             # mask (T, B): 1 = trained, 0 = fixed at 0

|dL/dlambda| summed over one pass over the data at lambda = 0 scores each coefficient;
"vectors" keeps the `budget` task vectors with the best mean score over blocks, "blocks"
the best `budget` task vectors of each block.
"""

from __future__ import annotations

from typing import Any

import torch

BUDGET_MODES = ("vectors", "blocks")


def select_budget(loss_of, data: list, shape: tuple[int, int, int], budget: int, mode: str,
                  names: list[str], device: torch.device) -> tuple[torch.Tensor, dict]:
    """Score |dL/dlambda| at 0 over one pass and keep the best task vectors: mask (T, B or 1)."""
    T, Bc, _ = shape
    zero = torch.zeros(shape, device=device, requires_grad=True)
    total = torch.zeros(shape, device=device)
    for b in data:
        loss = loss_of(zero, b)
        if loss is not None:
            (g,) = torch.autograd.grad(loss, zero)
            total += g
    scores = total.abs().mean(-1)  # (T, Bc)
    mask = torch.zeros(T, Bc, device=device)
    info: dict[str, Any] = {"mode": mode, "budget": budget}
    if mode == "vectors":
        per_task = scores.mean(1)
        keep = torch.argsort(-per_task.cpu(), stable=True)[:budget].sort().values
        mask[keep] = 1.0
        info["scores"] = [float(s) for s in per_task]
        info["selected"] = [names[i] for i in keep.tolist()]
    else:
        keep = torch.argsort(-scores.cpu(), dim=0, stable=True)[:budget]  # (b, Bc)
        mask.scatter_(0, keep.to(device), 1.0)
        info["selected_per_block"] = keep.sort(0).values.T.tolist()
    return mask, info
