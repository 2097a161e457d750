"""Estimating a model's diagonal Fisher: exact, sampled or empirical, per example."""

from __future__ import annotations

import contextlib
import time
import warnings
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Literal

import torch

from weightspace.binding import IGNORE_INDEX, Adapter
from weightspace.errors import InputError, SpecError, WeightspaceError
from weightspace.ir import WeightSpace

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
    over: Iterable[str] | None = None,
    estimator: Estimator = "exact",
    n_samples: int = 1,
    n_examples: int | None = None,
    seed: int = 0,
    per_example: Literal["auto", "vmap", "loop"] = "auto",
    vmap_chunk: int | None = None,
    progress: bool = False,
    bar: Any = None,
) -> WeightSpace:
    """The diagonal of the Fisher information of `adapter`'s model, as a float32 WeightSpace.

        fisher = fisher_diagonal(ClassifierAdapter(model), [{"x": x, "y": y}], estimator="empirical")
        fisher["head.weight"].load()          # same names and shapes as the parameters

    With g(y) the gradient of an example's log-likelihood of labels y (summed over its
    predictions whose label is not -100: for a causal LM, its non-padding next-token
    predictions), each estimator averages over examples:

    - ``exact``: sum_c p(c|x) g(c)^2, the true Fisher (one prediction per example, C <= 1024);
    - ``sampled``: (1/S) sum_s g(y_s)^2 with y_s drawn from the model (`n_samples` S, `seed`);
    - ``empirical``: g(y_true)^2, the squared gradient at the data's labels.

    Gradients are per example: `torch.func.vmap` over `grad`, `vmap_chunk` examples at a
    time (default: the whole batch), or one autograd pass per example. ``per_example="auto"``
    tries vmap and falls back to the loop where the model cannot be vmapped (BERT's mask
    code), and takes the loop for a transformers model on the CPU, where vmap was slower and
    held 2.7x the memory (see the README); a vmapped transformers model is vmapped with eager attention (sdpa's mask code asks
    `padding_mask.all()`, which vmap cannot trace). Squares accumulate in float32 on the
    parameters' device, whatever their dtype. `params` (default: the module's own) are the
    tensors the model runs with; `over` (default: all of them) the names the Fisher is taken
    over: only those get gradients, so one pass per group of names bounds the accumulators
    (see weightspace.merges.fisher.stream). `n_examples` stops early. Non-tensor batch entries
    are ignored. `meta["fisher"]` records the estimator, examples, seed, the per-example mode
    and examples per second.
    """
    if estimator not in ESTIMATORS:
        raise SpecError(f"estimator: unknown {estimator!r}; use one of {', '.join(ESTIMATORS)}")
    if per_example not in ("auto", "vmap", "loop"):
        raise SpecError(f"per_example: unknown {per_example!r}; use auto, vmap or loop")
    if estimator == "sampled" and (not isinstance(n_samples, int) or n_samples < 1):
        raise SpecError(f"n_samples: expected a positive integer, got {n_samples!r}")
    if n_examples is not None and n_examples < 1:
        raise SpecError(f"n_examples: expected a positive integer, got {n_examples!r}")
    if vmap_chunk is not None and (not isinstance(vmap_chunk, int) or vmap_chunk < 1):
        raise SpecError(f"vmap_chunk: expected a positive integer, got {vmap_chunk!r}")
    params = dict(adapter.params() if params is None else params)
    if not params:
        raise InputError("fisher_diagonal: there are no parameters to take the Fisher over")
    group = list(params) if over is None else list(over)
    unknown = [n for n in group if n not in params]
    if unknown:
        raise InputError(f"fisher_diagonal: {unknown[0]!r} is not one of the model's parameters")
    if not group:
        raise InputError("fisher_diagonal: there are no parameters to take the Fisher over")
    device = next(iter(params.values())).device
    params = {n: t.detach() for n, t in params.items()}
    total = {n: torch.zeros(params[n].shape, dtype=torch.float32, device=device) for n in group}
    gen = torch.Generator().manual_seed(seed)  # the same draws on every pass over the same batches
    module = adapter.module
    # auto: the loop for a transformers model on the CPU, where vmap was not faster and held
    # 2.7x the memory (134M Llama: 0.85 against 0.96 examples/s, 4.67 against 1.76 GiB)
    hf_on_cpu = device.type == "cpu" and type(module).__module__.startswith("transformers.")
    mode = "vmap" if per_example == "vmap" or (per_example == "auto" and not hf_on_cpu) else "loop"
    seen = predictions = 0
    own_bar = bar is None
    bar = _progress_bar(progress) if own_bar else bar
    was_training = module.training
    module.eval()  # no dropout: the Fisher is of the model as it predicts
    t0 = time.perf_counter()
    eager = contextlib.ExitStack()
    if mode == "vmap":
        eager.enter_context(_traceable(module))
    try:
        for raw in batches:
            batch = _tensors_of(raw, device)
            if n_examples is not None:
                batch = {k: v[: n_examples - seen] for k, v in batch.items()}
            size = next(iter(batch.values())).shape[0]
            if size == 0:
                continue
            targets, weights, mask = _targets(adapter, params, batch, estimator, n_samples, gen)
            predictions += int(mask.sum())
            if mode == "vmap":
                try:
                    _batch_vmap(adapter, params, group, batch, targets, weights, mask,
                                vmap_chunk or size, total)
                except _VmapFailed as failed:
                    e = failed.__cause__
                    if per_example == "vmap":
                        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
                        raise InputError(f"per_example vmap: {type(module).__name__} does not run under "
                                         f"torch.func.vmap ({first}); use auto or loop") from None
                    mode = "loop"  # data-dependent control flow: one example at a time
                    eager.close()
            if mode == "loop":
                _batch_loop(adapter, params, group, batch, targets, weights, mask, total)
            seen += size
            if bar is not None:
                bar.update(size)
            if n_examples is not None and seen >= n_examples:
                break
    finally:
        eager.close()
        module.train(was_training)
        if own_bar and bar is not None:
            bar.close()
    seconds = time.perf_counter() - t0
    if seen == 0:
        raise InputError("fisher_diagonal: the batches hold no examples")
    if predictions == 0:
        raise InputError(f"fisher_diagonal: none of the {seen} examples has a prediction to take "
                         f"the log-likelihood of (every label is -100: for a language model, each "
                         f"example is a single token or padding only); give longer examples")
    fisher = {n: f.div_(seen).cpu() for n, f in total.items()}  # in place: one copy of the group
    del total
    if all(not bool(f.any()) for f in fisher.values()):
        warnings.warn(f"the {estimator} Fisher over {seen} examples is zero everywhere: the model "
                      "may be saturated (probabilities of exactly 0 or 1) or the parameters unused; "
                      "a Fisher merge with it falls back to the floor", stacklevel=2)
    info = {"estimator": estimator, "examples": seen, "predictions": predictions,
            "n_samples": n_samples if estimator == "sampled" else None, "seed": seed,
            "per_example": mode, "seconds": round(seconds, 3),
            "examples_per_second": round(seen / seconds, 3) if seconds > 0 else None}
    meta = {"source": f"fisher({estimator}) of {type(module).__name__}", "format": "memory",
            "fisher": info}
    return WeightSpace.from_tensors(fisher, meta)


