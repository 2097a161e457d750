"""What aTLAS coefficients minimise: supervised, entropy, pseudo-label and UFM objectives.

    supervised_loss(logits, labels)            # cross-entropy where the label is not -100
    entropy_loss(logits)                       # mean Shannon entropy (AdaMerging's objective)
    pseudo_label_loss(logits, threshold=0.9)   # cross-entropy on the model's confident argmax
    ufm_loss(weak, strong, pseudo, trusted)    # the paper's test-time objective (two views)

Logits are (B, K, C), labels (B, K) with -100 where nothing is predicted (`ufm_loss` takes
one prediction per example: (B, C)). Each loss is None when no prediction counts; the batch
then gives no gradient.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import torch
import torch.nn.functional as F

from weightspace.binding import IGNORE_INDEX, Adapter

Objective = Literal["supervised", "entropy", "pseudo-label", "ufm"]
OBJECTIVES = ("supervised", "entropy", "pseudo-label", "ufm")
# objectives that learn without labels (test-time adaptation)
UNSUPERVISED = ("entropy", "pseudo-label", "ufm")


def _at_least_float32(x: torch.Tensor) -> torch.Tensor:
    """Logits of a 16-bit model in float32 for the loss; a float64 model's stay float64."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def supervised_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor | None:
    """Mean cross-entropy over the predictions whose label is not -100; None if there are none."""
    keep = labels != IGNORE_INDEX
    if not bool(keep.any()):
        return None
    return F.cross_entropy(_at_least_float32(logits[keep]), labels[keep].long())


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


def ufm_loss(weak: torch.Tensor, strong: torch.Tensor, pseudo: torch.Tensor, trusted: torch.Tensor,
             threshold: float = 0.99) -> torch.Tensor | None:
    """Unsupervised FixMatch (UFM), aTLAS's test-time objective, on one batch.

        ufm_loss(weak, strong, pseudo, trusted, threshold=0.99)   # weak, strong: (B, C) logits

    As `ssl_loss_trusted` in the authors' src/learn_ufm.py: the target of an example is the
    softmax of its weak (unaugmented) view, without gradient, or, for a trusted example, the
    one-hot of its fixed pseudo-label `pseudo` (the zero-shot model's argmax); an example
    counts when its target's largest probability exceeds `threshold` (trusted ones always
    do); the loss is the cross-entropy of the strong (augmented) view against the (soft)
    target, summed over the counted examples and divided by their number. (The authors'
    "sharpening", probabilities times 0.5 and renormalised, changes nothing and is left out.)
    None when no example counts.
    """
    with torch.no_grad():
        target = torch.softmax(weak.detach().float(), -1)
        trusted = trusted.bool()
        if bool(trusted.any()):
            target[trusted] = F.one_hot(pseudo[trusted].long(), target.shape[-1]).float()
        w = (target.max(-1).values > threshold).float()
    if not bool(w.any()):
        return None
    ce = F.cross_entropy(strong.float(), target, reduction="none")
    return (ce * w).sum() / w.sum()


def objective_loss(adapter: Adapter, objective: str, logits: torch.Tensor,
                   batch: Mapping[str, torch.Tensor], threshold: float) -> torch.Tensor | None:
    """The loss `objective` names for one batch's logits; labels of -100 are left out."""
    labels = adapter.labels_or_none(batch)
    if objective == "supervised":
        return supervised_loss(logits, labels)
    valid = None if labels is None else labels != IGNORE_INDEX
    if objective == "entropy":
        return entropy_loss(logits, valid)
    if objective == "pseudo-label":
        return pseudo_label_loss(logits, threshold, valid)
    raise ValueError(f"objective {objective!r} is computed by its own loss (ufm: two views)")
