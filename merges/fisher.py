"""Fisher merging: a per-parameter average weighted by each model's diagonal Fisher.

    fisher = fisher_diagonal(ClassifierAdapter(model), loader, estimator="exact")
    save_fisher(fisher, "ft_a.fisher.safetensors")

    merge_method: fisher
    models:
      - {model: ./ft_a, parameters: {weight: 0.5, fisher: ./ft_a.fisher.safetensors}}
      - {model: ./ft_b, parameters: {weight: 0.5, fisher: ./ft_b.fisher.safetensors}}
    # the defaults, which are the authors' settings:
    parameters: {fisher_floor: 1.0e-6, floor_mode: max, normalize_fishers: true, favor_target: true}

Each entry of the result is

    theta* = sum_i c_i F~_i theta_i / sum_i c_i F~_i

with c_i the model's `weight`, divided by the L2 norm of model i's whole Fisher
(`normalize_fishers`), and F~_i model i's Fisher with the floor eps = `fisher_floor`:
max(F_i, eps) (`floor_mode: max`) or F_i + eps (`floor_mode: add`), for the first
model (the target) only (`favor_target`) or for every model.

Matena & Raffel 2022, "Merging Models with Fisher-Weighted Averaging" (NeurIPS 2022,
arXiv:2111.09832). The defaults follow the authors' code (github.com/mmatena/model_merging,
model_merging/merging.py, `_merge_with_coeffs`: `diag = tf.maximum(diag, fisher_floor)` for
the target only when `favor_target_model`, and `generate_merged_for_coeffs_set`: coefficients
divided by `_l2_norm_of_fisher`; scripts/merge_and_evaluate.py: fisher_floor 1e-6,
favor_target_model and normalize_fishers both True). `floor_mode: add, normalize_fishers:
false, favor_target: false` is the plain, symmetric variant (what this module did before).
Where the authors' code merges only the model body and keeps the target's head (their
heads are per task), compute the Fisher over the body and set `uncovered: first`.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

import torch

from weightspace.binding import IGNORE_INDEX, Adapter
from weightspace.errors import InputError, SpecError, WeightspaceError
from weightspace.files import FileCache, save_safetensors_atomic
from weightspace.ir import WeightSpace
from weightspace.methods import MergeMethod, Param, TensorParams, register
from weightspace.safetensors_io import read_header
from weightspace.sources import load_space

Estimator = Literal["exact", "sampled", "empirical"]
ESTIMATORS = ("exact", "sampled", "empirical")
# the exact Fisher takes one backward pass per class; past this, sample instead
MAX_EXACT_CLASSES = 1024

# ---------------------------------------------------------------------------------------------
# estimating the diagonal Fisher


def fisher_diagonal(
    adapter: Adapter,
    batches: Iterable[Mapping[str, Any]],
    *,
    params: Mapping[str, torch.Tensor] | None = None,
    estimator: Estimator = "exact",
    n_samples: int = 1,
    n_examples: int | None = None,
    seed: int = 0,
    per_example: Literal["auto", "vmap", "loop"] = "auto",
    progress: bool = False,
) -> WeightSpace:
    """The diagonal of the Fisher information of `adapter`'s model, as a float32 WeightSpace.

        fisher = fisher_diagonal(ClassifierAdapter(model), [{"x": x, "y": y}], estimator="empirical")
        fisher["head.weight"].load()          # same names and shapes as the parameters

    With g(y) the gradient of an example's log-likelihood of labels y (summed over its
    predictions whose label is not -100), each estimator averages over examples:

    - ``exact``: sum_c p(c|x) g(c)^2, the true Fisher (one prediction per example, C <= 1024);
    - ``sampled``: (1/S) sum_s g(y_s)^2 with y_s drawn from the model (`n_samples` S, `seed`);
    - ``empirical``: g(y_true)^2, the squared gradient at the data's labels.

    Gradients are per example (`torch.func.vmap` over the batch, or one autograd pass per
    example: ``per_example="auto"`` falls back to the loop when the model cannot be vmapped,
    as transformers models cannot). `params` (default: the module's own) are the tensors the
    Fisher is taken at and over; `n_examples` stops early. Non-tensor batch entries are ignored.
    """
    if estimator not in ESTIMATORS:
        raise SpecError(f"estimator: unknown {estimator!r}; use one of {', '.join(ESTIMATORS)}")
    if per_example not in ("auto", "vmap", "loop"):
        raise SpecError(f"per_example: unknown {per_example!r}; use auto, vmap or loop")
    if estimator == "sampled" and (not isinstance(n_samples, int) or n_samples < 1):
        raise SpecError(f"n_samples: expected a positive integer, got {n_samples!r}")
    if n_examples is not None and n_examples < 1:
        raise SpecError(f"n_examples: expected a positive integer, got {n_examples!r}")
    params = dict(adapter.params() if params is None else params)
    if not params:
        raise InputError("fisher_diagonal: there are no parameters to take the Fisher over")
    device = next(iter(params.values())).device
    params = {n: t.detach() for n, t in params.items()}
    total = {n: torch.zeros(t.shape, dtype=torch.float32, device=device) for n, t in params.items()}
    gen = torch.Generator().manual_seed(seed)
    mode = "vmap" if per_example in ("auto", "vmap") else "loop"
    seen = 0
    bar = _progress_bar(progress)
    module = adapter.module
    was_training = module.training
    module.eval()  # no dropout: the Fisher is of the model as it predicts
    try:
        for raw in batches:
            batch = _tensors_of(raw, device)
            if n_examples is not None:
                batch = {k: v[: n_examples - seen] for k, v in batch.items()}
            size = next(iter(batch.values())).shape[0]
            if size == 0:
                continue
            targets, weights, mask = _targets(adapter, params, batch, estimator, n_samples, gen)
            if mode == "vmap":
                try:
                    part = _batch_vmap(adapter, params, batch, targets, weights, mask)
                except WeightspaceError:
                    raise
                except Exception:
                    if per_example == "vmap":
                        raise
                    mode = "loop"  # data-dependent control flow (transformers): one example at a time
            if mode == "loop":
                part = _batch_loop(adapter, params, batch, targets, weights, mask)
            for n, f in part.items():
                total[n] += f
            seen += size
            if bar is not None:
                bar.update(size)
            if n_examples is not None and seen >= n_examples:
                break
    finally:
        module.train(was_training)
        if bar is not None:
            bar.close()
    if seen == 0:
        raise InputError("fisher_diagonal: the batches hold no examples")
    fisher = {n: (f / seen).cpu() for n, f in total.items()}
    if all(not bool(f.any()) for f in fisher.values()):
        warnings.warn(f"the {estimator} Fisher over {seen} examples is zero everywhere: the model "
                      "may be saturated (probabilities of exactly 0 or 1) or the parameters unused; "
                      "a Fisher merge with it falls back to the floor", stacklevel=2)
    info = {"estimator": estimator, "examples": seen,
            "n_samples": n_samples if estimator == "sampled" else None, "seed": seed,
            "per_example": mode}
    meta = {"source": f"fisher({estimator}) of {type(module).__name__}", "format": "memory",
            "fisher": info}
    return WeightSpace.from_tensors(fisher, meta)


def _progress_bar(progress: bool):
    if not progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(desc="fisher", unit="ex")


def _tensors_of(batch: Mapping[str, Any], device: torch.device) -> dict[str, torch.Tensor]:
    if not isinstance(batch, Mapping):
        raise InputError(f"fisher_diagonal: a batch must be a dict of tensors, got {type(batch).__name__}")
    out = {k: v.to(device) for k, v in batch.items() if isinstance(v, torch.Tensor)}
    if not out:
        raise InputError("fisher_diagonal: a batch holds no tensors")
    sizes = {v.shape[0] if v.dim() else None for v in out.values()}
    if len(sizes) != 1 or None in sizes:
        raise InputError(f"fisher_diagonal: batch tensors need one leading batch dimension, got "
                         f"{ {k: list(v.shape) for k, v in out.items()} }")
    return out


def _targets(adapter: Adapter, params: dict[str, torch.Tensor], batch: dict[str, torch.Tensor],
             estimator: str, n_samples: int, gen: torch.Generator
             ) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
    """The label sets each example's squared gradient is taken at, their weights, and the mask.

    Returns targets (each (B, K) class ids), weights (each (B,), summing to 1 per example)
    and mask ((B, K) 1.0 where a prediction counts).
    """
    try:
        labels = adapter.labels(batch)
    except KeyError:
        labels = None  # the model's own distribution needs no labels
    if estimator == "empirical" and labels is None:
        raise InputError("fisher_diagonal: the empirical Fisher needs labels, and the batch has none")
    classes = adapter.num_classes if estimator == "empirical" else None
    probs = None
    if classes is None:
        with torch.no_grad():
            logits = adapter.logits(params, batch)
        b, k, classes = logits.shape
        probs = torch.softmax(logits.float(), -1)
    else:
        b, k = labels.shape
    if labels is not None:
        labels = labels.long()
        if tuple(labels.shape) != (b, k):
            raise InputError(f"fisher_diagonal: labels have shape {list(labels.shape)}, but the model "
                             f"makes {k} prediction(s) for each of {b} examples")
        bad = (labels != IGNORE_INDEX) & ((labels < 0) | (labels >= classes))
        if bad.any():
            raise InputError(f"label {int(labels[bad][0])} is outside the model's {classes} classes "
                             f"[0, {classes}); is this data whose labels exceed the head?")
        mask = (labels != IGNORE_INDEX).float()
    else:
        mask = torch.ones(b, k, device=probs.device)
    if estimator == "empirical":
        return [labels.clamp(min=0)], [torch.ones(b, device=mask.device)], mask
    if estimator == "exact":
        if k != 1:
            raise SpecError(f"exact Fisher needs one prediction per example, and this model makes {k}; "
                            f"use sampled or empirical for language models")
        if classes > MAX_EXACT_CLASSES:
            raise SpecError(f"exact Fisher over {classes} classes takes {classes} backward passes per "
                            f"example (at most {MAX_EXACT_CLASSES}); use estimator sampled")
        return ([torch.full((b, 1), c, dtype=torch.long, device=mask.device) for c in range(classes)],
                [probs[:, 0, c] for c in range(classes)], mask)
    draws = torch.multinomial(probs.reshape(b * k, classes).cpu(), n_samples, replacement=True,
                              generator=gen).reshape(b, k, n_samples).to(mask.device)
    share = torch.full((b,), 1.0 / n_samples, device=mask.device)
    return [draws[..., s] for s in range(n_samples)], [share] * n_samples, mask


def _log_likelihood(adapter: Adapter, params: dict[str, torch.Tensor], batch: dict[str, torch.Tensor],
                    target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """sum over a batch's counted predictions of log p(target | x), in float32."""
    logp = torch.log_softmax(adapter.logits(params, batch).float(), -1)
    return (logp.gather(-1, target.unsqueeze(-1)).squeeze(-1) * mask).sum()


def _batch_vmap(adapter: Adapter, params: dict[str, torch.Tensor], batch: dict[str, torch.Tensor],
                targets: list[torch.Tensor], weights: list[torch.Tensor], mask: torch.Tensor
                ) -> dict[str, torch.Tensor]:
    def one(p, example, target, m):  # a single example, re-batched as size 1
        ex = {k: v.unsqueeze(0) for k, v in example.items()}
        return _log_likelihood(adapter, p, ex, target.unsqueeze(0), m.unsqueeze(0))

    per_example = torch.func.vmap(torch.func.grad(one), in_dims=(None, 0, 0, 0))
    out = {n: torch.zeros(t.shape, dtype=torch.float32, device=t.device) for n, t in params.items()}
    for target, w in zip(targets, weights):
        grads = per_example(params, batch, target, mask)
        for n, g in grads.items():
            g = g.float()
            out[n] += torch.einsum("b,b...->...", w.float(), g * g)
    return out


def _batch_loop(adapter: Adapter, params: dict[str, torch.Tensor], batch: dict[str, torch.Tensor],
                targets: list[torch.Tensor], weights: list[torch.Tensor], mask: torch.Tensor
                ) -> dict[str, torch.Tensor]:
    names = list(params)
    leaves = [params[n].detach().requires_grad_(True) for n in names]
    p = dict(zip(names, leaves))
    out = [torch.zeros(t.shape, dtype=torch.float32, device=t.device) for t in leaves]
    size = mask.shape[0]
    with torch.enable_grad():
        for i in range(size):
            if not bool(mask[i].any()):  # every prediction ignored: a zero gradient
                continue
            ex = {k: v[i : i + 1] for k, v in batch.items()}
            logp = torch.log_softmax(adapter.logits(p, ex).float(), -1)[0]  # (K, C), one forward
            for j, (target, w) in enumerate(zip(targets, weights)):
                ll = (logp.gather(-1, target[i].unsqueeze(-1)).squeeze(-1) * mask[i]).sum()
                grads = torch.autograd.grad(ll, leaves, retain_graph=j + 1 < len(targets),
                                            allow_unused=True)
                wi = float(w[i])
                for acc, g in zip(out, grads):
                    if g is not None:
                        acc.add_(g.float().square(), alpha=wi)
    return dict(zip(names, out))


# ---------------------------------------------------------------------------------------------
# Fisher files


def save_fisher(space: WeightSpace, path: str | Path) -> Path:
    """Write a Fisher (or any small space) to one safetensors file, atomically.

        save_fisher(fisher_diagonal(adapter, batches), "ft_a.fisher.safetensors")

    `__metadata__` holds {"format": "pt", "fisher": JSON of space.meta["fisher"]}.
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        raise SpecError(f"{path}: a Fisher file is a .safetensors file; name it *.safetensors")
    tensors = {n: ref.load("cpu") for n, ref in space.items()}
    metadata = {"format": "pt", "fisher": json.dumps(space.meta.get("fisher", {}), sort_keys=True)}
    return save_safetensors_atomic(tensors, path, metadata)


def check_fisher(path: str | Path) -> dict[str, Any]:
    """Read a Fisher file through once and summarize it; raise InputError when it cannot weigh a merge.

        check_fisher("ft_a.fisher.safetensors")
        # {'tensors': 8, 'numel': 1234, 'norm': 0.31, 'max': 0.02, 'zero_tensors': [...], 'fisher': {...}}

    Refused: negative or non-finite entries, and a file that is zero everywhere (a saturated or
    broken estimate: merged with it, that model would count only through the floor).
    """
    space = load_space(path)
    squares = 0.0
    peak = 0.0
    numel = 0
    zero_tensors = []
    for name, ref in space.items():
        f = ref.load("cpu", torch.float64)
        _check_values(f, name, str(path))
        squares += float(f.square().sum())
        peak = max(peak, float(f.max()) if f.numel() else 0.0)
        numel += f.numel()
        if not bool(f.any()):
            zero_tensors.append(name)
    if len(zero_tensors) == len(space):
        raise InputError(f"Fisher file {str(path)!r} is zero everywhere ({len(space)} tensors); "
                         f"recompute it (a saturated model has a zero exact Fisher: try estimator "
                         f"empirical) or leave the model out")
    try:
        _, header_meta = read_header(path) if Path(path).is_file() else (None, {})
        info = json.loads(header_meta.get("fisher", "{}"))
    except ValueError:
        info = {}
    return {"tensors": len(space), "numel": numel, "norm": math.sqrt(squares), "max": peak,
            "zero_tensors": zero_tensors, "fisher": info}


_NORMS = FileCache()


def _norm_of_file(p: Path) -> float:
    squares = 0.0
    for ref in load_space(p).values():
        squares += float(ref.load("cpu", torch.float64).square().sum())
    return math.sqrt(squares)


def fisher_norms(paths: Iterable[str | Path]) -> list[float]:
    """The L2 norm of each Fisher file over all its tensors (what `normalize_fishers` divides by).

        fisher_norms(["a.fisher.safetensors", "b.fisher.safetensors"])   # [0.31, 0.07]

    Each file is read once per process (cached by path, size and mtime). Put a value in a
    spec as `models[i].parameters.fisher_norm` when the merge cannot find the file itself.
    """
    return [_NORMS.get(Path(p).expanduser(), _norm_of_file, what="Fisher file") for p in paths]


def _check_values(f: torch.Tensor, name: str, where: str) -> None:
    if not bool(torch.isfinite(f).all()):
        hint = (" (loaded as float16, where values above 65504 overflow: use dtype float32 or "
                "bfloat16)" if f.dtype == torch.float16 else "")
        raise InputError(f"Fisher for tensor {name!r} has NaN or Inf entries ({where}){hint}")
    if bool((f < 0).any()):
        raise InputError(f"Fisher for tensor {name!r} has negative entries ({where}); "
                         f"a diagonal Fisher is a mean of squares")


# ---------------------------------------------------------------------------------------------
# the merge


FLOOR_MODES = ("max", "add")


def fisher_weighted_average(tensors: list[torch.Tensor], fishers: list[torch.Tensor],
                            coefficients: list[float], floor: float = 1e-6,
                            favor_target: bool = True, floor_mode: str = "max") -> torch.Tensor:
    """sum_i c_i F~_i x_i / sum_i c_i F~_i, in float32 at least.

    F~_i is max(F_i, floor) (`floor_mode="max"`, the authors' `tf.maximum`) or F_i + floor
    (`"add"`), for the first model (the target) only under `favor_target` (the other models
    keep F_i as it is), else for every model. With `favor_target`, an entry no other
    Fisher weighs keeps the target's value. An entry where sum_i c_i F~_i is 0 (the target's
    weight is 0 and no donor's Fisher reaches it, or floor 0) is sum_i c_i x_i / sum_i c_i.

    >>> fisher_weighted_average([torch.tensor([0.0]), torch.tensor([4.0])],
    ...                         [torch.tensor([1.0]), torch.tensor([3.0])], [1.0, 1.0], floor=0.0)
    tensor([3.])
    """
    if floor_mode not in FLOOR_MODES:
        raise SpecError(f"floor_mode: unknown {floor_mode!r}; use {' or '.join(FLOOR_MODES)}")
    work = torch.promote_types(tensors[0].dtype, torch.float32)
    num = torch.zeros(tensors[0].shape, dtype=work, device=tensors[0].device)
    den = torch.zeros_like(num)
    for i, (x, f, c) in enumerate(zip(tensors, fishers, coefficients)):
        w = f.to(work)
        if i == 0 or not favor_target:
            w = w.clamp(min=floor) if floor_mode == "max" else w + floor
        w = w * c
        num.addcmul_(w, x.to(work))
        den.add_(w)
    zero = den == 0
    if not bool(zero.any()):
        return (num / den).to(tensors[0].dtype)
    # No model with a positive weight has a Fisher there (a zero-weight target under
    # favor_target, the grid end the authors' search tries, or fisher_floor 0): the authors'
    # code divides 0 by 0; we take the weighted average, which at target weight 0 is the donors'.
    total = float(sum(coefficients))
    if total <= 0:
        raise InputError(f"the weighted Fishers sum to 0 at {int(zero.sum())} entries and the "
                         f"weights sum to {total:g}; give a model a positive weight")
    avg = sum(c * x.to(work) for c, x in zip(coefficients, tensors)) / total
    return torch.where(zero, avg, num / den.masked_fill(zero, 1.0)).to(tensors[0].dtype)


UNCOVERED = ("average", "first")


@register
class Fisher(MergeMethod):
    elementwise = True
    name = "fisher"
    pretty_name = "Fisher merging"
    paper = "Matena & Raffel 2022, Merging Models with Fisher-Weighted Averaging"
    reference_url = "https://arxiv.org/abs/2111.09832"
    uses_base = "none"
    companions = ("fisher",)
    companion_optional = True  # a Fisher may leave tensors out (a new head): see `uncovered`
    # defaults: the authors' (model_merging/merging.py and scripts/merge_and_evaluate.py)
    global_params = (
        Param("fisher_floor", default=1e-6, ge=0.0, doc="the least weight a Fisher entry gets (the first "
              "model's only under favor_target), so no entry has zero total weight (authors: 1e-6)"),
        Param("floor_mode", default="max", kind=str, choices=FLOOR_MODES,
              doc="'max': max(F, fisher_floor), as the authors' code; 'add': F + fisher_floor"),
        Param("normalize_fishers", default=True, kind=bool,
              doc="divide each weight by the L2 norm of that model's whole Fisher (authors: on)"),
        Param("favor_target", default=True, kind=bool,
              doc="the first model is the target: only its Fisher gets the floor, so entries no "
                  "other Fisher weighs keep its value (the authors' favor_target_model, on)"),
        Param("uncovered", default="average", kind=str, choices=UNCOVERED,
              doc="tensors no Fisher covers: 'average' (weighted average) or 'first' (first model's)"),
    )
    model_params = (
        Param("weight", default=1.0, ge=0.0, doc="lambda_i, this model's weight"),
        Param("fisher", required=True, kind=str, doc="path to this model's Fisher diagonal "
              "(a safetensors file with the model's tensor names; see fisher_diagonal)"),
        Param("fisher_norm", default=None, gt=0.0, doc="the norm normalize_fishers divides by; computed "
              "from the file when absent (weightspace.merges.fisher.fisher_norms)"),
    )

    def check_params(self, params: TensorParams, where: list[str]) -> None:
        if sum(params.model_values("weight")) == 0:
            raise SpecError("fisher: the weights sum to 0; give at least one model a positive weight")

    def merge(
        self,
        name: str,
        base: torch.Tensor | None,
        tensors: list[torch.Tensor],
        params: TensorParams,
        companions: dict[str, list[torch.Tensor]],
    ) -> torch.Tensor:
        fishers = companions.get("fisher") or [None] * len(tensors)
        files = [pm.get("fisher") for pm in params.per_model]
        weights = params.model_values("weight")
        floor = params["fisher_floor"]
        if floor < 0 or not math.isfinite(floor):
            raise SpecError(f"parameters.fisher_floor: expected a finite number >= 0, got {floor}")
        if params["floor_mode"] not in FLOOR_MODES:
            raise SpecError(f"parameters.floor_mode: unknown {params['floor_mode']!r}; "
                            f"use {' or '.join(FLOOR_MODES)}")
        if params["uncovered"] not in UNCOVERED:
            raise SpecError(f"parameters.uncovered: unknown {params['uncovered']!r}; "
                            f"use {' or '.join(UNCOVERED)}")
        for i, w in enumerate(weights):
            if w < 0 or not math.isfinite(w):
                raise SpecError(f"fisher: the weight of model {i} is {w}; Fisher merging needs "
                                f"weights >= 0")
        if sum(weights) == 0:
            raise SpecError("fisher: the weights sum to 0; give at least one model a positive weight")
        coefficients = list(weights)
        if params["normalize_fishers"]:
            coefficients = [w / self._norm(i, params) for i, w in enumerate(weights)]
        covered = [f is not None for f in fishers]
        if not any(covered):
            if params["uncovered"] == "first":
                return tensors[0]
            work = torch.promote_types(tensors[0].dtype, torch.float32)
            out = sum(c * x.to(work) for c, x in zip(coefficients, tensors)) / sum(coefficients)
            return out.to(tensors[0].dtype)
        if not all(covered):
            i = covered.index(False)
            j = covered.index(True)
            raise InputError(f"Fisher file {files[i]!r} (model {i}) has no tensor {name!r}, but "
                             f"{files[j]!r} (model {j}) does; compute every model's Fisher over the "
                             f"same tensors")
        for f, file in zip(fishers, files):
            _check_values(f, name, f"Fisher file {file!r}")
            # an all-zero file would silently drop its model (only the floor would weigh it);
            # its norm is read once per file and process (cached)
            if file and Path(file).is_file() and fisher_norms([file])[0] == 0:
                raise InputError(f"Fisher file {file!r} is zero everywhere (no gradient reached the "
                                 f"model's parameters); recompute it on data the model sees")
        try:
            return fisher_weighted_average(tensors, fishers, coefficients, floor,
                                           params["favor_target"], params["floor_mode"])
        except InputError as e:
            raise InputError(f"tensor {name!r}: {e}") from None

    @staticmethod
    def _norm(i: int, params: TensorParams) -> float:
        """Model i's whole-Fisher L2 norm: given in the spec, or read once from its file."""
        pm = params.per_model[i]
        norm = pm.get("fisher_norm")
        if norm is None:
            path = Path(pm["fisher"]).expanduser()
            if not path.exists():
                raise SpecError(
                    f"normalize_fishers: Fisher file {pm['fisher']!r} (model {i}) is not found from "
                    f"the working directory {os.getcwd()}, so its norm cannot be computed; give an "
                    f"absolute path, or set fisher_norm in that model's parameters "
                    f"(python -c 'from weightspace.merges.fisher import fisher_norms; print(fisher_norms([...]))')")
            norm = fisher_norms([path])[0]
            if not math.isfinite(norm):  # name the tensor, as the per-tensor check would
                for tname, ref in load_space(path).items():
                    _check_values(ref.load("cpu"), tname, f"Fisher file {pm['fisher']!r}")
                raise InputError(f"normalize_fishers: Fisher file {pm['fisher']!r} (model {i}) has "
                                 f"no finite norm; recompute it")
            if norm == 0:
                raise InputError(f"Fisher file {pm['fisher']!r} is zero everywhere (no gradient reached "
                                 f"the model's parameters), so normalize_fishers cannot divide by its "
                                 f"norm; recompute it on data the model sees")
        if not (norm > 0 and math.isfinite(norm)):
            raise SpecError(f"fisher_norm of model {i}: expected a positive number, got {norm}")
        return norm


__all__ = [
    "FLOOR_MODES",
    "Fisher",
    "check_fisher",
    "fisher_diagonal",
    "fisher_norms",
    "fisher_weighted_average",
    "save_fisher",
]
