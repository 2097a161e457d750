"""Shared by the merge-method tests: the classic method names, a runner that resolves
parameters as the planner does, and reference formulas written out independently of the code."""

from __future__ import annotations

import math

import torch

from weightspace.methods import MergeMethod, TensorParams, get_method

CLASSIC = {
    "linear",
    "task_arithmetic",
    "ties",
    "dare_ties",
    "dare_linear",
    "breadcrumbs",
    "breadcrumbs_ties",
    "della",
    "della_linear",
    "slerp",
    "nuslerp",
    "model_stock",
    "passthrough",
}


def params_for(
    method: MergeMethod,
    n_models: int,
    values: dict | None = None,
    per_model: list[dict] | None = None,
    *,
    seed: int = 0,
    tensor_name: str = "layers.0.w",
) -> TensorParams:
    """Resolve parameters as the planner would: defaults, then the given values."""
    values = dict(values or {})
    per_model = [dict(p) for p in (per_model or [{} for _ in range(n_models)])]
    known = {p.name for p in method.all_global_params()}
    assert set(values) <= known, f"unknown global params {set(values) - known}"
    for p in method.all_global_params():
        if p.name not in values:
            assert not p.required, f"{method.name} needs {p.name}"
            values[p.name] = p.default
    for pm in per_model:
        assert set(pm) <= {p.name for p in method.model_params}
        for p in method.model_params:
            if p.name not in pm:
                assert not p.required, f"{method.name} needs per-model {p.name}"
                pm[p.name] = p.default
    return TensorParams(
        values=values, per_model=per_model, seed=values.get("seed", seed), tensor_name=tensor_name
    )


def run(
    name: str,
    base: torch.Tensor | None,
    tensors: list[torch.Tensor],
    values: dict | None = None,
    per_model: list[dict] | None = None,
    **kw,
) -> torch.Tensor:
    method = get_method(name)
    method.check(len(tensors), base is not None)
    params = params_for(method, len(tensors), values, per_model, **kw)
    return method.merge(params.tensor_name, base, tensors, params, {})


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def close(actual: torch.Tensor, expected, atol: float = 1e-6) -> None:
    expected = torch.as_tensor(expected, dtype=actual.dtype)
    torch.testing.assert_close(actual, expected, atol=atol, rtol=1e-5)


# Independent reference formulas for the table (sorts where the code avoids them).


def ref_trim(d: torch.Tensor, density: float) -> torch.Tensor:
    k = int(density * d.numel())
    keep = torch.zeros(d.numel(), dtype=torch.bool)
    keep[torch.argsort(d.abs().reshape(-1), descending=True, stable=True)[:k]] = True
    return d * keep.reshape(d.shape)


