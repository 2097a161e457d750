"""Train small models, one at a time or many at once as one batched computation.

    run = ModelRun(dataset="digits", arch={"arch": "mlp", "width": 32}, train=TrainConfig(epochs=10), seed=0)
    result = train(run)                                   # one model
    results = train_batch([run0, run1, run2])             # same architecture and batch size: one vmap

Models that share an architecture, a dataset and a batch size (and the rest of
`group_key`) are trained together: their parameters are stacked with
`torch.func.stack_module_state` and one `vmap(grad)` step updates all of them.
Each model keeps its own seed (initialization, data order, data subset), its
own learning rate, momentum and weight decay. The optimizers are written out
functionally over the stacked tensors and follow `torch.optim.SGD` / `Adam` /
`AdamW` step for step (tested against them). Training is deterministic for a
seed on CPU; a batched model matches the same model trained alone to float
rounding.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch.func import functional_call, grad_and_value, stack_module_state, vmap

from weightspace.errors import SpecError
from weightspace.zoo.arch import arch_config, build_model
from weightspace.zoo.data import TaskData, load_task


class TrainConfig(BaseModel):
    """How one model is trained."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    optimizer: Literal["sgd", "adam", "adamw"] = "sgd"
    lr: float = Field(0.05, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = Field(0.0, ge=0)
    batch_size: int = Field(32, ge=1)
    epochs: int = Field(20, ge=0)
    schedule: Literal["constant", "cosine", "linear", "step"] = "cosine"
    warmup_epochs: int = Field(0, ge=0)
    data_fraction: float = Field(1.0, gt=0, le=1)
    checkpoints: tuple[int, ...] = ()

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        bad = [e for e in self.checkpoints if not 0 <= e <= self.epochs]
        if bad:
            raise ValueError(f"checkpoint epoch {bad[0]} is outside 0..epochs ({self.epochs})")
        return self

    @property
    def checkpoint_epochs(self) -> tuple[int, ...]:
        """Epochs saved: the requested ones plus the last, sorted."""
        return tuple(sorted(set(self.checkpoints) | {self.epochs}))


# fields that may differ between models trained in one batch
PER_MODEL_FIELDS = ("lr", "momentum", "weight_decay")


class ModelRun(BaseModel):
    """One model of a zoo: dataset reference, architecture config, training config, seed."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    dataset: str = "digits"
    arch: dict[str, Any]
    train: TrainConfig = TrainConfig()
    seed: int = 0
    init: str | None = None     # start from this checkpoint (a fine-tune) instead of a seeded init

    @model_validator(mode="after")
    def _check_arch(self) -> ModelRun:
        object.__setattr__(self, "arch", arch_config(self.arch))
        return self

    def to_dict(self) -> dict[str, Any]:
        d = json.loads(self.model_dump_json())
        if d.get("init") is None:        # keeps ids of from-scratch models independent of this field
            d.pop("init", None)
        return d

    @property
    def model_id(self) -> str:
        """A content hash of the full config: the same config always has the same id."""
        text = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha1(text.encode()).hexdigest()[:12]

    def group_key(self) -> str:
        """Runs with equal keys train together in one vmap (everything but seed and PER_MODEL_FIELDS)."""
        d = self.to_dict()
        d.pop("seed")
        for f in PER_MODEL_FIELDS:
            d["train"].pop(f)
        return json.dumps(d, sort_keys=True)


@dataclass
class Checkpoint:
    epoch: int
    tensors: dict[str, torch.Tensor]
    metrics: dict[str, float]


@dataclass
class TrainResult:
    run: ModelRun
    checkpoints: list[Checkpoint]
    history: dict[str, list[float]]          # per epoch: train_loss (running), val_loss, val_acc
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


def lr_factor(schedule: str, step: int, total: int, warmup: int) -> float:
    """Multiplier on the base learning rate at optimizer step `step` of `total` (warmup steps first)."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if total <= warmup:
        return 1.0
    t = (step - warmup) / (total - warmup)
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * t))
    if schedule == "linear":
        return 1.0 - t
    # step: x0.1 at 50% and again at 75%
    return 1.0 if t < 0.5 else (0.1 if t < 0.75 else 0.01)


