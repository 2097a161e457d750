"""Training a gene the papers' way: an auxiliary network built from it, distilled from a teacher.

    gene = train_gene(factory, teacher, open_batches("digits", teacher), mode="tleg", aux_depth=6)
    gene = train_gene(factory, teacher, batches, mode="sws", preset="authors")   # TLEG/SWS code's recipe
    gene.meta["report"]["kd_start"], gene.meta["report"]["kd_end"]     # distillation loss, before/after

The auxiliary network's per-layer tensors are *computed* from the gene each step
(A + x_l B, or the tensor of the layer's stage); only the gene tensors and the
non-layer tensors are parameters (the teacher's side, loss and scoring: distill.py).
`train_gene` reads as its steps: check the
recipe, bind the teacher and data, build the auxiliary network, pick the starting
tensors, evaluate, optimize, evaluate, and pack the result as a Gene.
"""

from __future__ import annotations

import contextlib
import copy
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from weightspace.binding import Adapter
from weightspace.errors import InputError, NonFiniteError, SpecError
from weightspace.ir import MemoryRef, TensorRef, WeightSpace
from weightspace.merges.learngene.config_depth import find_depth_key
from weightspace.merges.learngene.distill import _bind_teacher, _Distillation
from weightspace.merges.learngene.expand import check_compatible
from weightspace.merges.learngene.fit import fit_gene
from weightspace.merges.learngene.gene import Gene, _gene_dtype, _gene_meta, gene_name
from weightspace.merges.learngene.layout import (
    layer_position,
    layer_stages,
)
from weightspace.merges.learngene.recipe import (
    _check_recipe,
    _Recipe,
    _warn_if_warmup_covers_the_run,
    _with_preset,
    lr_at,
)
from weightspace.merges.learngene.stack import _read_stack, _Stack
from weightspace.structure import LayerName, parse_layer

# exempt from weight decay with decay_1d=False besides 1-D tensors and biases (the authors' ViT
# `no_weight_decay()`); a student's own `no_weight_decay()` names are added
NO_DECAY_NAMES = ("pos_embed", "cls_token")
# a trained network whose accuracy is at most this many times the chance rate is "at chance"
CHANCE_MARGIN = 1.5


