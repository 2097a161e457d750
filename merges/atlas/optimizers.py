"""How aTLAS fits its coefficients: AdamW on them alone, or a gradient-free (1+1)-ES.

    result = fit(loss_of, penalty_of, mask, batches, report, shape=(T, B, P), init=0.0, steps=200,
                 lr=1e-3, schedule="constant", gradient_free=False, weight_decay=0.1, clip=1.0,
                 select=None, seed=0, progress=False, device=device)
    result.lam, result.start, result.end                  # coefficients, objective before/after

`loss_of(lam, batch)` is the objective of the merged model on one batch (None when no
prediction counts), `penalty_of(lam)` the penalty on the coefficients, and `mask` (T, B or
1) is 0 where a coefficient stays fixed at 0. `batches` gives every step's batch
(`FixedBatches`: seeded random passes over the caller's batches; or UFM's stream), one
epoch being `batches.epoch_length` steps; `report` are the batches the objective is
reported on before and after. With `select` (a score of the coefficients, higher is
better) the coefficients are scored before the first step and after every epoch, and the
best are kept, as the authors keep their best epoch.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch

from weightspace.merges.atlas.data import Augment

SCHEDULES = ("constant", "cosine")


class FixedBatches:
    """The caller's batches, in seeded random passes (one pass is an epoch), each step's batch
    augmented with `augment` when given (a fresh draw every step)."""

    def __init__(self, data: list, gen: torch.Generator, augment: Augment | None = None):
        self.data, self.gen, self.augment = data, gen, augment
        self.epoch_length = len(data)
        self._order: list[int] = []

    def next(self) -> tuple[int | None, dict]:
        """(the batch's index, or None when augmented afresh; the batch)."""
        if not self._order:
            self._order.extend(torch.randperm(len(self.data), generator=self.gen).tolist())
        i = self._order.pop(0)
        if self.augment is None:
            return i, self.data[i]
        b = dict(self.data[i])
        b["x"] = self.augment(b["x"], self.gen)
        return None, b


@dataclass
class Fit:
    """What `fit` found: `lam` (T, B or 1, P), the mean objective over the report batches
    before and after, the per-step objective, the optimizer's settings, how many copies of
    the coefficients it held (value, gradient, moments), how many steps changed nothing
    (no batch loss), and the selection record (None without `select`)."""

    lam: torch.Tensor
    start: float | None
    end: float | None
    history: list[float | None]
    settings: dict
    state_copies: int
    skipped: int
    selection: dict | None


def fit(loss_of, penalty_of, mask: torch.Tensor, batches, report: list, *, shape: tuple[int, int, int],
        init: float, steps: int, lr: float, schedule: str, gradient_free: bool, weight_decay: float,
        clip: float | None, select: Callable[[torch.Tensor], float] | None, seed: int, progress: bool,
        device: torch.device, gen: torch.Generator | None = None) -> Fit:
    """Fit the coefficients from `init` for `steps` steps, by AdamW or (`gradient_free`) ES.

    With `gradient_free`, `lr` is the initial mutation scale and `schedule` does not apply.
    """
    gen = gen if gen is not None else torch.Generator().manual_seed(seed)  # ES mutations
    raw = torch.full(shape, float(init), device=device)
    lam_of = (lambda r: r * mask.unsqueeze(-1))  # noqa: E731 - fixed-at-0 coefficients
    with torch.no_grad():
        start = mean_objective(loss_of, lam_of(raw), report)
    history: list[float | None] = []
    keeper = _Best(select, lam_of(raw).detach(), batches.epoch_length, steps)
    bar = _progress_bar(progress, steps)
    try:
        if gradient_free:
            raw, settings = evolve(loss_of, penalty_of, lam_of, raw, mask, batches, steps, lr, gen,
                                   history, bar, keeper)
            state_copies = 2  # the parent and one candidate
        else:
            raw, settings = descend(loss_of, penalty_of, lam_of, raw, batches, steps, lr, schedule,
                                    weight_decay, clip, history, bar, keeper)
            state_copies = 4  # value, gradient, AdamW's two moments
    finally:
        if bar is not None:
            bar.close()
    lam = keeper.best if select is not None else lam_of(raw).detach()
    with torch.no_grad():
        end = mean_objective(loss_of, lam, report)
    skipped = sum(1 for h in history if h is None)
    return Fit(lam, start, end, history, settings, state_copies, skipped, keeper.record())


class _Best:
    """Best-epoch selection: the score before the first step is the one to beat (the authors
    start from the zero-shot accuracy); after every epoch, and after the last step, a strictly
    higher score replaces the kept coefficients."""

    def __init__(self, select, lam0: torch.Tensor, epoch_length: int, steps: int):
        self.select, self.epoch_length, self.steps = select, max(1, epoch_length), steps
        self.best = lam0.clone()
        self.scores: list[float] = []
        self.best_epoch = 0
        if select is not None:
            with torch.no_grad():
                self.scores.append(float(select(lam0)))

    def after_step(self, t: int, lam: torch.Tensor) -> None:
        if self.select is None or not ((t + 1) % self.epoch_length == 0 or t + 1 == self.steps):
            return
        with torch.no_grad():
            score = float(self.select(lam))
        self.scores.append(score)
        if score > max(self.scores[:-1]):
            self.best = lam.detach().clone()
            self.best_epoch = len(self.scores) - 1

    def record(self) -> dict | None:
        if self.select is None:
            return None
        return {"scores": [round(s, 6) for s in self.scores], "best_epoch": self.best_epoch,
                "best_score": round(max(self.scores), 6), "epoch_length": self.epoch_length}


def mean_objective(loss_of, lam: torch.Tensor, data: list) -> float | None:
    """The objective averaged over the batches that give one; None when none does."""
    values = [v for b in data if (v := loss_of(lam, b)) is not None]
    return float(torch.stack(values).mean()) if values else None


def _progress_bar(progress: bool, total: int):
    if not progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="atlas", unit="step")