def ref_breadcrumbs(d: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    n = d.numel()
    keep, top = int(density * n), int(gamma * n)
    bottom = max(n - keep - top, 0)
    top = n - keep - bottom
    order = torch.argsort(d.abs().reshape(-1), stable=True)
    mask = torch.zeros(n, dtype=torch.bool)
    mask[order[bottom : n - top]] = True
    return d * mask.reshape(d.shape)


def ref_elect_mean(deltas, weights, normalize):
    """TIES elect + disjoint (weighted) sum or mean, entry by entry."""
    wd = [w * d for w, d in zip(weights, deltas)]
    sign = torch.where(sum(wd) >= 0, 1.0, -1.0)
    agree = [x.sign() == sign for x in wd]
    total = sum(x * a for x, a in zip(wd, agree))
    count = sum(w * a.float() for w, a in zip(weights, agree))
    return total / torch.where(count == 0, 1.0, count) if normalize else total


def ref_slerp(t, a, b):
    cos = float((a * b).sum() / (a.norm() * b.norm()))
    theta = math.acos(cos)
    return (math.sin((1 - t) * theta) * a + math.sin(t * theta) * b) / math.sin(theta)


def ref_model_stock(base, xs):
    d = [x.reshape(-1) - base.reshape(-1) for x in xs]
    pairs = [(i, j) for i in range(len(d)) for j in range(i + 1, len(d))]
    cos = sum(float(d[i] @ d[j] / (d[i].norm() * d[j].norm())) for i, j in pairs) / len(pairs)
    k = len(xs)
    ratio = k * cos / (1 + (k - 1) * cos)
    return ratio * sum(xs) / k + (1 - ratio) * base


# The methods from mergekit 0.1.5's merge_methods/ beyond the classic ones
# (test_methods_mergekit_family.py); their formulas follow, in float64, step by step.
MERGEKIT_FAMILY = {"sce", "multislerp", "karcher", "nearswap", "arcee_fusion", "ram", "ramplus_tl"}


def ref_sce(base, xs, select_topk=1.0):
    """Select by variance rank, weight by mean square, erase against the elected sign."""
    b = base.double().reshape(-1)
    d = [x.double().reshape(-1) - b for x in xs]
    n, m = len(d), b.numel()
    if select_topk < 1:
        mean = sum(d) / n
        var = sum((di - mean) ** 2 for di in d) / n
        k = int(int((var != 0).sum()) * select_topk)
        keep = torch.zeros(m, dtype=torch.bool)
        keep[torch.argsort(var, descending=True, stable=True)[:k]] = True
        d = [di * keep for di in d]
    s = [float((di**2).mean()) for di in d]
    w = [si / sum(s) for si in s] if sum(s) >= 1e-6 else [1 / n] * n
    out = b.clone()
    for j in range(m):
        elected = 1.0 if sum(float(di[j]) for di in d) >= 0 else -1.0
        agree = [i for i in range(n) if math.copysign(1.0, float(d[i][j])) == elected and d[i][j] != 0]
        den = max(sum(w[i] for i in agree), 1e-6)
        out[j] += sum(w[i] * float(d[i][j]) for i in agree) / den
    return out.reshape(base.shape).float()


def ref_multislerp(xs, weights, base=None):
    """The closed form of mergekit's multislerp: at m, the normalized weighted mean of the unit
    vectors, the weighted tangent vectors sum to zero, so the result is m times the weighted
    mean norm (cos(eps) = 1 in float32)."""
    b = base.double().reshape(-1) if base is not None else 0.0
    v = [x.double().reshape(-1) - b for x in xs]
    w = [wi / sum(weights) for wi in weights]
    mean = sum(wi * vi / vi.norm() for wi, vi in zip(w, v))
    out = mean / mean.norm() * sum(wi * float(vi.norm()) for wi, vi in zip(w, v)) + b
    return out.reshape(xs[0].shape).float()


def ref_karcher_pair(base, xs):
    """The Karcher mean of two directions is their geodesic midpoint; scaled by the mean norm."""
    a, c = (x.double() for x in xs)
    mid = a / a.norm() + c / c.norm()
    return (mid / mid.norm() * (a.norm() + c.norm()) / 2).float()


def ref_nearswap(a, b, t):
    out = [float(y) if abs(float(x) - float(y)) <= t
           else (t / abs(float(x) - float(y))) * float(y) + (1 - t / abs(float(x) - float(y))) * float(x)
           for x, y in zip(a.reshape(-1), b.reshape(-1))]
    return torch.tensor(out).reshape(a.shape)


def ref_arcee_fusion(a, b):
    """b where |b - a| * KL(softmax(b) || softmax(a)) (per row) reaches median + 1.5 IQR."""
    a2, b2 = a.double().reshape(-1, a.shape[-1]), b.double().reshape(-1, b.shape[-1])
    scores = []
    for ra, rb in zip(a2, b2):
        p = torch.exp(rb) / torch.exp(rb).sum() + 1e-8
        q = torch.exp(ra) / torch.exp(ra).sum() + 1e-8
        kl = float((p * torch.log(p / q)).sum())
        scores.append((rb - ra).abs() * kl)
    flat = sorted(float(s) for s in torch.cat(scores))
    q1, med, q3 = (flat[int(f * (len(flat) - 1))] for f in (0.25, 0.5, 0.75))
    take = torch.cat(scores) >= med + 1.5 * (q3 - q1)
    return torch.where(take.reshape(a.shape), b, a)


def _ram_parts(base, xs, eps):
    d = [(x.double() - base.double()).reshape(-1) for x in xs]
    changed = [[abs(float(v)) > eps for v in di] for di in d]
    counts = [sum(c[j] for c in changed) for j in range(base.numel())]
    return d, changed, counts


def ref_ram(base, xs, eps=1e-5, scales=None):
    """Per entry: a change made by one model only is kept (times its scale), one made by
    several is averaged over them."""
    d, changed, counts = _ram_parts(base, xs, eps)
    scales = scales or [1.0] * len(xs)
    out = base.double().reshape(-1).clone()
    for j, c in enumerate(counts):
        for i in range(len(xs)):
            if changed[i][j]:
                out[j] += float(d[i][j]) * (scales[i] if c == 1 else 1 / c)
    return out.reshape(base.shape).float()


def ref_ramplus_tl(base, xs, r=0.1, alpha=0.2, eps=1e-5):
    _, changed, counts = _ram_parts(base, xs, eps)
    scales = []
    for ch in changed:
        shared = sum(1 for j, c in enumerate(ch) if c and counts[j] > 1)
        unique = sum(1 for j, c in enumerate(ch) if c and counts[j] == 1)
        scales.append(1 + r * min(max(shared / max(unique, eps), 0), alpha))
    return ref_ram(base, xs, eps, scales)