@contextlib.contextmanager
def _traceable(module: torch.nn.Module) -> Iterator[None]:
    """A transformers model with eager attention for the duration (the same function: sdpa and
    eager agree to float rounding), since sdpa's mask code is data-dependent."""
    set_attn = getattr(module, "set_attn_implementation", None)
    before = getattr(getattr(module, "config", None), "_attn_implementation", None)
    if set_attn is None or before in (None, "eager"):
        yield
        return
    set_attn("eager")
    try:
        yield
    finally:
        set_attn(before)


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


class _VmapFailed(Exception):
    """vmap could not run a batch, and nothing of that batch was accumulated (`__cause__`: why)."""


def _batch_vmap(adapter: Adapter, params: dict[str, torch.Tensor], group: list[str],
                batch: dict[str, torch.Tensor], targets: list[torch.Tensor], weights: list[torch.Tensor],
                mask: torch.Tensor, chunk: int, out: dict[str, torch.Tensor]) -> None:
    """Per-example gradients of the `group` tensors, `chunk` examples at a time (so at most
    chunk x group-size gradients exist at once), squared in float32 and added to `out` with
    `weights`."""
    own = set(group)
    frozen = {n: t for n, t in params.items() if n not in own}
    mine = {n: params[n] for n in group}

    def one(p, example, target, m):  # a single example, re-batched as size 1
        ex = {k: v.unsqueeze(0) for k, v in example.items()}
        return _log_likelihood(adapter, {**frozen, **p}, ex, target.unsqueeze(0), m.unsqueeze(0))

    per_example = torch.func.vmap(torch.func.grad(one), in_dims=(None, 0, 0, 0))
    size = mask.shape[0]
    added = False
    for target, w in zip(targets, weights):
        for lo in range(0, size, chunk):
            part = slice(lo, lo + chunk)
            try:
                grads = per_example(mine, {k: v[part] for k, v in batch.items()}, target[part], mask[part])
            except WeightspaceError:
                raise
            except Exception as e:
                if added:  # part of the batch is in `out` already: a fallback would count it twice
                    raise
                raise _VmapFailed() from e
            wf = w[part].float()
            for n, g in grads.items():
                g = g.float()  # cast up before squaring: a bf16 square loses what float32 keeps
                out[n] += torch.einsum("b,b...->...", wf, g * g)  # not in place: vmap may expand g
            added = True
            del grads


