"""The examples aTLAS coefficients learn from: few-shot selection and batch checks.

    x5, y5 = few_shot(task.val.x, task.val.y, k=5, seed=0)      # 5 per class
    data = [batch_to(b, device, i) for i, b in enumerate(batches)]
    examples = check_data(adapter, data, "supervised")          # refuses no data, or no labels
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from weightspace.binding import IGNORE_INDEX, Adapter
from weightspace.errors import InputError, SpecError


def few_shot(x: torch.Tensor, y: torch.Tensor, k: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """k examples of every class in `y`, drawn with a seeded generator: (x_k, y_k), by class.

        x5, y5 = few_shot(task.val.x, task.val.y, k=5, seed=0)      # 5 per class
    """
    if not isinstance(k, int) or k < 1:
        raise SpecError(f"few-shot: k must be a positive integer, got {k!r}")
    if y.dim() != 1 or x.shape[0] != y.shape[0]:
        raise InputError(f"few-shot: need labels (N,) for inputs (N, ...), got {list(y.shape)} "
                         f"and {list(x.shape)}")
    if y.numel() == 0:
        raise InputError("few-shot: there are no examples")
    gen = torch.Generator().manual_seed(seed)
    keep = []
    for c in torch.unique(y).tolist():
        idx = torch.nonzero(y == c).flatten()
        if k > idx.numel():
            raise InputError(f"few-shot: k={k} is larger than the {idx.numel()} examples of class {c}")
        keep.append(idx[torch.randperm(idx.numel(), generator=gen)[:k]].sort().values)
    sel = torch.cat(keep)
    return x[sel], y[sel]


def batch_to(batch: Any, device: torch.device, i: int) -> dict[str, torch.Tensor]:
    """Batch `i`'s tensors on `device`; anything but a dict holding tensors is refused."""
    if not isinstance(batch, Mapping):
        raise InputError(f"learn_coefficients: batch {i} must be a dict of tensors, got {type(batch).__name__}")
    out = {k: v.to(device) for k, v in batch.items() if isinstance(v, torch.Tensor)}
    if not out:
        raise InputError(f"learn_coefficients: batch {i} holds no tensors")
    return out


def _size(batch: Mapping[str, torch.Tensor]) -> int:
    v = next(iter(batch.values()))
    return int(v.shape[0]) if v.dim() else 1


def check_data(adapter: Adapter, data: list[dict[str, torch.Tensor]], objective: str) -> int:
    """The number of examples; refuses no data, or no labels for the supervised objective."""
    if not data:
        raise InputError("learn_coefficients: no data (the batches are empty)")
    examples = sum(_size(b) for b in data)
    if examples == 0:
        raise InputError("learn_coefficients: no data (every batch is empty)")
    if objective == "supervised":
        labelled = 0
        for b in data:
            y = adapter.labels_or_none(b)
            if y is None:
                raise InputError(f"the supervised objective needs labels, and a batch has none "
                                 f"(keys: {', '.join(b)}); use objective entropy or pseudo-label")
            labelled += int((y != IGNORE_INDEX).sum())
        if labelled == 0:
            raise InputError("learn_coefficients: the data has no labelled examples (every label is -100)")
    return examples
