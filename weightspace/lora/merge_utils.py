"""peft's merge_utils as pure tensor functions: the combinations `wsmerge lora merge` applies to
one module's factors (or dense deltas) across adapters (see weightspace.lora.combine).

    combine_tensors("ties", [a, b], torch.tensor([0.7, 0.3]), density=0.5)

peft/utils/merge_utils.py and peft/tuners/lora/model.py, computed as peft computes them; only
DARE's masks differ: drawn per tensor from a generator seeded by (seed, key) (`dare_mask`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import torch


def magnitude_based_pruning(tensor: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the int(density * numel) entries of largest magnitude, zero the rest."""
    mask = torch.zeros_like(tensor).reshape(-1)
    k = int(density * tensor.numel())
    top_k = torch.topk(tensor.abs().reshape(-1), k=k, largest=True)
    mask[top_k[1]] = 1
    return tensor * mask.reshape(tensor.shape)


def random_pruning(tensor: torch.Tensor, density: float, mask: torch.Tensor) -> torch.Tensor:
    """DARE: keep the entries `mask` (Bernoulli(density)) keeps, rescaled by 1 / density."""
    return tensor * mask / density


def dare_mask(seed: int, key: str, tensor: torch.Tensor, density: float) -> torch.Tensor:
    """The Bernoulli(density) mask of one tensor, from a generator seeded by (seed, key)."""
    digest = hashlib.sha256(f"{seed}\0{key}".encode()).digest()
    g = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
    full = torch.full(tuple(tensor.shape), density, dtype=tensor.dtype)
    return torch.bernoulli(full, generator=g).to(tensor.device)


def majority_sign_mask(stacked: torch.Tensor, method: str = "total") -> torch.Tensor:
    """TIES's sign election over the stacked (dim 0) tensors: total mass or count of signs."""
    sign = stacked.sign()
    magnitude = stacked.sum(dim=0) if method == "total" else sign.sum(dim=0)
    return sign == torch.where(magnitude >= 0, 1, -1)


def disjoint_merge(stacked: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of the entries that agree with the elected sign."""
    return (stacked * mask).sum(dim=0) / torch.clamp(mask.sum(dim=0), min=1.0)


def _weighted(stacked: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    return stacked * weights.view(weights.shape + (1,) * (stacked.dim() - weights.dim()))


def combine_tensors(kind: str, tensors: list[torch.Tensor], weights: torch.Tensor, *,
                    density: float | None = None, majority_sign_method: str = "total",
                    masks: Callable[[int, torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """One of peft's task-arithmetic combinations (`kind` without its `_svd`) of `tensors`.

        combine_tensors("linear", [a, b], torch.tensor([0.7, 0.3]))    # 0.7 a + 0.3 b
        combine_tensors("ties", ts, w, density=0.5)                     # prune, elect, disjoint mean

    `masks(i, tensor)` gives DARE's mask for the i-th tensor (see `dare_mask`). As in peft, a
    density of 1 or more prunes nothing.
    """
    kind = {"svd": "linear"}.get(kind, kind)
    if kind in ("ties", "magnitude_prune") and density < 1:
        tensors = [magnitude_based_pruning(t, density) for t in tensors]
    elif kind in ("dare_linear", "dare_ties") and density < 1:
        tensors = [random_pruning(t, density, masks(i, t)) for i, t in enumerate(tensors)]
    stacked = torch.stack(tensors, dim=0)
    if kind in ("ties", "dare_ties"):
        mask = majority_sign_mask(stacked, majority_sign_method)
        return disjoint_merge(_weighted(stacked, weights), mask)
    return _weighted(stacked, weights).sum(dim=0)


__all__ = ["combine_tensors", "dare_mask", "disjoint_merge", "magnitude_based_pruning",
           "majority_sign_mask", "random_pruning"]
