"""Loss-landscape metrics for small classifiers: loss, sharpness, mode connectivity, CKA.

    stats = evaluate(model, params, x, y)                              # {"loss": ..., "acc": ...}
    lam = hessian_top_eigenvalue(model, params, x, y)                  # dominant Hessian eigenvalue
    tr, se = hessian_trace(model, params, x, y)                        # Hutchinson estimate, stderr
    mc = mode_connectivity(model, pa, pb, x, y, curve="bezier")        # {"mc", "t_star", "losses", "ts"}
    row = landscape_metrics(model, params, load_task("digits"))        # flat float columns, one model
    pair = pair_metrics(model, pa, pb, load_task("digits"))            # mc_linear, mc_bezier, cka

The metrics are those of Yang et al., "Taxonomizing local versus global
structure in neural network loss landscapes" (NeurIPS 2021): local structure
from the Hessian (top eigenvalue, trace), global structure from mode
connectivity along a quadratic Bezier curve (Garipov et al., 2018) and from the
similarity (CKA) of two models' outputs.

Everything is functional: a model is a module skeleton plus a dict name ->
tensor, run with `torch.func.functional_call`; the module is never modified.
The loss is the cross-entropy averaged over the examples given, computed in
float32, and every pass over the data goes in batches of `batch_size`
examples, so memory stays bounded by one batch (sums over batches are exact).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from weightspace.errors import InputError, SpecError
from weightspace.zoo.data import TaskData

Params = dict[str, torch.Tensor]

# Hutchinson probes sharing one pass over the data (each holds a copy of the parameters)
TRACE_CHUNK = 25

# ---------------------------------------------------------------------------------------------
# plumbing


def _params(model: nn.Module, params: Mapping[str, torch.Tensor], what: str = "params") -> Params:
    """Detached float32 copies of exactly the tensors `model` has (names and shapes checked)."""
    expected = dict(model.named_parameters())
    expected.update(dict(model.named_buffers()))
    missing = sorted(set(expected) - set(params))
    extra = sorted(set(params) - set(expected))
    if missing or extra:
        # functional_call would silently fall back to the module's own tensor for a missing name
        name, verb = (missing[0], "lacks") if missing else (extra[0], "has an unknown tensor")
        raise InputError(f"{what} {verb} {name!r} for {type(model).__name__}; expected the "
                         f"{len(expected)} names of model.named_parameters()")
    out = {}
    for n, ref in expected.items():
        t = params[n]
        if tuple(t.shape) != tuple(ref.shape):
            raise InputError(f"{what}[{n!r}] has shape {list(t.shape)}, "
                             f"but {type(model).__name__} expects {list(ref.shape)}")
        out[n] = t.detach().float() if t.is_floating_point() else t.detach()
    return out


def _data(x: torch.Tensor, y: torch.Tensor | None, device: torch.device) -> tuple[torch.Tensor, ...]:
    n = int(x.shape[0]) if x.ndim else 0
    if n == 0:
        raise InputError("no examples: x is empty")
    if y is None:
        return (x.to(device, torch.float32),)
    if y.ndim != 1 or int(y.shape[0]) != n:
        raise InputError(f"x has {n} examples but y has shape {list(y.shape)}; expected ({n},)")
    return x.to(device, torch.float32), y.to(device, torch.long)


def _device(params: Params) -> torch.device:
    return next(iter(params.values())).device if params else torch.device("cpu")


def _batches(n: int, batch_size: int) -> Iterator[slice]:
    if batch_size < 1:
        raise SpecError(f"batch_size must be a positive integer, got {batch_size}")
    for start in range(0, n, batch_size):
        yield slice(start, min(start + batch_size, n))


def _dot(a: Params, b: Params) -> torch.Tensor:
    return sum((a[k] * b[k]).sum() for k in a)  # type: ignore[return-value]


def _hvps(model: nn.Module, params: Params, x: torch.Tensor, y: torch.Tensor, vs: list[Params],
          batch_size: int) -> list[Params]:
    """H v for each v in `vs`, H the Hessian of the mean loss over (x, y), summed over data batches.

    Double backward: per data batch one forward and one gradient pass that keeps its graph,
    then one more backward pass per vector through that graph. On CPU this is about 3x
    faster than torch.func's jvp(grad(f)) for these small models, and every op the zoo
    architectures use has a second derivative.
    """
    n = int(y.shape[0])
    names = list(params)
    leaves = [params[k].detach().requires_grad_(True) for k in names]
    out = [{k: torch.zeros_like(params[k]) for k in names} for _ in vs]
    with torch.enable_grad():
        for s in _batches(n, batch_size):
            outputs = functional_call(model, dict(zip(names, leaves)), (x[s],))
            loss = F.cross_entropy(outputs, y[s], reduction="sum") / n
            grads = torch.autograd.grad(loss, leaves, create_graph=True, allow_unused=True)
            # a gradient without a graph is constant in the parameters: its Hessian rows are 0
            live = [(g, k) for g, k in zip(grads, names) if g is not None and g.requires_grad]
            if not live:
                continue
            for v, acc in zip(vs, out):
                hv = torch.autograd.grad([g for g, _ in live], leaves, grad_outputs=[v[k] for _, k in live],
                                         retain_graph=True, allow_unused=True)
                for k, h in zip(names, hv):
                    if h is not None:
                        acc[k] += h
    return out


# ---------------------------------------------------------------------------------------------
# loss and accuracy


@torch.no_grad()
def logits(model: nn.Module, params: Mapping[str, torch.Tensor], x: torch.Tensor,
           batch_size: int = 1024) -> torch.Tensor:
    """The model's outputs on x, (N, num_classes) float32, computed batch by batch."""
    p = _params(model, params)
    (x,) = _data(x, None, _device(p))
    return torch.cat([functional_call(model, p, (x[s],)) for s in _batches(int(x.shape[0]), batch_size)])


