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