def learning_rate(lr: float, schedule: str, t: int, steps: int) -> float:
    """The learning rate of step t: constant (the authors' task addition), or cosine decay
    without warm-up, 0.5 (1 + cos(pi t / steps)) lr (their few-shot and test-time `cosine_lr`)."""
    if schedule == "constant":
        return lr
    return lr * 0.5 * (1 + math.cos(math.pi * t / steps))


def descend(loss_of, penalty_of, lam_of, raw: torch.Tensor, batches, steps: int, lr: float, schedule: str,
            weight_decay: float, clip: float | None, history: list, bar, keeper: _Best
            ) -> tuple[torch.Tensor, dict]:
    """AdamW on the coefficients, with the learning-rate schedule and norm clipping."""
    coef = raw.clone().requires_grad_(True)  # the one leaf that is trained
    opt = torch.optim.AdamW([coef], lr=lr, weight_decay=weight_decay)
    for t in range(steps):
        for group in opt.param_groups:
            group["lr"] = learning_rate(lr, schedule, t, steps)
        lam = lam_of(coef)
        loss = loss_of(lam, batches.next()[1])
        if loss is None:  # no labelled / confident prediction in this batch: no gradient
            history.append(None)
        else:
            opt.zero_grad(set_to_none=True)
            (loss + penalty_of(lam)).backward()
            if clip:
                torch.nn.utils.clip_grad_norm_([coef], clip)
            opt.step()
            history.append(round(float(loss.detach()), 6))
        keeper.after_step(t, lam_of(coef).detach())
        if bar is not None:
            bar.update(1)
    settings = {"lr": lr, "schedule": schedule, "weight_decay": weight_decay, "clip": clip}
    return coef.detach(), settings


def evolve(loss_of, penalty_of, lam_of, raw: torch.Tensor, mask: torch.Tensor, batches, steps: int,
           sigma: float, gen: torch.Generator, history: list, bar, keeper: _Best
           ) -> tuple[torch.Tensor, dict]:
    """(1+1)-ES with the 1/5th success rule; a candidate must beat the parent on the same batch."""
    sigma0 = sigma
    free = mask.unsqueeze(-1).expand(raw.shape).cpu()
    cache: dict[int, float] = {}  # the parent's objective per (fixed) batch, while the parent stands
    accepted = 0

    def f(x: torch.Tensor, batch) -> float:
        lam = lam_of(x)
        loss = loss_of(lam, batch)
        return math.inf if loss is None else float(loss + penalty_of(lam))

    with torch.no_grad():
        for t in range(steps):
            key, batch = batches.next()
            parent = cache[key] if key is not None and key in cache else f(raw, batch)
            if key is not None:
                cache[key] = parent
            noise = (torch.randn(raw.shape, generator=gen) * free).to(raw.device)
            cand = raw + sigma * noise
            fc = f(cand, batch)
            if fc < parent:
                raw, parent = cand, fc
                cache = {key: fc} if key is not None else {}
                sigma = min(sigma * math.exp(1 / 3), 10.0)
                accepted += 1
            else:
                sigma = max(sigma * math.exp(-1 / 12), 1e-6)
            history.append(None if math.isinf(parent) else round(parent, 6))
            keeper.after_step(t, lam_of(raw))
            if bar is not None:
                bar.update(1)
    settings = {"sigma": sigma0, "final_sigma": sigma, "accepted": accepted}
    return raw, settings


def warn_skipped(skipped: int, steps: int, why: str) -> None:
    """Say so when steps had no loss: all of them (the coefficients are the initial ones) or some."""
    if skipped == steps:
        warnings.warn(f"learn_coefficients took no optimizer step: none of the {steps} steps had a "
                      f"prediction that counts ({why}); the coefficients are their initial value",
                      stacklevel=3)
    elif skipped:
        warnings.warn(f"{skipped} of {steps} steps had no prediction that counts ({why}) and changed "
                      f"nothing", stacklevel=3)
