"""How aTLAS fits its coefficients: AdamW on them alone, or a gradient-free (1+1)-ES.

    result = fit(loss_of, penalty_of, mask, data, shape=(T, B, P), init=0.0, steps=200, lr=None,
                 few_shot=False, gradient_free=False, weight_decay=0.1, clip=1.0, seed=0,
                 progress=False, device=device)
    result.lam, result.start, result.end                  # coefficients, objective before/after

`loss_of(lam, batch)` is the objective of the merged model on one batch (None when no
prediction counts), `penalty_of(lam)` the penalty on the coefficients, and `mask` (T, B or
1) is 0 where a coefficient stays fixed at 0. Batches are visited in seeded random order.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass
class Fit:
    """What `fit` found: `lam` (T, B or 1, P), the mean objective over all batches before and
    after, the per-step objective, the optimizer's settings, and how many copies of the
    coefficients it held (value, gradient, moments)."""

    lam: torch.Tensor
    start: float | None
    end: float | None
    history: list[float | None]
    settings: dict
    state_copies: int


def fit(loss_of, penalty_of, mask: torch.Tensor, data: list, *, shape: tuple[int, int, int],
        init: float, steps: int, lr: float | None, few_shot: bool, gradient_free: bool,
        weight_decay: float, clip: float | None, seed: int, progress: bool,
        device: torch.device) -> Fit:
    """Fit the coefficients from `init` for `steps` steps, by AdamW or (`gradient_free`) ES.

    `lr` defaults to 1e-3, or 1e-1 with `few_shot`; with `gradient_free` it is the initial
    mutation scale (default 0.1).
    """
    gen = torch.Generator().manual_seed(seed)  # the batch order and, for ES, the mutations
    next_batch = _batch_order(len(data), gen)
    raw = torch.full(shape, float(init), device=device)
    lam_of = (lambda r: r * mask.unsqueeze(-1))  # noqa: E731 - fixed-at-0 coefficients
    with torch.no_grad():
        start = mean_objective(loss_of, lam_of(raw), data)
    history: list[float | None] = []
    bar = _progress_bar(progress, steps)
    try:
        if gradient_free:
            sigma = lr if lr is not None else 0.1
            raw, settings = evolve(loss_of, penalty_of, lam_of, raw, mask, data, next_batch,
                                   steps, sigma, gen, history, bar)
            state_copies = 2  # the parent and one candidate
        else:
            rate = lr if lr is not None else (1e-1 if few_shot else 1e-3)
            raw, settings = descend(loss_of, penalty_of, lam_of, raw, data, next_batch,
                                    steps, rate, weight_decay, clip, history, bar)
            state_copies = 4  # value, gradient, AdamW's two moments
    finally:
        if bar is not None:
            bar.close()
    lam = lam_of(raw).detach()
    with torch.no_grad():
        end = mean_objective(loss_of, lam, data)
    return Fit(lam, start, end, history, settings, state_copies)


def _batch_order(n: int, gen: torch.Generator) -> Callable[[], int]:
    """The next batch index: seeded random passes over the n batches, one after another."""
    order: list[int] = []

    def next_batch() -> int:
        if not order:
            order.extend(torch.randperm(n, generator=gen).tolist())
        return order.pop(0)

    return next_batch


def mean_objective(loss_of, lam: torch.Tensor, data: list) -> float | None:
    """The objective averaged over the batches that give one; None when none does."""
    values = [v for b in data if (v := loss_of(lam, b)) is not None]
    return float(torch.stack(values).mean()) if values else None


def _progress_bar(progress: bool, total: int):
    if not progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="atlas", unit="step")


def descend(loss_of, penalty_of, lam_of, raw: torch.Tensor, data: list, next_batch, steps: int,
            lr: float, weight_decay: float, clip: float | None, history: list, bar
            ) -> tuple[torch.Tensor, dict]:
    """AdamW on the coefficients, cosine learning-rate decay without warm-up, norm clipping."""
    coef = raw.clone().requires_grad_(True)  # the one leaf that is trained
    opt = torch.optim.AdamW([coef], lr=lr, weight_decay=weight_decay)
    for t in range(steps):
        for group in opt.param_groups:  # cosine decay, no warm-up
            group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * t / steps))
        lam = lam_of(coef)
        loss = loss_of(lam, data[next_batch()])
        if loss is None:  # no labelled / confident prediction in this batch: no gradient
            history.append(None)
        else:
            opt.zero_grad(set_to_none=True)
            (loss + penalty_of(lam)).backward()
            if clip:
                torch.nn.utils.clip_grad_norm_([coef], clip)
            opt.step()
            history.append(round(float(loss.detach()), 6))
        if bar is not None:
            bar.update(1)
    settings = {"lr": lr, "schedule": "cosine", "weight_decay": weight_decay, "clip": clip}
    return coef.detach(), settings


def evolve(loss_of, penalty_of, lam_of, raw: torch.Tensor, mask: torch.Tensor, data: list,
           next_batch, steps: int, sigma: float, gen: torch.Generator, history: list, bar
           ) -> tuple[torch.Tensor, dict]:
    """(1+1)-ES with the 1/5th success rule; a candidate must beat the parent on the same batch."""
    sigma0 = sigma
    free = mask.unsqueeze(-1).expand(raw.shape).cpu()
    cache: dict[int, float] = {}  # the parent's objective per batch, while the parent stands
    accepted = 0

    def f(x: torch.Tensor, b: int) -> float:
        lam = lam_of(x)
        loss = loss_of(lam, data[b])
        return math.inf if loss is None else float(loss + penalty_of(lam))

    with torch.no_grad():
        for _ in range(steps):
            b = next_batch()
            if b not in cache:
                cache[b] = f(raw, b)
            noise = (torch.randn(raw.shape, generator=gen) * free).to(raw.device)
            cand = raw + sigma * noise
            fc = f(cand, b)
            if fc < cache[b]:
                raw, cache = cand, {b: fc}
                sigma = min(sigma * math.exp(1 / 3), 10.0)
                accepted += 1
            else:
                sigma = max(sigma * math.exp(-1 / 12), 1e-6)
            history.append(None if math.isinf(cache[b]) else round(cache[b], 6))
            if bar is not None:
                bar.update(1)
    settings = {"sigma": sigma0, "final_sigma": sigma, "accepted": accepted}
    return raw, settings