def train_gene(
    student_factory: Callable[[int], nn.Module],
    teacher: Any,
    batches: Iterable[Mapping[str, Any]],
    *,
    mode: str = "tleg",
    preset: str = "default",
    aux_depth: int | None = None,
    stages: int | Sequence[int] | None = None,
    denominator: str = "L",
    temperature: float | None = None,
    alpha: float | None = None,
    kd_reduction: str | None = None,
    epochs: int | None = None,
    steps: int | None = None,
    lr: float | None = None,
    weight_decay: float | None = None,
    decay_1d: bool | None = None,
    clip: float | None = None,
    warmup_epochs: float | None = None,
    warmup_lr: float | None = None,
    min_lr: float | None = None,
    seed: int = 0,
    init: str = "random",
    config: Mapping[str, Any] | None = None,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> Gene:
    """Train a gene the papers' way: an auxiliary network built from it, distilled from a teacher.

        teacher = open_model("zoo/.../epoch-0020")                       # a ClassifierAdapter
        factory = lambda d: build_model({**arch, "depth": d}, (1, 8, 8), 10)
        gene = train_gene(factory, teacher, open_batches("digits", teacher), mode="tleg",
                          aux_depth=6, epochs=5)
        gene = train_gene(factory, teacher, batches, mode="sws", preset="authors")   # 16 layers, 3,3,4,3,3
        save_expanded(gene, 12, "vit-x12")

    The auxiliary network is `student_factory(aux_depth)` (seeded with `seed`), run with
    `torch.func.functional_call`: each step its per-layer tensors are composed from the
    gene, A_s + x_l B_s (TLEG, x_l = l/aux_depth or l/(aux_depth-1)) or the tensor of the
    stage layer l belongs to (SWS, `stages` a count or list adding up to aux_depth).
    Trained: the gene tensors and the non-layer tensors; loss `distillation_loss` (soft
    distillation at `temperature`, weight `alpha` on it, 1 - alpha on cross-entropy with
    the labels, the KL divided as `kd_reduction` says); AdamW (`weight_decay`, on every
    tensor, or with `decay_1d=False` not on 1-D tensors, biases, pos_embed and cls_token)
    for `steps` optimizer steps (or `epochs` passes); the lr rises linearly from `warmup_lr`
    over `warmup_epochs` passes, then follows a cosine from `lr` to `min_lr` (`lr_at`);
    gradient norm clipped at `clip` (0: not clipped). The student runs in eval mode (no
    dropout).

    `preset` fills every argument left at None (`PRESETS`, explicit arguments win):

    ============  =====================================  ===============================================
    argument      "default" (ours)                       "authors" (TLEG and SWS code, Aux-S)
    ============  =====================================  ===============================================
    aux_depth     6                                      12 (TLEG), 16 (SWS)
    stages (SWS)  min(3, aux_depth), split evenly         3,3,4,3,3 at 16 layers, else 5 split evenly
    temperature   2.0                                    1.0
    alpha         0.5                                    1.0 (distillation only)
    kd_reduction  "batchmean" (KL per prediction)        "mean" (divided by every logit: C times less)
    epochs        10                                     150
    lr            1e-3                                   5e-4 * batch size / 512
    weight_decay  0.05 on every tensor                   0.05, none on 1-D tensors and biases
    clip          1.0                                    0 (none)
    warm-up       none                                   5 epochs from 1e-6
    min_lr        0                                      1e-5
    ============  =====================================  ===============================================

    Their data augmentation (RandAugment, mixup, cutmix), EMA and per-epoch lr steps are
    not reproduced. Ours is the default because it leaves chance within a few epochs on a
    small task, where 150 epochs at lr 6e-5 (their rule at batch 64) are slow.

    `init`: "random" starts from the student's own seeded initialization (A and stage
    tensors from its layers 0, 1, ...; B from layer 1 where the architecture draws layers
    at random, 0 where it sets them to constants such as norm weights: the authors' code
    draws both A and B for weights and zeros B for norms); "fit" starts from
    `fit_gene` of the teacher's weights (same architecture and width; SWS: each stage
    from the teacher layers at the same relative depth as the stage's layers).

    `config` is the auxiliary network's config.json (depth key rewritten on expansion;
    default: `student.config.to_dict()` for a transformers module; without one,
    expansions are written without a config.json). `teacher` is an
    Adapter, an nn.Module (a classifier: batches {"x", "y"}), or (either, params).
    Returns a Gene: source_depth = aux_depth, `meta["history"]` the loss per step,
    `meta["report"]` loss/kd/ce over all batches before and after training, and the
    recipe as run (preset, lr, warm-up steps, ...).
    """
    t_start = time.perf_counter()
    recipe = _check_recipe(_with_preset(
        preset, mode=mode, aux_depth=aux_depth, stages=stages, denominator=denominator,
        temperature=temperature, alpha=alpha, kd_reduction=kd_reduction, epochs=epochs, steps=steps, lr=lr,
        weight_decay=weight_decay, decay_1d=decay_1d, clip=clip, warmup_epochs=warmup_epochs,
        warmup_lr=warmup_lr, min_lr=min_lr, seed=seed, init=init))
    device = torch.device(device)
    distill = _bind_teacher(teacher, batches, temperature=recipe.temperature, alpha=recipe.alpha,
                            device=device, kd_reduction=recipe.kd_reduction)
    recipe = recipe.at_batch(int(next(iter(distill.data[0].values())).shape[0]))
    aux = _build_auxiliary(student_factory, distill.teacher, recipe, device)
    aux.leaves = _starting_tensors(aux, recipe, distill.teacher_params, device)
    with _in_eval_mode(aux.student, distill.teacher.module):
        before = distill.evaluate(aux.adapter, aux.compose)
        total = recipe.total_steps(len(distill.data))
        _warn_if_warmup_covers_the_run(recipe.warmup_steps(len(distill.data)), total, recipe.lr)
        history = _optimize(aux, distill, recipe, total, progress)
        after = distill.evaluate(aux.adapter, aux.compose)
    refs, stack = _trained_tensors(aux, recipe)
    cfg = _student_config(aux.student, config)
    student_type = type(aux.student).__name__
    meta = _gene_meta(
        mode=recipe.mode, stack=stack, denominator=recipe.denominator, stages=recipe.stages, config=cfg,
        depth_key=find_depth_key(cfg, recipe.aux_depth),
        provenance={"method": "train", "source": f"auxiliary {student_type} x{recipe.aux_depth}",
                    "teacher": type(distill.teacher.module).__name__,
                    "created": time.strftime("%Y-%m-%dT%H:%M:%S")},
        report=_train_report(recipe, before, after, distill.data, total, t_start), history=history,
    )
    space = WeightSpace(refs, {"source": f"trained {recipe.mode} gene ({student_type})", "format": "memory",
                               "files": {}})
    return Gene(space, meta)


# ---------------------------------------------------------------------------------------------
# the steps of train_gene, in order


@dataclass
class _Auxiliary:
    """The auxiliary network: the student module and how its layers are composed from the gene."""

    student: nn.Module
    adapter: Adapter                      # the teacher's adapter, bound to the student
    where: str                            # names the student in errors
    stack: _Stack
    named: dict[str, torch.Tensor]        # the student's own parameters (its seeded initialization)
    buffers: dict[str, torch.Tensor]      # non-layer buffers, carried into the gene as they are
    xs: list[float] | None                # TLEG: x_l of every layer
    owner: list[int] | None               # SWS: the stage of every layer
    leaves: dict[str, torch.Tensor] = field(default_factory=dict)  # trained: gene + non-layer tensors

    def layer(self, i: int, suffix: str) -> str:
        return LayerName(self.stack.prefix, i, suffix).with_index(i)

    def dtype(self, name: str) -> torch.dtype:
        return self.named[name].dtype

    def compose(self) -> dict[str, torch.Tensor]:
        """The student's parameters, each layer tensor computed from the gene leaves."""
        p = {n: self.leaves[n].to(self.dtype(n)) for n in self.stack.non_layer}
        for s in self.stack.suffixes:
            for i in range(self.stack.depth):
                if self.xs is not None:
                    t = self.leaves[gene_name("A", s)] + self.xs[i] * self.leaves[gene_name("B", s)]
                else:
                    assert self.owner is not None
                    t = self.leaves[gene_name(self.owner[i], s)]
                p[self.layer(i, s)] = t.to(self.dtype(self.layer(i, s)))
        return p


def _build_auxiliary(student_factory: Callable[[int], nn.Module], teacher: Adapter, recipe: _Recipe,
                     device: torch.device) -> _Auxiliary:
    """`student_factory(aux_depth)`, seeded, checked to hold one stack of aux_depth layers."""
    depth = recipe.aux_depth
    torch.manual_seed(recipe.seed)
    student = student_factory(depth)
    if not isinstance(student, nn.Module):
        raise SpecError(f"student_factory must return an nn.Module, got {type(student).__name__}")
    student = student.to(device)
    adapter = copy.copy(teacher)
    adapter.module = student
    named = dict(student.named_parameters())
    where = f"student_factory({depth}) ({type(student).__name__})"
    stack = _read_stack({n: (tuple(p.shape), p.dtype) for n, p in named.items()}, where)
    if stack.depth != depth:
        raise InputError(f"{where} built {stack.depth} layers in {stack.prefix}, not {depth}")
    buffer_names = [n for n in student.state_dict() if n not in dict(student.named_parameters(remove_duplicate=False))]
    layer_buffers = [n for n in buffer_names if parse_layer(n) is not None]
    if layer_buffers:
        raise InputError(f"{where}: per-layer buffer {layer_buffers[0]!r} is not supported; learngene "
                         f"trains parameter tensors")
    buffers = {n: t.detach().to("cpu").clone() for n, t in student.state_dict().items() if n in buffer_names}
    xs = ([layer_position(i, depth, recipe.denominator) for i in range(depth)]
          if recipe.denominator else None)
    owner = layer_stages(recipe.stages) if recipe.stages is not None else None
    return _Auxiliary(student, adapter, where, stack, named, buffers, xs, owner)


def _starting_tensors(aux: _Auxiliary, recipe: _Recipe, teacher_params: dict[str, torch.Tensor],
                      device: torch.device) -> dict[str, torch.Tensor]:
    """The leaves training starts from (gene tensors, then non-layer tensors), on the device."""
    if recipe.init == "fit":
        start = _fit_of_teacher(aux, recipe, teacher_params)
    else:
        start = _from_student_init(aux, recipe)
    return {n: t.to(device).requires_grad_(True) for n, t in start.items()}


def _fit_of_teacher(aux: _Auxiliary, recipe: _Recipe,
                    teacher_params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """init="fit": `fit_gene` of the teacher's weights, checked against the student."""
    stack, sizes = aux.stack, recipe.stages
    tspace = WeightSpace.from_tensors({k: v.cpu() for k, v in teacher_params.items()},
                                      {"source": "the teacher", "format": "memory"})
    teacher_depth = _read_stack({n: (tuple(t.shape), t.dtype) for n, t in teacher_params.items()},
                                "the teacher").depth
    start = fit_gene(tspace, mode=recipe.mode, denominator=recipe.denominator or "L",
                     stages=_teacher_stages(sizes, teacher_depth) if sizes is not None else None)
    sspace = WeightSpace({n: MemoryRef(n, p.detach()) for n, p in aux.named.items()},
                         {"source": aux.where, "format": "memory"})
    check_compatible(start, sspace)
    gene_t = {n: start.space[n].load("cpu", torch.float32) for s in stack.suffixes
              for n in start.tensor_names(s)}
    nonlayer_t = {n: start.space[n].load("cpu", torch.float32) for n in stack.non_layer}
    return {**gene_t, **nonlayer_t}


def _teacher_stages(sizes: list[int], teacher_depth: int) -> list[int]:
    """The auxiliary network's stages (layer counts at aux depth) carried over to the teacher's
    depth: teacher layer j joins the stage that holds relative depth (j + 1/2) / teacher_depth.
    At equal depth the list is the auxiliary network's own (1,5,1 fits layers 0 | 1-5 | 6)."""
    depth = sum(sizes)
    if teacher_depth == depth:
        return list(sizes)
    ends = [sum(sizes[:s + 1]) / depth for s in range(len(sizes))]
    out = [0] * len(sizes)
    for j in range(teacher_depth):
        centre = (j + 0.5) / teacher_depth
        out[next(s for s, e in enumerate(ends) if centre < e or s == len(ends) - 1)] += 1
    if 0 in out:
        raise SpecError(f"init='fit': stages {','.join(map(str, sizes))} over {depth} layers leave stage "
                        f"{out.index(0)} without a layer of the {teacher_depth}-layer teacher at the same "
                        f"relative depth; use fewer stages or init='random'")
    return out


def _from_student_init(aux: _Auxiliary, recipe: _Recipe) -> dict[str, torch.Tensor]:
    """init="random": the student's seeded layers. TLEG: A = layer 0, B = layer 1 (0 where the
    two are equal, i.e. set to a constant); SWS: each stage from its first layer."""
    stack, named, depth = aux.stack, aux.named, recipe.aux_depth
    gene_t: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for s in stack.suffixes:
            if recipe.mode == "tleg":
                t0, t1 = named[aux.layer(0, s)].detach(), named[aux.layer(1, s)].detach()
                gene_t[gene_name("A", s)] = t0.float().cpu().clone()
                gene_t[gene_name("B", s)] = (torch.zeros_like(t0) if torch.equal(t0, t1) else t1).float().cpu().clone()
            else:
                assert recipe.stages is not None
                first = 0
                for st, n_layers in enumerate(recipe.stages):
                    src = aux.layer(min(first, depth - 1), s)
                    gene_t[gene_name(st, s)] = named[src].detach().float().cpu().clone()
                    first += n_layers
    nonlayer_t = {n: named[n].detach().float().cpu().clone() for n in stack.non_layer}
    return {**gene_t, **nonlayer_t}


@contextlib.contextmanager
def _in_eval_mode(student: nn.Module, teacher: nn.Module) -> Iterator[None]:
    """Both networks in eval mode (no dropout) while training the gene; their modes restored after."""
    was_training = (student.training, teacher.training)
    student.eval()
    teacher.eval()
    try:
        yield
    finally:
        student.train(was_training[0])
        teacher.train(was_training[1])


def _no_decay(name: str, tensor: torch.Tensor, student: nn.Module) -> bool:
    """decay_1d=False leaves out what timm's `param_groups_weight_decay` leaves out (the authors'
    optimizer): 1-D tensors, biases and the model's `no_weight_decay()` names."""
    named = getattr(student, "no_weight_decay", None)
    extra = set(named()) if callable(named) else set()
    leaf = _suffix_of(name) if name.startswith("gene.") else name
    return (tensor.ndim <= 1 or name.endswith(".bias") or leaf in extra
            or leaf.split(".")[-1] in NO_DECAY_NAMES)


def _param_groups(leaves: dict[str, torch.Tensor], recipe: _Recipe, student: nn.Module) -> list[dict[str, Any]]:
    """AdamW's parameter groups: every leaf decayed, or (decay_1d=False) two groups, the second
    without weight decay."""
    if recipe.decay_1d:
        return [{"params": list(leaves.values()), "weight_decay": recipe.weight_decay, "names": list(leaves)}]
    skip = {n for n, t in leaves.items() if _no_decay(n, t, student)}
    return [{"params": [t for n, t in leaves.items() if n not in skip], "weight_decay": recipe.weight_decay,
             "names": [n for n in leaves if n not in skip]},
            {"params": [t for n, t in leaves.items() if n in skip], "weight_decay": 0.0,
             "names": [n for n in leaves if n in skip]}]


def _optimize(aux: _Auxiliary, distill: _Distillation, recipe: _Recipe, total: int,
              progress: bool) -> list[float]:
    """`total` AdamW steps on the leaves (lr from `lr_at`), shuffled batches; the loss per step."""
    assert recipe.lr is not None
    groups = _param_groups(aux.leaves, recipe, aux.student)
    opt = torch.optim.AdamW([{k: v for k, v in g.items() if k != "names"} for g in groups if g["params"]],
                            lr=recipe.lr, weight_decay=recipe.weight_decay)
    warmup = recipe.warmup_steps(len(distill.data))
    gen = torch.Generator().manual_seed(recipe.seed)
    order: list[int] = []
    history: list[float] = []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc=f"learngene {recipe.mode}", unit="step")
    try:
        for step in range(total):
            lr = lr_at(step, total, lr=recipe.lr, warmup_steps=warmup, warmup_lr=recipe.warmup_lr,
                       min_lr=recipe.min_lr)
            for group in opt.param_groups:
                group["lr"] = lr
            if not order:
                order.extend(torch.randperm(len(distill.data), generator=gen).tolist())
            loss, _, _ = distill.losses(*distill.forward(aux.adapter, aux.compose(), distill.data[order.pop(0)]))
            if not bool(torch.isfinite(loss)):
                raise NonFiniteError(f"train_gene: the loss is {float(loss.detach())} at step {step + 1} of "
                                     f"{total}; lower lr (now {recipe.lr:g}) or the temperature")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if recipe.clip > 0:
                torch.nn.utils.clip_grad_norm_(list(aux.leaves.values()), recipe.clip)
            opt.step()
            history.append(round(float(loss.detach()), 6))
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return history


def _trained_tensors(aux: _Auxiliary, recipe: _Recipe) -> tuple[dict[str, TensorRef], _Stack]:
    """The gene's tensors after training (gene dtype; non-layer tensors in the student's dtype,
    buffers as they were), and the stack with the buffers listed as non-layer tensors."""
    stack, leaves = aux.stack, aux.leaves
    refs: dict[str, TensorRef] = {}
    for n in (n for s in stack.suffixes for n in _names_for(recipe.mode, s, recipe.stages)):
        refs[n] = MemoryRef(n, leaves[n].detach().to("cpu", _gene_dtype(stack.dtypes[_suffix_of(n)])).clone())
    for n in stack.non_layer:
        refs[n] = MemoryRef(n, leaves[n].detach().to("cpu", aux.dtype(n)).clone())
    for n, t in aux.buffers.items():
        refs[n] = MemoryRef(n, t)
    stack = _Stack(stack.prefix, stack.depth, stack.suffixes, stack.shapes, stack.dtypes,
                   list(stack.non_layer) + [n for n in aux.buffers if n not in stack.non_layer])
    return refs, stack


def _train_report(recipe: _Recipe, before: dict[str, Any], after: dict[str, Any],
                  data: list[dict[str, torch.Tensor]], total: int, t_start: float) -> dict[str, Any]:
    """meta["report"] of a trained gene: the losses and accuracy before and after, and the recipe."""
    chance = before["chance"]
    return {
        "kind": "train", "loss_start": before["loss"], "loss_end": after["loss"],
        "kd_start": before["kd"], "kd_end": after["kd"], "ce_start": before["ce"], "ce_end": after["ce"],
        "acc_start": before["acc"], "acc_end": after["acc"], "chance": chance,
        "at_chance": after["acc"] <= CHANCE_MARGIN * chance,
        "preset": recipe.preset,
        "steps": total, "epochs": recipe.epochs if recipe.steps is None else None,
        "batches": len(data), "batch_size": recipe.batch_size,
        "examples": sum(int(next(iter(b.values())).shape[0]) for b in data),
        "lr": recipe.lr, "weight_decay": recipe.weight_decay, "decay_1d": recipe.decay_1d, "clip": recipe.clip,
        "warmup_steps": recipe.warmup_steps(len(data)), "warmup_lr": recipe.warmup_lr, "min_lr": recipe.min_lr,
        "warmup_covers_run": 0 < recipe.warmup_steps(len(data)) >= total,
        "temperature": recipe.temperature, "alpha": recipe.alpha, "kd_reduction": recipe.kd_reduction,
        "init": recipe.init, "seed": recipe.seed, "schedule": "cosine", "optimizer": "adamw",
        "seconds": round(time.perf_counter() - t_start, 3),
    }


# ---------------------------------------------------------------------------------------------
# small helpers


def _student_config(student: nn.Module, config: Mapping[str, Any] | None) -> dict | None:
    if config is not None:
        return copy.deepcopy(dict(config))
    cfg = getattr(student, "config", None)
    if cfg is not None and hasattr(cfg, "to_dict"):
        return cfg.to_dict()
    return None


def _names_for(mode: str, suffix: str, sizes: list[int] | None) -> list[str]:
    if mode == "tleg":
        return [gene_name("A", suffix), gene_name("B", suffix)]
    return [gene_name(s, suffix) for s in range(len(sizes or []))]


def _suffix_of(gene_tensor: str) -> str:
    return gene_tensor.split(".", 2)[2] if gene_tensor.count(".") >= 2 else ""