def _per_model(values: Sequence[float], like: torch.Tensor) -> torch.Tensor:
    """(M,) values shaped to broadcast against a stacked (M, ...) tensor."""
    return torch.tensor(values, dtype=like.dtype).view(-1, *([1] * (like.dim() - 1)))


class _Optimizer:
    """SGD (momentum, L2 decay), Adam (L2 decay) and AdamW (decoupled decay) over stacked tensors,
    with per-model hyper-parameters; the update rules of torch.optim written out."""

    def __init__(self, cfg: TrainConfig, runs: Sequence[ModelRun], params: dict[str, torch.Tensor]):
        self.kind = cfg.optimizer
        self.betas = cfg.betas
        self.lr = [r.train.lr for r in runs]
        self.t = 0
        self.state: dict[str, dict[str, torch.Tensor]] = {n: {} for n in params}
        self.mom = {n: _per_model([r.train.momentum for r in runs], p) for n, p in params.items()}
        self.wd = {n: _per_model([r.train.weight_decay for r in runs], p) for n, p in params.items()}

    @torch.no_grad()
    def step(self, params: dict[str, torch.Tensor], grads: dict[str, torch.Tensor], factor: float) -> None:
        self.t += 1
        b1, b2 = self.betas
        for n, p in params.items():
            g = grads[n]
            lr = _per_model([v * factor for v in self.lr], p)
            st = self.state[n]
            wd = self.wd[n]
            if self.kind == "sgd":
                g = g + wd * p
                if "buf" in st:
                    st["buf"].mul_(self.mom[n]).add_(g)
                else:
                    st["buf"] = g.clone()
                p.sub_(lr * st["buf"])
                continue
            if self.kind == "adamw":
                p.mul_(1 - lr * wd)
            else:
                g = g + wd * p
            if "m" not in st:
                st["m"] = torch.zeros_like(p)
                st["v"] = torch.zeros_like(p)
            st["m"].mul_(b1).add_(g, alpha=1 - b1)
            st["v"].mul_(b2).addcmul_(g, g, value=1 - b2)
            m_hat = st["m"] / (1 - b1 ** self.t)
            v_hat = st["v"] / (1 - b2 ** self.t)
            p.sub_(lr * m_hat / (v_hat.sqrt() + 1e-8))


def _check_group(runs: Sequence[ModelRun]) -> None:
    if not runs:
        raise SpecError("train_batch needs at least one run")
    keys = {r.group_key() for r in runs}
    if len(keys) > 1:
        raise SpecError("train_batch: these runs differ in more than seed/lr/momentum/weight_decay; "
                        "group them with group_runs() first")


def group_runs(runs: Sequence[ModelRun], max_batch: int = 64) -> list[list[ModelRun]]:
    """Split runs into groups that can train as one batched computation (at most `max_batch` each)."""
    groups: dict[str, list[ModelRun]] = {}
    for r in runs:
        groups.setdefault(r.group_key(), []).append(r)
    out = []
    for g in groups.values():
        out.extend(g[i:i + max_batch] for i in range(0, len(g), max_batch))
    return out


def _init_models(runs: Sequence[ModelRun], task: TaskData) -> list[torch.nn.Module]:
    models = []
    for r in runs:
        init = None
        if r.init is not None:
            from weightspace.sources import load_space

            init = load_space(r.init)
        torch.manual_seed(r.seed)
        # a fine-tune's sizes are checked against its init checkpoint, a fresh model's bounded
        model = build_model(r.arch, task.input_shape, task.num_classes, tensors=init, source=r.init,
                            config_at="the zoo spec's arch")
        if init is not None:
            from weightspace.binding import load_into

            load_into(model, init)
        models.append(model)
    return models


def _train_indices(run: ModelRun, n: int) -> torch.Tensor:
    """The model's training subset (data_fraction of the train split, chosen by its seed)."""
    k = max(1, int(round(run.train.data_fraction * n)))
    if k == n:
        return torch.arange(n)
    g = torch.Generator().manual_seed(run.seed * 1_000_003 + 17)
    return torch.randperm(n, generator=g)[:k].sort().values