def _batch_loop(adapter: Adapter, params: dict[str, torch.Tensor], group: list[str],
                batch: dict[str, torch.Tensor], targets: list[torch.Tensor], weights: list[torch.Tensor],
                mask: torch.Tensor, total: dict[str, torch.Tensor]) -> None:
    """One backward pass per example and label set. Each parameter's gradient is squared into
    its accumulator as soon as autograd has it and then dropped, so at most one parameter's
    gradient exists at a time (torch.autograd.grad would hold the whole group's)."""
    leaves = [params[n].detach().requires_grad_(True) for n in group]
    p = {**params, **dict(zip(group, leaves))}  # only the group's tensors get gradients
    out = [total[n] for n in group]  # squares go straight into the pass's accumulators
    weight = [1.0]

    def square_into(acc: torch.Tensor):
        def hook(leaf: torch.Tensor) -> None:
            acc.add_(leaf.grad.float().square(), alpha=weight[0])  # cast up before squaring
            leaf.grad = None
        return hook

    handles = [leaf.register_post_accumulate_grad_hook(square_into(acc)) for leaf, acc in zip(leaves, out)]
    size = mask.shape[0]
    try:
        with torch.enable_grad():
            for i in range(size):
                if not bool(mask[i].any()):  # every prediction ignored: a zero gradient
                    continue
                ex = {k: v[i : i + 1] for k, v in batch.items()}
                logp = torch.log_softmax(adapter.logits(p, ex).float(), -1)[0]  # (K, C), one forward
                for j, (target, w) in enumerate(zip(targets, weights)):
                    ll = (logp.gather(-1, target[i].unsqueeze(-1)).squeeze(-1) * mask[i]).sum()
                    weight[0] = float(w[i])
                    if ll.requires_grad:  # no group tensor on the path: a zero gradient
                        ll.backward(retain_graph=j + 1 < len(targets))
                del logp
    finally:
        for h in handles:
            h.remove()
