"""The teacher's side of training a gene: its data, the distillation loss, and scoring against chance.

    loss, kd, ce = distillation_loss(student_logits, teacher_logits, labels, temperature=2.0, alpha=0.5)
    loss, kd, ce = distillation_loss(s, t, None, temperature=1.0, alpha=1.0, kd_reduction="mean")  # authors

`_Distillation` binds a teacher (an Adapter, or a classifier module) and its batches
on one device; `train_gene` asks it for the loss of a step and for the loss and
accuracy of the auxiliary network before and after training.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from weightspace.binding import IGNORE_INDEX, Adapter, ClassifierAdapter, top1_counts
from weightspace.errors import InputError, SpecError

KD_REDUCTIONS = ("batchmean", "mean")


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor | None, *,
                      temperature: float = 2.0, alpha: float = 0.5, kd_reduction: str = "batchmean"
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """alpha * kd + (1 - alpha) * CE(student, labels), kd = T^2 KL(softmax(teacher/T) || softmax(student/T)).

    Logits (B, K, C) with labels (B, K) (IGNORE_INDEX positions left out). `kd_reduction`
    says what the summed KL is divided by:

    - "batchmean": the N predictions kept, so kd is the KL per prediction (Hinton et al.;
      torch's `kl_div(reduction="batchmean")`);
    - "mean": N * C, every logit, as the authors' code does (TLEG and SWS `losses.py`,
      `DistillationLoss.forward`, taken from DeiT: `* (T * T) / outputs_kd.numel()`). Their
      kd is C times smaller, so at the same alpha the labels weigh C times more.

    Returns (loss, kd, ce); ce is None without labels (then alpha must be 1).
    """
    if kd_reduction not in KD_REDUCTIONS:
        raise SpecError(f"kd_reduction: unknown {kd_reduction!r}; use batchmean (the KL per prediction) "
                        f"or mean (divided by every logit, the authors' code)")
    c = student.shape[-1]
    s, t = student.reshape(-1, c).float(), teacher.reshape(-1, c).float()
    y = None
    if labels is not None:
        y = labels.reshape(-1)
        keep = y != IGNORE_INDEX
        s, t, y = s[keep], t[keep], y[keep]
    T = temperature
    count = s.shape[0] * (c if kd_reduction == "mean" else 1)
    kd = F.kl_div(F.log_softmax(s / T, -1), F.log_softmax(t / T, -1), log_target=True,
                  reduction="sum") * (T * T) / max(1, count)
    if y is None:
        return kd, kd, None
    ce = F.cross_entropy(s, y) if y.numel() else s.sum() * 0.0
    return alpha * kd + (1 - alpha) * ce, kd, ce


@dataclass
class _Distillation:
    """The teacher (its adapter and parameters on the device), the data, and the loss."""

    teacher: Adapter
    teacher_params: dict[str, torch.Tensor]
    data: list[dict[str, torch.Tensor]]
    temperature: float
    alpha: float
    kd_reduction: str = "batchmean"

    def forward(self, student: Adapter, params: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]):
        """(student logits, teacher logits, labels or None) for one batch."""
        with torch.no_grad():
            t_logits = self.teacher.logits(self.teacher_params, batch)
        return student.logits(params, batch), t_logits, self.teacher.labels_or_none(batch)

    def losses(self, s_logits: torch.Tensor, t_logits: torch.Tensor, labels: torch.Tensor | None):
        return distillation_loss(s_logits, t_logits, labels, temperature=self.temperature, alpha=self.alpha,
                                 kd_reduction=self.kd_reduction)

    def evaluate(self, student: Adapter, compose: Callable[[], dict[str, torch.Tensor]]
                 ) -> dict[str, float | None]:
        """loss, kd, ce (means over the batches), accuracy and the chance rate of the student
        with the parameters `compose()` returns, without gradients."""
        with torch.no_grad():
            p = compose()
            outs = [self.forward(student, p, b) for b in self.data]
            parts = [self.losses(*o) for o in outs]
            hits = [_hits(*o) for o in outs]

        def mean(k: int) -> float | None:
            if parts[0][k] is None:
                return None
            return float(torch.stack([x[k] for x in parts]).mean())

        return {"loss": mean(0), "kd": mean(1), "ce": mean(2),
                "acc": sum(h for h, _ in hits) / max(1, sum(n for _, n in hits)),
                "chance": _chance([_targets(t, y) for _, t, y in outs])}


def _bind_teacher(teacher: Any, batches: Iterable[Mapping[str, Any]], *, temperature: float, alpha: float,
                  device: torch.device, kd_reduction: str = "batchmean") -> _Distillation:
    """The teacher's adapter and parameters and the batches, on `device`; labels checked when
    the loss needs them (alpha < 1)."""
    t_adapter, t_params = _teacher_of(teacher)
    t_params = {k: v.to(device) for k, v in t_params.items()}
    data = _batches(batches, device)
    if alpha < 1 and any(t_adapter.labels_or_none(b) is None for b in data):
        raise InputError("train_gene: a batch has no labels; use alpha=1 (distillation only) or labelled data")
    return _Distillation(t_adapter, t_params, data, temperature, alpha, kd_reduction)


def _targets(t_logits: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
    """What the student is scored against: the labels, else the teacher's predictions."""
    return labels if labels is not None else t_logits.argmax(-1)


def _hits(s_logits: torch.Tensor, t_logits: torch.Tensor, labels: torch.Tensor | None) -> tuple[int, int]:
    """(correct, counted) top-1 predictions of the student in one batch; IGNORE_INDEX is skipped."""
    return top1_counts(s_logits, _targets(t_logits, labels))


def _chance(targets: list[torch.Tensor]) -> float:
    """The accuracy of always predicting the most common target: the chance rate to beat."""
    y = torch.cat([t.reshape(-1) for t in targets])
    y = y[y != IGNORE_INDEX]
    return float(torch.bincount(y).max()) / max(1, y.numel()) if y.numel() else 0.0


def _teacher_of(teacher: Any) -> tuple[Adapter, dict[str, torch.Tensor]]:
    params = None
    if isinstance(teacher, tuple) and len(teacher) == 2:
        teacher, params = teacher
    if isinstance(teacher, nn.Module):
        teacher = ClassifierAdapter(teacher)
    if not isinstance(teacher, Adapter):
        raise SpecError(f"teacher: expected an Adapter, a module, or (adapter or module, params), "
                        f"got {type(teacher).__name__}")
    p = dict(params) if params is not None else teacher.params()
    return teacher, {k: v.detach() for k, v in p.items()}


def _batches(batches: Iterable[Mapping[str, Any]], device: torch.device) -> list[dict[str, torch.Tensor]]:
    out = []
    for i, b in enumerate(batches):
        if not isinstance(b, Mapping):
            raise InputError(f"train_gene: batch {i} must be a dict of tensors, got {type(b).__name__}")
        t = {k: v.to(device) for k, v in b.items() if isinstance(v, torch.Tensor)}
        if not t:
            raise InputError(f"train_gene: batch {i} holds no tensors")
        out.append(t)
    if not out:
        raise InputError("train_gene: no data (the batches are empty)")
    return out
