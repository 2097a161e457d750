"""What aTLAS coefficients minimise: supervised, entropy and pseudo-label objectives.

    supervised_loss(logits, labels)            # cross-entropy where the label is not -100
    entropy_loss(logits)                       # mean Shannon entropy (AdaMerging's objective)
    pseudo_label_loss(logits, threshold=0.9)   # cross-entropy on the model's confident argmax

Logits are (B, K, C), labels (B, K) with -100 where nothing is predicted. Each loss is
None when no prediction counts; the batch then gives no gradient.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import torch
import torch.nn.functional as F

from weightspace.binding import IGNORE_INDEX, Adapter

Objective = Literal["supervised", "entropy", "pseudo-label"]
OBJECTIVES = ("supervised", "entropy", "pseudo-label")


def supervised_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor | None:
    """Mean cross-entropy over the predictions whose label is not -100; None if there are none."""
    keep = labels != IGNORE_INDEX
    if not bool(keep.any()):
        return None
    return F.cross_entropy(logits[keep].float(), labels[keep].long())


def entropy_loss(logits: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor | None:
    """Mean Shannon entropy (nats) of the predicted distributions (where `valid`); None if none."""
    logp = torch.log_softmax(logits.float(), -1)
    h = -(logp.exp() * logp).sum(-1)
    if valid is not None:
        if not bool(valid.any()):
            return None
        h = h[valid]
    return h.mean()


def pseudo_label_loss(logits: torch.Tensor, threshold: float = 0.9,
                      valid: torch.Tensor | None = None) -> torch.Tensor | None:
    """Cross-entropy against the model's own argmax, over confident predictions only.

        pseudo_label_loss(torch.tensor([[[4.0, 0.0]], [[0.1, 0.0]]]), threshold=0.9)
        # only the first example counts: its max probability is 0.98, the second's 0.52

    The pseudo-labels and confidences come from the logits without gradient. Predictions
    whose max probability is below `threshold` (or not `valid`) are masked out; None when
    none is left (the batch then gives no gradient).
    """
    with torch.no_grad():
        conf, target = torch.softmax(logits.detach().float(), -1).max(-1)
        keep = conf >= threshold
        if valid is not None:
            keep &= valid
    if not bool(keep.any()):
        return None
    return F.cross_entropy(logits[keep].float(), target[keep])


def objective_loss(adapter: Adapter, objective: str, logits: torch.Tensor,
                   batch: Mapping[str, torch.Tensor], threshold: float) -> torch.Tensor | None:
    """The loss `objective` names for one batch's logits; labels of -100 are left out."""
    labels = adapter.labels_or_none(batch)
    if objective == "supervised":
        return supervised_loss(logits, labels)
    valid = None if labels is None else labels != IGNORE_INDEX
    if objective == "entropy":
        return entropy_loss(logits, valid)
    return pseudo_label_loss(logits, threshold, valid)
