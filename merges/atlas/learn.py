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
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, Literal

import torch

from weightspace.binding import Adapter
from weightspace.errors import InputError, SpecError
from weightspace.ir import WeightSpace
from weightspace.merges.atlas.budget import BUDGET_MODES, select_budget
from weightspace.merges.atlas.coefficients import Coefficients
from weightspace.merges.atlas.data import Augment, batch_to, check_data, resolve_augment
from weightspace.merges.atlas.identity import model_identities
from weightspace.merges.atlas.objectives import OBJECTIVES, Objective, objective_loss, ufm_loss
from weightspace.merges.atlas.optimizers import SCHEDULES, FixedBatches, fit, warn_skipped
from weightspace.merges.atlas.task_vectors import (
    MAX_RELATIVE_NORM,
    TaskVectors,
    as_space,
    task_name,
)
from weightspace.merges.atlas.ufm import UFMBatches, trusted_count

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
    schedule: Literal["auto", "constant", "cosine"] = "auto",
    weight_decay: float = 0.1,
    clip: float | None = 1.0,
    blockwise: bool = True,
    partitions: int = 1,
    budget: int | None = None,
    budget_mode: Literal["vectors", "blocks"] = "vectors",
    gradient_free: bool = False,
    init: float = 0.0,
    penalty: Literal["l1", "l2"] | None = None,
    penalty_weight: float = 0.5,
    threshold: float | None = None,
    augment: str | Augment | None = None,
    select: Iterable[Mapping[str, Any]] | Callable[[Mapping[str, torch.Tensor]], float] | None = None,
    tv_dtype: torch.dtype | None = None,
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
                               batches, objective="supervised", epochs=20, select=batches)
        c.values.shape                                       # (2, blocks)

    The defaults are the authors' (github.com/fredzzhang/atlas, src/learn_task_addition.py,
    learn_few_shots.py, learn_ufm.py): AdamW, weight decay 0.1, clipping 1.0, coefficients
    from 0; lr 1e-3 with a constant rate for task addition, lr 1e-1 with cosine decay for
    few-shot (`few_shot=True`), lr 1e-3 with cosine decay for test-time objectives.

    - `objective`: "supervised" (labels), or without labels "entropy" (AdaMerging),
      "pseudo-label" (the model's own confident argmax, re-computed every step) or "ufm"
      (the paper's test-time objective, merges/atlas/ufm.py: fixed pseudo-labels of the
      zero-shot model, k trusted examples per class, a weak and a strong view, batches of the
      first given batch's size; labels in the batches are never read). Labels of -100 (such as
      padding) are left out.
    - `steps` optimizer steps, or `epochs` passes over the data (the authors count epochs:
      20 for task addition, 10 for few-shot and test-time; a UFM epoch is one pass over the
      untrusted examples). Batches are visited in seeded random order.
    - `lr` defaults as above; with `gradient_free` it is the initial mutation scale (0.1).
      `schedule` "auto" picks the authors' (constant for supervised task addition, cosine
      otherwise); "constant" or "cosine" force one.
    - `select`: labelled batches (accuracy) or a function of the merged parameters (a score,
      higher is better). The coefficients are scored before the first step and after every
      epoch, and the best are returned, as the authors keep their best epoch starting from the
      zero-shot score (`meta["selection"]`). None returns the last coefficients.
    - `augment`: "crop-flip" (`data.crop_flip`, the authors' augmentation of images) or a
      function (x, generator) -> x applied to each step's inputs `x`; for "ufm" it makes the
      strong view and defaults to "crop-flip".
    - `threshold`: the confidence a pseudo-label needs: UFM's 0.99 (the authors') or 0.9 for
      "pseudo-label" by default.
    - `blockwise=False`: one coefficient per task vector (task arithmetic with learned
      lambda_i, stored repeated over the blocks). `partitions` P > 1: P coefficients per
      block over `partition_ids` groups (values (T, B, P)).
    - `budget` B: keep B task vectors (`budget_mode="vectors"`) or B per block ("blocks")
      scored by |dL/dlambda| at 0 (one backward pass over the data, also when
      `gradient_free`); the others are fixed at 0 (`meta["budget"]`).
    - `penalty` "l1"/"l2": `penalty_weight` (the authors' 0.5) times the mean over blocks
      (and partitions) of the l1 / l2 norm of the block's coefficients across task vectors,
      added to the objective (the authors' `lp_reg`).
    - `max_relative_norm`: refuse a task vector larger than this times the base (another
      base); None skips the check.
    - `tv_dtype`: the dtype the task vectors are held in. None: the model's compute dtype
      when it is 16-bit (a bf16 language model keeps bf16 task vectors), float16 for a float32
      model. The base is held in the compute dtype (the module's own tensors where they hold
      it), a step's merged parameters too; only the coefficients, their gradients and AdamW's
      moments are float32 (merges/atlas/task_vectors.py).
    - For a causal LM (`HFCausalLMAdapter`) the supervised objective is the mean next-token
      negative log-likelihood over the tokens that are not padding, as the adapter's labels
      define it; a tied input/output embedding is one block (its one tensor, one coefficient
      per task vector, its gradient summing both uses).
    - `task_names`: how the file names the task vectors (default: each fine-tune's path).
      Each fine-tune's resolved path and content fingerprint are recorded too (`models`),
      and a merge refuses other models or another order.

    A step whose batch has no prediction that counts (no label, no confident pseudo-label)
    changes nothing; a warning says how many did (all of them: the coefficients are the
    initial ones), and `meta["steps_taken"]` counts the steps that changed the coefficients.
    `meta` records the settings, the per-step objective (`history`), the objective over all
    batches before and after (`objective_start`, `objective_end`), and `memory` (bytes held:
    task vectors, base, partition ids, coefficients with optimizer state).
    """
    t_start = time.perf_counter()
    threshold = (0.99 if objective == "ufm" else 0.9) if threshold is None else threshold
    _check_settings(objective=objective, steps=steps, epochs=epochs, lr=lr, schedule=schedule,
                    weight_decay=weight_decay, clip=clip, blockwise=blockwise, partitions=partitions,
                    budget=budget, budget_mode=budget_mode, init=init, penalty=penalty,
                    penalty_weight=penalty_weight, threshold=threshold, tv_dtype=tv_dtype)
    if schedule == "auto":
        schedule = "constant" if objective == "supervised" and not few_shot else "cosine"
    if objective == "ufm" and augment is None:
        augment = "crop-flip"
    augment_fn = resolve_augment(augment)
    device = torch.device(device)
    base_ws, fts, names = _open_inputs(base, finetuned, task_names)
    data = [batch_to(b, device, i) for i, b in enumerate(batches)]
    examples = check_data(adapter, data, objective)
    if augment_fn is not None and any("x" not in b for b in data):
        raise InputError("augment: transforms the inputs 'x' of zoo-style batches; these batches have "
                         f"keys {', '.join(data[0])}")
    select_data = None if select is None or callable(select) else [batch_to(b, device, i)
                                                                   for i, b in enumerate(select)]
    if select_data is not None and not select_data:
        raise InputError("select: no batches to select the best epoch on")
    gen = torch.Generator().manual_seed(seed)  # batch order, augmentation, ES mutations
    with _predicting(adapter.module):
        tvs = TaskVectors(adapter, base_ws, fts, names, partitions=partitions, seed=seed,
                          tv_dtype=tv_dtype, device=device, max_relative_norm=max_relative_norm)
        shape = (len(fts), len(tvs.blocks) if blockwise else 1, partitions)
        ufm_info = None
        if objective == "ufm":
            stream, report, ufm_info = _ufm_batches(adapter, tvs, data, shape, init, augment_fn, gen, seed)
            loss_of = _ufm_loss_of(adapter, tvs, threshold)
        else:
            stream, report = FixedBatches(data, gen, augment_fn), data
            loss_of = _loss_of(adapter, tvs, objective, threshold)
        penalty_of = _penalty_of(penalty, penalty_weight)
        mask, budget_info = _budget_mask(tvs, loss_of, report, shape, budget, budget_mode, names, device)
        total_steps = epochs * stream.epoch_length if epochs is not None else steps
        rate = lr if lr is not None else (0.1 if gradient_free or few_shot else 1e-3)
        result = fit(loss_of, penalty_of, mask, stream, report, shape=shape, init=init, steps=total_steps,
                     lr=rate, schedule=schedule, gradient_free=gradient_free, weight_decay=weight_decay,
                     clip=clip, select=_selector(adapter, tvs, select, select_data), seed=seed,
                     progress=progress, device=device, gen=gen)
        memory = tvs.memory(result.lam.numel(), result.state_copies)
    warn_skipped(result.skipped, total_steps, _why_no_loss(objective, threshold))
    meta = {
        "method": "atlas",
        "objective": objective,
        "optimizer": "(1+1)-es" if gradient_free else "adamw",
        **result.settings,
        "steps": total_steps,
        "steps_taken": total_steps - result.skipped,
        "epochs": epochs,
        "epoch_length": stream.epoch_length,
        "few_shot": few_shot,
        "blockwise": blockwise,
        "partitions": partitions,
        "init": init,
        "penalty": penalty,
        "penalty_weight": penalty_weight if penalty else None,
        "threshold": threshold if objective in ("pseudo-label", "ufm") else None,
        "augment": augment if isinstance(augment, str) or augment is None else getattr(augment, "__name__", "custom"),
        "selection": result.selection,
        "ufm": ufm_info,
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
                        seed, meta, model_identities(fts, names))


def _why_no_loss(objective: str, threshold: float) -> str:
    return {"supervised": "no labelled prediction",
            "entropy": "no prediction that is not padding",
            "pseudo-label": f"no prediction reached the threshold {threshold:g}; lower it or start "
                            f"from other coefficients (init)",
            "ufm": f"no example was trusted or passed the threshold {threshold:g}"}[objective]


def _check_settings(*, objective: str, steps: Any, epochs: Any, lr: Any, schedule: str, weight_decay: float,
                    clip: float | None, blockwise: bool, partitions: Any, budget: Any,
                    budget_mode: str, init: float, penalty: str | None, penalty_weight: float,
                    threshold: float, tv_dtype: torch.dtype | None) -> None:
    """Refuse settings that are unknown, out of range, or do not go together (SpecError)."""
    if objective not in OBJECTIVES:
        raise SpecError(f"objective: unknown {objective!r}; use one of {', '.join(OBJECTIVES)}")
    if budget_mode not in BUDGET_MODES:
        raise SpecError(f"budget_mode: unknown {budget_mode!r}; use vectors or blocks")
    if penalty not in PENALTIES:
        raise SpecError(f"penalty: unknown {penalty!r}; use l1, l2 or None")
    if schedule not in ("auto", *SCHEDULES):
        raise SpecError(f"schedule: unknown {schedule!r}; use auto, constant or cosine")
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
    if tv_dtype is not None and not tv_dtype.is_floating_point:
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
    """`weight` times the mean over blocks (and partitions) of the l1 / l2 norm of a block's
    coefficients across the task vectors: the authors' `lp_reg` (src/learn_task_addition.py),
    gamma * torch.norm(coef, p, dim=0).mean()."""

    def penalty_of(lam: torch.Tensor) -> torch.Tensor | float:
        if penalty is None or weight == 0:
            return 0.0
        return weight * torch.linalg.vector_norm(lam, ord=1 if penalty == "l1" else 2, dim=0).mean()

    return penalty_of


def _ufm_batches(adapter: Adapter, tvs: TaskVectors, data: list, shape: tuple[int, int, int], init: float,
                 augment: Augment, gen: torch.Generator, seed: int) -> tuple[UFMBatches, list, dict]:
    """UFM's stream, from the zero-shot predictions (the initial coefficients) on the pooled
    inputs; the objective is reported on one epoch drawn with a fixed generator."""
    x = torch.cat([b["x"] for b in data])
    lam0 = torch.full(shape, float(init), device=x.device)
    with torch.no_grad():
        params = tvs.params(lam0)
        logits = torch.cat([adapter.logits(params, {"x": x[i:i + 512]}) for i in range(0, len(x), 512)])
    if logits.shape[1] != 1:
        raise InputError("the ufm objective takes one prediction per example (a classifier)")
    probs = torch.softmax(logits[:, 0].float(), -1)
    size = int(data[0]["x"].shape[0])
    stream = UFMBatches.from_zero_shot(probs, x, batch_size=size, augment=augment, gen=gen)
    fixed = UFMBatches.from_zero_shot(probs, x, batch_size=size, augment=augment,
                                      gen=torch.Generator().manual_seed(seed + 7919))
    report = [fixed.next()[1] for _ in range(fixed.epoch_length)]
    info = {"trusted_per_class": trusted_count(*probs.shape), "trusted": len(stream.trusted),
            "untrusted": len(stream.untrusted), "batch_size": size, "zero_shot_confidence":
            round(float(probs.max(-1).values.mean()), 6)}
    return stream, report, info


def _ufm_loss_of(adapter: Adapter, tvs: TaskVectors, threshold: float):
    """UFM's loss of the model merged with coefficients lam on one UFM batch."""

    def loss_of(lam: torch.Tensor, batch: Mapping[str, torch.Tensor]) -> torch.Tensor | None:
        params = tvs.params(lam)
        with torch.no_grad():
            weak = adapter.logits(params, {"x": batch["x"]})[:, 0]
        strong = adapter.logits(params, {"x": batch["x_strong"]})[:, 0]
        return ufm_loss(weak, strong, batch["pseudo"], batch["trusted"], threshold)

    return loss_of


def _selector(adapter: Adapter, tvs: TaskVectors, select: Any, select_data: list | None):
    """The selection score of coefficients lam: accuracy on `select_data`, or `select(params)`."""
    if select is None:
        return None
    if callable(select):
        return lambda lam: float(select(tvs.params(lam)))

    def accuracy(lam: torch.Tensor) -> float:
        try:
            acc = adapter.accuracy(tvs.params(lam), select_data)
        except InputError as e:
            raise InputError(f"select: {e}") from None
        if acc is None:
            raise InputError("select: the batches have no labelled examples")
        return acc

    return accuracy


def _budget_mask(tvs: TaskVectors, loss_of, data: list, shape: tuple[int, int, int],
                 budget: int | None, mode: str, names: list[str], device: torch.device
                 ) -> tuple[torch.Tensor, dict | None]:
    """Which coefficients train (1) or stay at 0, (T, B or 1); the dropped task vectors are freed.
    The scores are taken on `data` as given (for UFM: one epoch of its batches)."""
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
