"""The recipes of `train_gene`: its presets (ours and the TLEG/SWS authors'), the checked
arguments with a preset filled in (`_Recipe`), and the learning-rate schedule (`lr_at`).

    preset_setting("authors", "aux_depth", "sws")        # 16
    lr_at(2, 100, lr=5e-4, warmup_steps=5, warmup_lr=1e-6)
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass
from typing import Any

from weightspace.errors import SpecError
from weightspace.merges.learngene.distill import KD_REDUCTIONS
from weightspace.merges.learngene.layout import (
    _check_denominator,
    _check_depth,
    _check_mode,
    _source_stages,
)

# `train_gene` without epochs or steps: enough passes that a small network leaves chance (one
# pass over digits leaves a 6-layer MLP at chance); the papers train for 100+ epochs.
DEFAULT_EPOCHS = 10

# The recipes `preset` names; an argument left at None takes its preset's value.
#
# "default": ours, for a short run on a small task: soft targets at T = 2 mixed half and half with
# the labels, the KL per prediction, a higher lr, every tensor decayed, clipped gradients.
#
# "authors": the aux-net training of TLEG (github.com/AlphaXia/TLEG, README "Training Aux-S":
# `--epochs 150 --distillation-type soft --distillation-alpha 1.0 --drop-path 0.0`) and of SWS
# (github.com/AlphaXia/SWS, README "Training Aux-S": the same plus `--warmup-epochs 5
# --weight-decay 0.05 --lr 5e-4`), with the rest from their main.py `get_args_parser` (DeiT's):
# --distillation-tau 1.0, --opt adamw, --sched cosine, --warmup-lr 1e-6, --min-lr 1e-5,
# --clip-grad None; `args.lr * batch_size * world_size / 512` (main.py, linear scaling); timm's
# `create_optimizer`, which exempts 1-D tensors, biases and `no_weight_decay()` names (pos_embed,
# cls_token) from weight decay; and losses.py's KL divided by every logit. Aux-S has 12 layers
# (TLEG: aux_models.py `get_repeated_schedule(12)`) or 16 in stages 3,3,4,3,3 (SWS:
# aux_models.py `get_repeated_schedule_12`, model `aux_deit_small_patch16_224_L16_33433`).
# Not reproduced: their data augmentation (RandAugment, mixup, cutmix, random erasing), model
# EMA and mixed precision; the schedule here steps every batch, theirs every epoch.
PRESETS: dict[str, dict[str, Any]] = {
    "default": {"aux_depth": 6, "temperature": 2.0, "alpha": 0.5, "kd_reduction": "batchmean",
                "epochs": DEFAULT_EPOCHS, "lr": 1e-3, "weight_decay": 0.05, "decay_1d": True, "clip": 1.0,
                "warmup_epochs": 0.0, "warmup_lr": 0.0, "min_lr": 0.0},
    "authors": {"aux_depth": {"tleg": 12, "sws": 16}, "temperature": 1.0, "alpha": 1.0, "kd_reduction": "mean",
                "epochs": 150, "lr": None, "weight_decay": 0.05, "decay_1d": False, "clip": 0.0,
                "warmup_epochs": 5.0, "warmup_lr": 1e-6, "min_lr": 1e-5},
}
# "authors": lr = AUTHORS_LR * (examples per batch) / 512, DeiT's linear scaling of --lr 5e-4
AUTHORS_LR = 5e-4
# "authors", SWS: the 16-layer Aux-S's stages; at another aux_depth, AUTHORS_STAGE_COUNT stages split evenly
AUTHORS_STAGES = (3, 3, 4, 3, 3)
AUTHORS_STAGE_COUNT = 5


def preset_setting(preset: str, name: str, mode: str) -> Any:
    """What `preset` sets `name` to for a gene of `mode` (a PRESETS value, per mode where it differs).

        preset_setting("authors", "aux_depth", "sws")     # 16
    """
    v = PRESETS[preset][name]
    return v[mode] if isinstance(v, dict) and mode in v else v


def _with_preset(preset: str, **given: Any) -> dict[str, Any]:
    """The arguments of train_gene with those left at None taken from `preset` (PRESETS)."""
    if preset not in PRESETS:
        raise SpecError(f"preset: unknown {preset!r}; use {' or '.join(PRESETS)}")
    out = dict(given, preset=preset)
    for k in PRESETS[preset]:
        if out.get(k) is None:
            out[k] = preset_setting(preset, k, given["mode"])
    if out["steps"] is not None and given["epochs"] is None:
        out["epochs"] = None      # steps given: the preset's epochs do not apply
    if preset == "authors" and given["mode"] == "sws" and out["stages"] is None and isinstance(out["aux_depth"], int):
        out["stages"] = (list(AUTHORS_STAGES) if out["aux_depth"] == sum(AUTHORS_STAGES)
                         else min(AUTHORS_STAGE_COUNT, out["aux_depth"]))
    return out


@dataclass(frozen=True)
class _Recipe:
    """train_gene's checked arguments, presets filled in; `denominator` is None for SWS, `stages`
    None for TLEG; `lr` None until `at_batch` applies the authors' linear scaling."""

    preset: str
    mode: str
    aux_depth: int
    denominator: str | None
    stages: list[int] | None
    temperature: float
    alpha: float
    kd_reduction: str
    epochs: int | None
    steps: int | None
    lr: float | None
    weight_decay: float
    decay_1d: bool
    clip: float
    warmup_epochs: float
    warmup_lr: float
    min_lr: float
    seed: int
    init: str
    batch_size: int | None = None

    def at_batch(self, batch_size: int) -> _Recipe:
        """The recipe for batches of `batch_size` examples (the first batch's): the authors' lr."""
        lr = self.lr if self.lr is not None else AUTHORS_LR * batch_size / 512
        return dataclasses.replace(self, lr=lr, batch_size=batch_size)

    def total_steps(self, batches: int) -> int:
        return self.steps if self.steps is not None else self.epochs * batches

    def warmup_steps(self, batches: int) -> int:
        return int(round(self.warmup_epochs * batches))


