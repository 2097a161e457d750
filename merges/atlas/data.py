"""The examples aTLAS coefficients learn from: few-shot selection, augmentation, batch checks.

    x5, y5 = few_shot(task.val.x, task.val.y, k=5, seed=0)      # 5 per class
    batches = oversampled_batches(x5, y5, batch_size=128, seed=0)  # the authors' >= 10 batches an epoch
    x_aug = crop_flip(x, generator)                             # the authors' strong view of images
    data = [batch_to(b, device, i) for i, b in enumerate(batches)]
    examples = check_data(adapter, data, "supervised")          # refuses no data, or no labels
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F

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


def oversampled_batches(x: torch.Tensor, y: torch.Tensor, batch_size: int = 128, seed: int = 0,
                        min_batches: int = 10) -> list[dict[str, torch.Tensor]]:
    """Few-shot examples repeated until an epoch has more than `min_batches` batches, shuffled
    once (seeded), as batches of `batch_size`: the authors' rule in src/learn_few_shots.py
    (r = examples / batch size; when r < 10 the examples are repeated int(10 / r) + 1 times).

        batches = oversampled_batches(*few_shot(val.x, val.y, k=4), batch_size=128)
    """
    if batch_size < 1:
        raise SpecError(f"batch_size must be at least 1, got {batch_size}")
    n = int(y.shape[0])
    if n == 0:
        raise InputError("few-shot: there are no examples")
    r = n / batch_size
    repeat = int(min_batches / r) + 1 if r < min_batches else 1
    idx = torch.arange(n).repeat(repeat)
    idx = idx[torch.randperm(idx.numel(), generator=torch.Generator().manual_seed(seed))]
    return [{"x": x[idx[i:i + batch_size]], "y": y[idx[i:i + batch_size]]}
            for i in range(0, idx.numel(), batch_size)]


Augment = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


def crop_flip(x: torch.Tensor, gen: torch.Generator, scale: tuple[float, float] = (0.5, 1.0),
              ratio: tuple[float, float] = (3 / 4, 4 / 3), flip: float = 0.5) -> torch.Tensor:
    """A random resized crop and a horizontal flip of every image in `x` (B, C, H, W), seeded.

        strong = crop_flip(batch["x"], torch.Generator().manual_seed(0))

    The authors' augmentation for few-shot learning and UFM's strong view (src/learn_ufm.py,
    "TIP's more aggressive random crop with horizontal flip": torchvision RandomResizedCrop
    with scale (0.5, 1), bicubic, then RandomHorizontalFlip(0.5)). Each crop covers a
    fraction of the area drawn from `scale`, with an aspect ratio log-uniform in `ratio`
    (a side longer than the image is clipped to it, where torchvision draws again), and is
    resized back to H x W by bicubic sampling, clamped to the batch's value range (PIL's
    clipping).
    """
    if x.dim() != 4:
        raise InputError(f"crop_flip: expected images (B, C, H, W), got a tensor of shape {list(x.shape)}")
    b = x.shape[0]
    area = torch.empty(b).uniform_(scale[0], scale[1], generator=gen)
    log_r = torch.empty(b).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=gen)
    w = (area * log_r.exp()).sqrt().clamp(max=1.0)
    h = (area / log_r.exp()).sqrt().clamp(max=1.0)
    cx = (torch.rand(b, generator=gen) * 2 - 1) * (1 - w)
    cy = (torch.rand(b, generator=gen) * 2 - 1) * (1 - h)
    sign = torch.where(torch.rand(b, generator=gen) < flip, -1.0, 1.0)
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2] = w * sign, cx
    theta[:, 1, 1], theta[:, 1, 2] = h, cy
    theta = theta.to(device=x.device, dtype=torch.float32)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    out = F.grid_sample(x.float(), grid, mode="bicubic", padding_mode="border", align_corners=False)
    return out.clamp(float(x.min()), float(x.max())).to(x.dtype)


AUGMENTATIONS: dict[str, Augment] = {"crop-flip": crop_flip}


def resolve_augment(augment: str | Augment | None) -> Augment | None:
    """`augment` as a function of (x, generator): a name in AUGMENTATIONS, a function, or None."""
    if augment is None or callable(augment):
        return augment
    if augment not in AUGMENTATIONS:
        raise SpecError(f"augment: unknown {augment!r}; use {', '.join(AUGMENTATIONS)} or a function")
    return AUGMENTATIONS[augment]


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
    if objective == "ufm" and any("x" not in b for b in data):
        raise InputError("the ufm objective re-batches inputs 'x' (zoo-style batches {'x': ...}); "
                         f"a batch has keys {', '.join(next(b for b in data if 'x' not in b))}")
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
