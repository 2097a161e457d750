"""Learning aTLAS coefficients: the task vectors stay fixed, only their coefficients train.

    adapter = ClassifierAdapter(model)                          # runs the base's architecture
    coeffs = learn_coefficients(adapter, base, [ft_a, ft_b], batches, objective="supervised")
    save_coefficients(coeffs, "coeffs.safetensors")

Every step rebuilds theta = theta_0 + sum lambda tau from the fixed task vectors and runs it
through the adapter (`torch.func.functional_call`); the backbone is never modified.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, Literal

import torch

from weightspace.binding import Adapter
from weightspace.errors import InputError, SpecError
from weightspace.ir import WeightSpace
from weightspace.merges.atlas.budget import BUDGET_MODES, select_budget
from weightspace.merges.atlas.coefficients import Coefficients
from weightspace.merges.atlas.data import batch_to, check_data
from weightspace.merges.atlas.objectives import OBJECTIVES, Objective, objective_loss
from weightspace.merges.atlas.optimizers import fit
from weightspace.merges.atlas.task_vectors import (
    MAX_RELATIVE_NORM,
    TaskVectors,
    as_space,
    task_name,
)

PENALTIES = (None, "l1", "l2")


def learn_coefficients(
    adapter: Adapter,
    base: WeightSpace | Mapping[str, torch.Tensor],
    finetuned: Sequence[WeightSpace | Mapping[str, torch.Tensor]],
    batches: Iterable[Mapping[str, Any]],
    *,
    objective: Objective = "supervised",
    steps: int = 200,
    epochs: int | None = None,
    lr: float | None = None,
    few_shot: bool = False,
    weight_decay: float = 0.1,
    clip: float | None = 1.0,
    blockwise: bool = True,
    partitions: int = 1,
    budget: int | None = None,
    budget_mode: Literal["vectors", "blocks"] = "vectors",
    gradient_free: bool = False,
    init: float = 0.0,
    penalty: Literal["l1", "l2"] | None = None,
    penalty_weight: float = 0.0,
    threshold: float = 0.9,
    tv_dtype: torch.dtype = torch.float16,
    device: str | torch.device = "cpu",
    seed: int = 0,
    progress: bool = False,
    task_names: Sequence[str] | None = None,
    max_relative_norm: float | None = MAX_RELATIVE_NORM,
) -> Coefficients:
    """Learn aTLAS coefficients for the task vectors `finetuned[i] - base` on `batches`.

        adapter = open_model("ft_dir_or_base")                 # any adapter running the base's architecture
        batches = open_batches("digits", adapter, split="val")
        c = learn_coefficients(adapter, load_space("base"), [load_space("ft0"), load_space("ft1")],
                               batches, objective="supervised", steps=200)
        c.values.shape                                       # (2, blocks)

    - `objective`: "supervised" (labels), "entropy" or "pseudo-label" (no labels needed;
      predictions whose label is -100, such as padding, are left out when labels exist).
    - `steps` optimizer steps cycling over the batches in seeded random order, or
      `epochs` passes over them. `lr` defaults to 1e-3, or 1e-1 with `few_shot=True`
      (small labelled sets); with `gradient_free` it is the initial mutation scale (0.1).
    - `blockwise=False`: one coefficient per task vector (task arithmetic with learned
      lambda_i, stored repeated over the blocks). `partitions` P > 1: P coefficients per
      block over `partition_ids` groups (values (T, B, P)).
    - `budget` B: keep B task vectors (`budget_mode="vectors"`) or B per block ("blocks")
      scored by |dL/dlambda| at 0 (one backward pass over the data, also when
      `gradient_free`); the others are fixed at 0 (`meta["budget"]`).
    - `penalty` "l1"/"l2": `penalty_weight` times the sum over task vectors of |lambda|
      (lambda^2), averaged over blocks and partitions, added to the objective.
    - `max_relative_norm`: refuse a task vector larger than this times the base (another
      base); None skips the check.
    - `task_names`: how the file names the task vectors (default: each fine-tune's path).

    `meta` records the settings, the per-step objective (`history`), the objective over
    all batches before and after (`objective_start`, `objective_end`), and `memory` (bytes
    held: task vectors, base, partition ids, coefficients with optimizer state).
    """
    t_start = time.perf_counter()
    _check_settings(objective=objective, steps=steps, epochs=epochs, lr=lr, weight_decay=weight_decay,
                    clip=clip, blockwise=blockwise, partitions=partitions, budget=budget,
                    budget_mode=budget_mode, init=init, penalty=penalty, penalty_weight=penalty_weight,
                    threshold=threshold, tv_dtype=tv_dtype)
    device = torch.device(device)
    base_ws, fts, names = _open_inputs(base, finetuned, task_names)
    data = [batch_to(b, device, i) for i, b in enumerate(batches)]
    examples = check_data(adapter, data, objective)
    with _predicting(adapter.module):
        tvs = TaskVectors(adapter, base_ws, fts, names, partitions=partitions, seed=seed,
                          tv_dtype=tv_dtype, device=device, max_relative_norm=max_relative_norm)
        shape = (len(fts), len(tvs.blocks) if blockwise else 1, partitions)
        loss_of = _loss_of(adapter, tvs, objective, threshold)
        penalty_of = _penalty_of(penalty, penalty_weight)
        mask, budget_info = _budget_mask(tvs, loss_of, data, shape, budget, budget_mode, names, device)
        total_steps = epochs * len(data) if epochs is not None else steps
        result = fit(loss_of, penalty_of, mask, data, shape=shape, init=init, steps=total_steps, lr=lr,
                     few_shot=few_shot, gradient_free=gradient_free, weight_decay=weight_decay,
                     clip=clip, seed=seed, progress=progress, device=device)
        memory = tvs.memory(result.lam.numel(), result.state_copies)
    meta = {
        "method": "atlas",
        "objective": objective,
        "optimizer": "(1+1)-es" if gradient_free else "adamw",
        **result.settings,
        "steps": total_steps,
        "epochs": epochs,
        "few_shot": few_shot,
        "blockwise": blockwise,
        "partitions": partitions,
        "init": init,
        "penalty": penalty,
        "penalty_weight": penalty_weight,
        "threshold": threshold if objective == "pseudo-label" else None,
        "tv_dtype": str(tv_dtype).replace("torch.", ""),
        "seed": seed,
        "base": str(base_ws.meta.get("location") or base_ws.source),
        "examples": examples,
        "batches": len(data),
        "objective_start": result.start,
        "objective_end": result.end,
        "history": result.history,
        "budget": budget_info,
        "relative_norms": [round(r, 6) for r in tvs.relative_norms],
        "memory": memory,
        "seconds": round(time.perf_counter() - t_start, 3),
    }
    return Coefficients(_stored_values(result.lam, tvs, partitions), tvs.blocks, names, partitions,
                        seed, meta)


def _check_settings(*, objective: str, steps: Any, epochs: Any, lr: Any, weight_decay: float,
                    clip: float | None, blockwise: bool, partitions: Any, budget: Any,
                    budget_mode: str, init: float, penalty: str | None, penalty_weight: float,
                    threshold: float, tv_dtype: torch.dtype) -> None:
    """Refuse settings that are unknown, out of range, or do not go together (SpecError)."""
    if objective not in OBJECTIVES:
        raise SpecError(f"objective: unknown {objective!r}; use one of {', '.join(OBJECTIVES)}")
    if budget_mode not in BUDGET_MODES:
        raise SpecError(f"budget_mode: unknown {budget_mode!r}; use vectors or blocks")
    if penalty not in PENALTIES:
        raise SpecError(f"penalty: unknown {penalty!r}; use l1, l2 or None")
    _positive_int(steps, "steps")
    if epochs is not None:
        _positive_int(epochs, "epochs")
    _positive_int(partitions, "partitions")
    if budget is not None:
        _positive_int(budget, "budget")
    if lr is not None and not (lr > 0 and math.isfinite(lr)):
        raise SpecError(f"lr: expected a positive number, got {lr!r}")
    if not 0.0 < threshold <= 1.0:
        raise SpecError(f"threshold: expected a probability in (0, 1], got {threshold!r}")
    if weight_decay < 0 or penalty_weight < 0 or (clip is not None and clip < 0):
        raise SpecError("weight_decay, penalty_weight and clip must be >= 0")
    if not math.isfinite(init):
        raise SpecError(f"init: expected a finite number, got {init!r}")
    if not tv_dtype.is_floating_point:
        raise SpecError(f"tv_dtype: expected a floating-point dtype, got {tv_dtype}")
    if partitions > 1 and not blockwise:
        raise SpecError("partitions need blockwise coefficients (blockwise=True)")
    if budget is not None and budget_mode == "blocks" and not blockwise:
        raise SpecError("budget_mode 'blocks' needs blockwise coefficients (blockwise=True)")


def _positive_int(v: Any, what: str) -> None:
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise SpecError(f"{what}: expected a positive integer, got {v!r}")


def _open_inputs(base: Any, finetuned: Sequence[Any], task_names: Sequence[str] | None
                 ) -> tuple[WeightSpace, list[WeightSpace], list[str]]:
    """The base and fine-tunes as WeightSpaces, and the task vectors' names."""
    base_ws = as_space(base, "the base tensors")
    fts = [as_space(f, f"fine-tuned model {i}") for i, f in enumerate(finetuned)]
    if not fts:
        raise InputError("learn_coefficients: no fine-tuned models (task vectors) given")
    names = list(task_names) if task_names is not None else [task_name(f, i) for i, f in enumerate(fts)]
    if len(names) != len(fts):
        raise SpecError(f"task_names: {len(names)} names for {len(fts)} task vectors")
    return base_ws, fts, names


@contextmanager
def _predicting(module: torch.nn.Module) -> Iterator[None]:
    """The module in eval mode (no dropout: the coefficients are learned for the model as it
    predicts), put back as it was afterwards."""
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


def _loss_of(adapter: Adapter, tvs: TaskVectors, objective: str, threshold: float):
    """The objective of the model merged with coefficients lam, on one batch."""

    def loss_of(lam: torch.Tensor, batch: Mapping[str, torch.Tensor]) -> torch.Tensor | None:
        logits = adapter.logits(tvs.params(lam), batch)
        return objective_loss(adapter, objective, logits, batch, threshold)

    return loss_of


def _penalty_of(penalty: str | None, weight: float):
    """`weight` times the sum of |lam| (l1) or lam^2 (l2), averaged over blocks and partitions."""

    def penalty_of(lam: torch.Tensor) -> torch.Tensor | float:
        if penalty is None or weight == 0:
            return 0.0
        per = lam.abs() if penalty == "l1" else lam.square()
        return weight * per.sum() / (lam.shape[1] * lam.shape[2])

    return penalty_of


def _budget_mask(tvs: TaskVectors, loss_of, data: list, shape: tuple[int, int, int],
                 budget: int | None, mode: str, names: list[str], device: torch.device
                 ) -> tuple[torch.Tensor, dict | None]:
    """Which coefficients train (1) or stay at 0, (T, B or 1); the dropped task vectors are freed."""
    if budget is None:
        return torch.ones(shape[:2], device=device), None
    mask, info = select_budget(loss_of, data, shape, budget, mode, names, device)
    tvs.drop(mask.bool().expand(shape[0], len(tvs.blocks)))
    return mask, info


def _stored_values(lam: torch.Tensor, tvs: TaskVectors, partitions: int) -> torch.Tensor:
    """lam as the file stores it: (T, B) or (T, B, P), tied names with one coefficient."""
    values = lam.expand(len(tvs.taus), len(tvs.blocks), partitions).cpu().float().clone()
    for alias, block in tvs.tied.items():  # the merge writes both names: give them one coefficient
        values[:, tvs.blocks.index(alias)] = values[:, tvs.blocks.index(block)]
    if partitions == 1:
        values = values[..., 0]
    return values