def train_batch(runs: Sequence[ModelRun], *, task: TaskData | None = None,
                on_epoch: Callable[[int], None] | None = None) -> list[TrainResult]:
    """Train runs that share `group_key()` together as one vmapped computation."""
    _check_group(runs)
    t0 = time.perf_counter()
    cfg = runs[0].train
    task = task or load_task(runs[0].dataset)
    models = _init_models(runs, task)
    params, _ = stack_module_state(models)  # type: ignore[arg-type]
    params = {n: p.detach().clone() for n, p in params.items()}
    skeleton = copy.deepcopy(models[0]).to("meta")
    del models

    def loss_fn(p: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(functional_call(skeleton, p, (x,)), y)

    step_fn = vmap(grad_and_value(loss_fn))
    forward = vmap(lambda p, x: functional_call(skeleton, p, (x,)), in_dims=(0, None))

    def evaluate(x: torch.Tensor, y: torch.Tensor, subsets: list[torch.Tensor] | None = None
                 ) -> tuple[list[float], list[float]]:
        with torch.no_grad():
            logits = forward(params, x)                       # (M, N, C)
        losses, accs = [], []
        for i in range(len(runs)):
            lg, yy = (logits[i], y) if subsets is None else (logits[i][subsets[i]], y[subsets[i]])
            losses.append(F.cross_entropy(lg, yy).item())
            accs.append((lg.argmax(-1) == yy).float().mean().item())
        return losses, accs

    xtr, ytr = task.train.x, task.train.y
    subsets = [_train_indices(r, len(ytr)) for r in runs]
    n_sub = len(subsets[0])
    bs = min(cfg.batch_size, n_sub)
    steps_per_epoch = math.ceil(n_sub / bs)
    total = steps_per_epoch * cfg.epochs
    warmup = steps_per_epoch * cfg.warmup_epochs
    gens = [torch.Generator().manual_seed(r.seed) for r in runs]
    opt = _Optimizer(cfg, runs, params)
    saved: list[list[Checkpoint]] = [[] for _ in runs]
    history: list[dict[str, list[float]]] = [{"train_loss": [], "val_loss": [], "val_acc": []} for _ in runs]
    wanted = set(cfg.checkpoint_epochs)

    def checkpoint(epoch: int) -> None:
        tr_l, tr_a = evaluate(xtr, ytr, subsets)
        va_l, va_a = evaluate(task.val.x, task.val.y)
        te_l, te_a = evaluate(task.test.x, task.test.y)
        for i in range(len(runs)):
            saved[i].append(Checkpoint(
                epoch, {n: p[i].clone() for n, p in params.items()},
                {"train_loss": tr_l[i], "train_acc": tr_a[i], "val_loss": va_l[i], "val_acc": va_a[i],
                 "test_loss": te_l[i], "test_acc": te_a[i]},
            ))

    if 0 in wanted:
        checkpoint(0)
    step = 0
    for epoch in range(1, cfg.epochs + 1):
        order = torch.stack([s[torch.randperm(n_sub, generator=g)] for s, g in zip(subsets, gens)])
        running = torch.zeros(len(runs))
        for b in range(steps_per_epoch):
            idx = order[:, b * bs:(b + 1) * bs]               # (M, B): each model its own batch
            grads, loss = step_fn(params, xtr[idx], ytr[idx])
            opt.step(params, grads, lr_factor(cfg.schedule, step, total, warmup))
            running += loss.detach() * idx.shape[1]
            step += 1
        va_l, va_a = evaluate(task.val.x, task.val.y)
        for i in range(len(runs)):
            history[i]["train_loss"].append(float(running[i]) / n_sub)
            history[i]["val_loss"].append(va_l[i])
            history[i]["val_acc"].append(va_a[i])
        if epoch in wanted:
            checkpoint(epoch)
        if on_epoch is not None:
            on_epoch(epoch)
    secs = time.perf_counter() - t0
    return [TrainResult(r, saved[i], history[i], secs / len(runs)) for i, r in enumerate(runs)]


def train(run: ModelRun, *, task: TaskData | None = None) -> TrainResult:
    """Train one model from its config; checkpoints at `run.train.checkpoint_epochs`."""
    return train_batch([run], task=task)[0]