def _warn_if_warmup_covers_the_run(warmup: int, total: int, lr: float) -> None:
    """A run no longer than its warm-up never reaches `lr` and never decays (e.g. the authors'
    5 warm-up epochs with epochs=2): say so rather than train at a fraction of the rate."""
    if warmup > 0 and warmup >= total:
        warnings.warn(f"train_gene: the warm-up ({warmup} steps) is as long as the whole run ({total} steps), "
                      f"so the learning rate never reaches {lr:.3g}; train for more epochs than "
                      f"warmup_epochs, or set warmup_epochs lower", stacklevel=3)


def lr_at(step: int, total: int, *, lr: float, warmup_steps: int = 0, warmup_lr: float = 0.0,
          min_lr: float = 0.0) -> float:
    """The learning rate of optimizer step `step` (0-based) of `total`.

        lr_at(0, 100, lr=1e-3)                                  # 1e-3: cosine decay to 0, no warm-up
        lr_at(2, 100, lr=5e-4, warmup_steps=5, warmup_lr=1e-6)  # on the way up

    timm's CosineLRScheduler as DeiT's main.py (and so TLEG's and SWS's) configures it, per
    step: warmup_lr + (lr - warmup_lr) step / warmup_steps during the warm-up, then
    min_lr + (lr - min_lr) (1 + cos(pi step / total)) / 2. The cosine's clock starts at step 0,
    not after the warm-up (timm's warmup_prefix=False).
    """
    if step < warmup_steps:
        return warmup_lr + (lr - warmup_lr) * step / warmup_steps
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * step / max(1, total)))


def _check_recipe(a: dict[str, Any]) -> _Recipe:
    """Every argument checked before the teacher or the student is touched."""
    mode = _check_mode(a["mode"])
    aux_depth = _check_depth(a["aux_depth"], "aux_depth")
    den = _check_denominator(a["denominator"]) if mode == "tleg" else None
    if mode == "tleg" and aux_depth < 2:
        raise SpecError("aux_depth: TLEG's auxiliary network needs at least two layers (x_l must vary)")
    if mode == "tleg" and a["stages"] is not None:
        raise SpecError("stages apply to sws genes; a tleg gene has none")
    sizes = _source_stages(aux_depth, a["stages"]) if mode == "sws" else None
    init = a["init"]
    if init not in ("random", "fit"):
        raise SpecError(f"init: unknown {init!r}; use random or fit")
    temperature, alpha, lr = a["temperature"], a["alpha"], a["lr"]
    if not temperature > 0 or not math.isfinite(temperature):
        raise SpecError(f"temperature must be a positive number, got {temperature!r}")
    if not 0.0 <= alpha <= 1.0:
        raise SpecError(f"alpha must be in [0, 1], got {alpha!r}")
    if a["kd_reduction"] not in KD_REDUCTIONS:
        raise SpecError(f"kd_reduction: unknown {a['kd_reduction']!r}; use {' or '.join(KD_REDUCTIONS)}")
    if (lr is not None and not lr > 0) or a["weight_decay"] < 0 or a["clip"] < 0:
        raise SpecError("lr must be > 0, weight_decay >= 0 and clip >= 0 (0: no clipping)")
    if a["warmup_epochs"] < 0 or a["warmup_lr"] < 0 or a["min_lr"] < 0:
        raise SpecError("warmup_epochs, warmup_lr and min_lr must be >= 0")
    if a["epochs"] is not None and a["steps"] is not None:
        raise SpecError("give epochs or steps, not both")
    for v, what in ((a["epochs"], "epochs"), (a["steps"], "steps")):
        if v is not None:
            _check_depth(v, what)
    return _Recipe(a["preset"], mode, aux_depth, den, sizes, float(temperature), float(alpha), a["kd_reduction"],
                   a["epochs"], a["steps"], lr, float(a["weight_decay"]), bool(a["decay_1d"]), float(a["clip"]),
                   float(a["warmup_epochs"]), float(a["warmup_lr"]), float(a["min_lr"]), a["seed"], init)