@torch.no_grad()
def evaluate(model: nn.Module, params: Mapping[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor,
             batch_size: int = 1024) -> dict[str, float]:
    """Mean cross-entropy and accuracy on (x, y).

        evaluate(model, params, task.test.x, task.test.y)    # {"loss": 0.12, "acc": 0.97}
    """
    p = _params(model, params)
    x, y = _data(x, y, _device(p))
    total, correct = 0.0, 0
    for s in _batches(int(y.shape[0]), batch_size):
        out = functional_call(model, p, (x[s],))
        total += float(F.cross_entropy(out, y[s], reduction="sum"))
        correct += int((out.argmax(dim=1) == y[s]).sum())
    n = int(y.shape[0])
    return {"loss": total / n, "acc": correct / n}


# ---------------------------------------------------------------------------------------------
# Hessian: local structure


def _unit_random(params: Params, gen: torch.Generator) -> Params:
    v = {k: torch.randn(t.shape, generator=gen).to(t.device) for k, t in params.items()}
    norm = math.sqrt(float(_dot(v, v)))
    return {k: t / norm for k, t in v.items()}


def hessian_top_eigenvalue(model: nn.Module, params: Mapping[str, torch.Tensor], x: torch.Tensor,
                           y: torch.Tensor, iters: int = 100, tol: float = 1e-4, seed: int = 0,
                           batch_size: int = 1024) -> float:
    """The dominant eigenvalue of the Hessian of the mean loss, by power iteration.

        lam = hessian_top_eigenvalue(model, params, task.train.x, task.train.y)

    Starts from a unit Gaussian vector drawn with `seed`, repeats v <- Hv/|Hv| with
    Hessian-vector products (double backward, summed over data batches), and
    returns the Rayleigh quotient v^T H v once it changes by less than `tol`
    (relative) between iterations, or after `iters` iterations. Power iteration
    finds the eigenvalue of largest magnitude; near a minimum that is the top
    (positive) curvature, the sharpness of Yang et al. Deterministic for a seed.
    """
    p = _params(model, params)
    x, y = _data(x, y, _device(p))
    v = _unit_random(p, torch.Generator().manual_seed(seed))
    lam = 0.0
    for i in range(max(int(iters), 1)):
        (hv,) = _hvps(model, p, x, y, [v], batch_size)
        new = float(_dot(v, hv))
        norm = math.sqrt(float(_dot(hv, hv)))
        if norm == 0.0:  # H v = 0: a flat direction, and v was a random start
            return 0.0
        v = {k: t / norm for k, t in hv.items()}
        if i > 0 and abs(new - lam) <= tol * max(abs(new), 1e-12):
            return new
        lam = new
    return lam


def hessian_trace(model: nn.Module, params: Mapping[str, torch.Tensor], x: torch.Tensor,
                  y: torch.Tensor, n_samples: int = 100, seed: int = 0,
                  batch_size: int = 1024) -> tuple[float, float]:
    """Hutchinson's estimate of the Hessian trace: (mean, standard error) of z^T H z.

        tr, se = hessian_trace(model, params, task.train.x, task.train.y, n_samples=100)

    z has independent Rademacher (+-1) entries drawn with `seed`, so E[z^T H z] = tr H;
    the standard error is std(z^T H z) / sqrt(n_samples) (0 for one sample).
    Deterministic for a seed.
    """
    if n_samples < 1:
        raise SpecError(f"n_samples must be a positive integer, got {n_samples}")
    p = _params(model, params)
    x, y = _data(x, y, _device(p))
    gen = torch.Generator().manual_seed(seed)
    samples: list[float] = []
    while len(samples) < n_samples:
        m = min(TRACE_CHUNK, n_samples - len(samples))
        zs = [{k: (torch.randint(0, 2, t.shape, generator=gen) * 2 - 1).to(t) for k, t in p.items()}
              for _ in range(m)]
        samples += [float(_dot(z, hz)) for z, hz in zip(zs, _hvps(model, p, x, y, zs, batch_size))]
    s = torch.tensor(samples, dtype=torch.float64)
    se = float(s.std() / math.sqrt(len(s))) if len(s) > 1 else 0.0
    return float(s.mean()), se


# ---------------------------------------------------------------------------------------------
# mode connectivity: global structure


def bezier_point(pa: Params, theta: Params, pb: Params, t: float) -> Params:
    """phi(t) = (1-t)^2 pa + 2t(1-t) theta + t^2 pb (theta = (pa+pb)/2 gives the straight line)."""
    a, b, c = (1 - t) ** 2, 2 * t * (1 - t), t ** 2
    return {k: a * pa[k] + b * theta[k] + c * pb[k] for k in pa}


def _midpoint(pa: Params, pb: Params) -> Params:
    return {k: (pa[k] + pb[k]) / 2 for k in pa}


def _grid(n_points: int) -> list[float]:
    if n_points < 2:
        raise SpecError(f"n_points must be at least 2 (the two end points), got {n_points}")
    return [i / (n_points - 1) for i in range(n_points)]


def curve_losses(model: nn.Module, pa: Mapping[str, torch.Tensor], pb: Mapping[str, torch.Tensor],
                 theta: Mapping[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor,
                 n_points: int = 11, batch_size: int = 1024) -> list[float]:
    """Mean losses at phi(t) of the Bezier curve pa -> theta -> pb, for t = 0, 1/(n-1), ..., 1."""
    a, b = _params(model, pa, "pa"), _params(model, pb, "pb")
    th = _params(model, theta, "theta")
    return [evaluate(model, bezier_point(a, th, b, t), x, y, batch_size)["loss"] for t in _grid(n_points)]


def linear_path(model: nn.Module, pa: Mapping[str, torch.Tensor], pb: Mapping[str, torch.Tensor],
                x: torch.Tensor, y: torch.Tensor, n_points: int = 11,
                batch_size: int = 1024) -> list[float]:
    """Mean losses at (1-t) pa + t pb for t = 0, 1/(n-1), ..., 1."""
    a, b = _params(model, pa, "pa"), _params(model, pb, "pb")
    return curve_losses(model, a, b, _midpoint(a, b), x, y, n_points, batch_size)


def fit_bezier(model: nn.Module, pa: Mapping[str, torch.Tensor], pb: Mapping[str, torch.Tensor],
               x: torch.Tensor, y: torch.Tensor, steps: int = 500, lr: float = 0.03,
               batch_size: int = 128, seed: int = 0) -> Params:
    """The middle control point theta of a low-loss quadratic Bezier curve from pa to pb.

        theta = fit_bezier(model, pa, pb, task.train.x, task.train.y)
        losses = curve_losses(model, pa, pb, theta, task.train.x, task.train.y)

    As in Garipov et al. (2018): theta starts at (pa+pb)/2 (the straight line); each
    of `steps` Adam steps draws t ~ U(0, 1) and a minibatch of `batch_size` examples
    (both from `seed`) and lowers the loss at phi(t) = (1-t)^2 pa + 2t(1-t) theta
    + t^2 pb. The end points stay fixed. Deterministic for a seed on CPU.
    """
    a, b = _params(model, pa, "pa"), _params(model, pb, "pb")
    x, y = _data(x, y, _device(a))
    if batch_size < 1:
        raise SpecError(f"batch_size must be a positive integer, got {batch_size}")
    theta = {k: t.clone().requires_grad_(True) for k, t in _midpoint(a, b).items()}
    opt = torch.optim.Adam(list(theta.values()), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    n = int(y.shape[0])
    with torch.enable_grad():
        for _ in range(int(steps)):
            t = float(torch.rand((), generator=gen))
            idx = torch.randint(0, n, (min(batch_size, n),), generator=gen).to(y.device)
            out = functional_call(model, bezier_point(a, theta, b, t), (x[idx],))
            loss = F.cross_entropy(out, y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return {k: t.detach() for k, t in theta.items()}


def mode_connectivity(model: nn.Module, pa: Mapping[str, torch.Tensor], pb: Mapping[str, torch.Tensor],
                      x: torch.Tensor, y: torch.Tensor, curve: str = "bezier", n_points: int = 11,
                      steps: int = 500, lr: float = 0.03, batch_size: int = 128, seed: int = 0,
                      theta: Mapping[str, torch.Tensor] | None = None) -> dict:
    """Mode connectivity of two models along a straight line or a fitted Bezier curve.

        mode_connectivity(model, pa, pb, x, y, curve="linear")
        # {"mc": -0.8, "t_star": 0.5, "losses": [...], "ts": [0.0, 0.1, ..., 1.0]}

    Following Yang et al. (2021), with L the mean loss on (x, y) and phi the curve,

        mc = (L(pa) + L(pb)) / 2 - L(phi(t*)),
        t* = argmax_t |(L(pa) + L(pb)) / 2 - L(phi(t))|   over t in ts = 0, 1/(n-1), ..., 1.

    mc < 0: a barrier (the curve rises above its ends); mc > 0: the curve dips
    below its ends; mc ~ 0: connected. The end points are on the grid, so
    |mc| >= |L(pa) - L(pb)| / 2. For "bezier" theta is `fit_bezier(..., steps, lr,
    batch_size, seed)` unless given; the losses are evaluated in batches of 1024.
    """
    if curve not in ("bezier", "linear"):
        raise SpecError(f"curve must be 'bezier' or 'linear', got {curve!r}")
    a, b = _params(model, pa, "pa"), _params(model, pb, "pb")
    if curve == "linear":
        th = _midpoint(a, b)
    elif theta is not None:
        th = _params(model, theta, "theta")
    else:
        th = fit_bezier(model, a, b, x, y, steps=steps, lr=lr, batch_size=batch_size, seed=seed)
    ts = _grid(n_points)
    losses = curve_losses(model, a, b, th, x, y, n_points)
    ends = (losses[0] + losses[-1]) / 2
    i = max(range(len(ts)), key=lambda j: abs(ends - losses[j]))
    return {"mc": ends - losses[i], "t_star": ts[i], "losses": losses, "ts": ts}


# ---------------------------------------------------------------------------------------------
# representation similarity


def cka(a: torch.Tensor, b: torch.Tensor) -> float:
    """Linear CKA of two representations of the same n examples (n x d1, n x d2).

        cka(logits_a, logits_b)    # 1.0: same up to rotation, isotropic scale and shift

    With Xc, Yc the column-centred matrices (in float64),
    CKA = ||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F)  (Kornblith et al., 2019).
    """
    a2 = a.detach().reshape(a.shape[0], -1) if a.ndim else a.detach().reshape(1, 1)
    b2 = b.detach().reshape(b.shape[0], -1) if b.ndim else b.detach().reshape(1, 1)
    if a2.shape[0] != b2.shape[0]:
        raise InputError(f"CKA needs the same examples on both sides: got {a2.shape[0]} and "
                         f"{b2.shape[0]} rows")
    xc = a2.double().cpu()
    yc = b2.double().cpu()
    xc = xc - xc.mean(dim=0)
    yc = yc - yc.mean(dim=0)
    den = torch.linalg.matrix_norm(xc.T @ xc) * torch.linalg.matrix_norm(yc.T @ yc)
    if float(den) == 0.0:
        raise InputError("CKA is undefined: one representation is constant across the examples")
    return float(torch.linalg.matrix_norm(yc.T @ xc) ** 2 / den)


def logit_cka(model: nn.Module, pa: Mapping[str, torch.Tensor], pb: Mapping[str, torch.Tensor],
              x: torch.Tensor, batch_size: int = 1024) -> float:
    """Linear CKA between the logits of two weight settings of `model` on x."""
    return cka(logits(model, pa, x, batch_size), logits(model, pb, x, batch_size))


# ---------------------------------------------------------------------------------------------
# one row of a zoo table


def _subsample(x: torch.Tensor, y: torch.Tensor, max_examples: int | None,
               seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """At most `max_examples` examples, a fixed random subset for `seed` (order kept)."""
    n = int(y.shape[0])
    if max_examples is None or max_examples >= n:
        return x, y
    if max_examples < 1:
        raise SpecError(f"max_examples must be a positive integer or None, got {max_examples}")
    idx = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:max_examples].sort().values
    return x[idx], y[idx]


def landscape_metrics(model: nn.Module, params: Mapping[str, torch.Tensor], task: TaskData, *,
                      split: str = "train", hessian_iters: int = 100, hessian_tol: float = 1e-4,
                      trace_samples: int = 100, max_examples: int | None = None, seed: int = 0,
                      batch_size: int = 1024) -> dict[str, float]:
    """Loss, accuracy, generalization gap and Hessian figures of one model, as flat float columns.

        row = landscape_metrics(model, params, load_task("digits"))
        # train_loss train_acc test_loss test_acc gap gap_acc
        # hessian_top_eig hessian_trace hessian_trace_se

    gap = test_loss - train_loss, gap_acc = train_acc - test_acc. The Hessian figures
    (`hessian_top_eigenvalue` with `hessian_iters`/`hessian_tol`, `hessian_trace` with
    `trace_samples` Rademacher probes) are computed on `split`, on a fixed random
    subset of `max_examples` examples when given (chosen by `seed`, which also seeds
    the probes). Measured with the defaults on 2 CPU cores (1078 training examples):
    a digits MLP (width 64, depth 2) takes about 0.15 s; the default resmlp 0.5 s,
    cnn 1.5 s, vit 14 s (use max_examples=256 there).
    """
    p = _params(model, params)
    train = evaluate(model, p, task.train.x, task.train.y, batch_size)
    test = evaluate(model, p, task.test.x, task.test.y, batch_size)
    s = task.split(split)
    hx, hy = _subsample(s.x, s.y, max_examples, seed)
    top = hessian_top_eigenvalue(model, p, hx, hy, iters=hessian_iters, tol=hessian_tol, seed=seed,
                                 batch_size=batch_size)
    tr, se = hessian_trace(model, p, hx, hy, n_samples=trace_samples, seed=seed, batch_size=batch_size)
    return {
        "train_loss": train["loss"], "train_acc": train["acc"],
        "test_loss": test["loss"], "test_acc": test["acc"],
        "gap": test["loss"] - train["loss"], "gap_acc": train["acc"] - test["acc"],
        "hessian_top_eig": top, "hessian_trace": tr, "hessian_trace_se": se,
    }


def pair_metrics(model: nn.Module, pa: Mapping[str, torch.Tensor], pb: Mapping[str, torch.Tensor],
                 task: TaskData, *, split: str = "train", n_points: int = 11, bezier_steps: int = 500,
                 bezier_lr: float = 0.03, bezier_batch_size: int = 128, max_examples: int | None = None,
                 seed: int = 0) -> dict[str, float]:
    """Global-structure columns for two models of one architecture (e.g. two seeds).

        pair = pair_metrics(model, pa, pb, load_task("digits"))    # mc_linear, mc_bezier, cka

    mc_linear and mc_bezier are `mode_connectivity` on `split` (the Bezier curve is
    fitted there too), on a fixed random subset of `max_examples` examples when given;
    cka is the linear CKA of the two models' logits on the test split. Measured with
    the defaults on 2 CPU cores: a digits MLP pair (width 64, depth 2) takes about
    0.3 s, most of it the 500 Bezier steps; resmlp 0.6 s, cnn 0.8 s, vit 4 s.
    """
    a, b = _params(model, pa, "pa"), _params(model, pb, "pb")
    s = task.split(split)
    x, y = _subsample(s.x, s.y, max_examples, seed)
    lin = mode_connectivity(model, a, b, x, y, curve="linear", n_points=n_points)
    bez = mode_connectivity(model, a, b, x, y, curve="bezier", n_points=n_points, steps=bezier_steps,
                            lr=bezier_lr, batch_size=bezier_batch_size, seed=seed)
    try:
        sim = logit_cka(model, a, b, task.test.x)
    except InputError:      # a collapsed model (constant logits): CKA is undefined, not an error of the zoo
        sim = float("nan")
    return {"mc_linear": lin["mc"], "mc_bezier": bez["mc"], "cka": sim}
