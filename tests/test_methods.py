"""The classic merge methods, checked against formulas written out here.

Each method runs once in a shared table on tiny seeded tensors; each then gets
hand-checkable numbers, edge cases, and a few properties (hypothesis).
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from weightspace.merges import _sparsify

from weightspace.errors import SpecError
from weightspace.methods import MergeMethod, TensorParams, all_methods, get_method

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


# ---------------------------------------------------------------- the registry


def test_registry_lists_every_classic_method():
    methods = all_methods()
    assert CLASSIC <= set(methods)
    for name in CLASSIC:
        m = methods[name]
        assert m.pretty_name and m.uses_base in ("required", "optional", "none")
        if name != "passthrough":
            assert m.paper and m.reference_url.startswith("https://")
    assert {n for n in CLASSIC if methods[n].randomized} == {
        "dare_ties",
        "dare_linear",
        "della",
        "della_linear",
    }
    assert methods["passthrough"].layer_stacking


@pytest.mark.parametrize(
    "name, normalize, rescale",
    [
        ("task_arithmetic", False, False),
        ("ties", True, False),
        ("dare_ties", False, True),
        ("dare_linear", False, True),
        ("breadcrumbs", False, False),
        ("breadcrumbs_ties", False, False),
        ("della", True, True),
        ("della_linear", False, True),
    ],
)
def test_task_vector_defaults_match_mergekit(name, normalize, rescale):
    m = get_method(name)
    defaults = {p.name: p.default for p in m.all_global_params()}
    assert defaults["normalize"] is normalize and defaults["rescale"] is rescale
    assert defaults["lambda"] == 1.0 and defaults["int8_mask"] is False
    per_model = {p.name: p for p in m.model_params}
    assert per_model["weight"].required and per_model["density"].default == 1.0
    assert ("gamma" in per_model) == name.startswith("breadcrumbs")
    assert ("epsilon" in per_model) == name.startswith("della")
    assert m.uses_base == "required"


# --------------------------------------------- one table runs every method

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


def _ties_expected(b, xs):
    deltas = [ref_trim(xs[0] - b, 0.5), ref_trim(xs[1] - b, 0.7)]
    return b + ref_elect_mean(deltas, [1.0, 0.5], normalize=True)


def _breadcrumbs_expected(b, xs, consensus):
    deltas = [ref_breadcrumbs(x - b, 0.6, 0.1) for x in xs]
    if consensus:
        return b + ref_elect_mean(deltas, [1.0, 1.0], normalize=False)
    return b + deltas[0] + deltas[1]


# name, models besides the base, uses a base, global values, per-model values,
# expected result from the formulas above (None: randomized, checked further down)
TABLE = [
    (
        "linear",
        3,
        False,
        {},
        [{"weight": w} for w in (0.2, 0.3, 0.6)],
        lambda b, xs: (0.2 * xs[0] + 0.3 * xs[1] + 0.6 * xs[2]) / 1.1,
    ),
    (
        "task_arithmetic",
        2,
        True,
        {"lambda": 0.7},
        [{"weight": 1.0}, {"weight": 0.5}],
        lambda b, xs: b + 0.7 * ((xs[0] - b) + 0.5 * (xs[1] - b)),
    ),
    (
        "ties",
        2,
        True,
        {},
        [{"weight": 1.0, "density": 0.5}, {"weight": 0.5, "density": 0.7}],
        _ties_expected,
    ),
    ("dare_ties", 2, True, {"seed": 3}, [{"weight": 1.0, "density": 0.5}] * 2, None),
    ("dare_linear", 2, True, {"seed": 3}, [{"weight": 0.6, "density": 0.4}] * 2, None),
    (
        "breadcrumbs",
        2,
        True,
        {},
        [{"weight": 1.0, "density": 0.6, "gamma": 0.1}] * 2,
        lambda b, xs: _breadcrumbs_expected(b, xs, consensus=False),
    ),
    (
        "breadcrumbs_ties",
        2,
        True,
        {},
        [{"weight": 1.0, "density": 0.6, "gamma": 0.1}] * 2,
        lambda b, xs: _breadcrumbs_expected(b, xs, consensus=True),
    ),
    ("della", 2, True, {}, [{"weight": 1.0, "density": 0.5, "epsilon": 0.2}] * 2, None),
    ("della_linear", 2, True, {}, [{"weight": 1.0, "density": 0.5, "epsilon": 0.2}] * 2, None),
    ("slerp", 1, True, {"t": 0.3}, None, lambda b, xs: ref_slerp(0.3, b, xs[0])),
    (
        "nuslerp",
        2,
        False,
        {},
        [{"weight": 1.0}, {"weight": 2.0}],
        lambda b, xs: ref_slerp(2 / 3, xs[0], xs[1]),
    ),
    ("model_stock", 3, True, {}, None, ref_model_stock),
    ("passthrough", 1, False, {}, [{"scale": 0.5}], lambda b, xs: 0.5 * xs[0]),
]
IDS = [row[0] for row in TABLE]


def test_table_covers_every_classic_method():
    assert {row[0] for row in TABLE} == CLASSIC


@pytest.mark.parametrize("name, n, with_base, values, per_model, expected", TABLE, ids=IDS)
def test_every_method_on_seeded_tensors(name, n, with_base, values, per_model, expected):
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(5, 7, generator=gen)
    tensors = [base + 0.5 * torch.randn(5, 7, generator=gen) for _ in range(n)]
    inputs = [x.clone() for x in tensors]
    b = base if with_base else None
    out = run(name, b, tensors, values, per_model)
    assert out.shape == base.shape and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    # pure: inputs untouched, same parameters give the same result
    assert all(torch.equal(x, y) for x, y in zip(tensors, inputs))
    assert torch.equal(run(name, b, tensors, values, per_model), out)
    if expected is not None:
        close(out, expected(base, inputs), atol=1e-5)
    else:  # randomized: some entries of each task vector dropped, the rest moved
        assert ((out - base) == 0).any() and ((out - base) != 0).any()


@pytest.mark.parametrize("name, n, with_base, values, per_model, expected", TABLE, ids=IDS)
def test_identical_inputs_give_the_input_back(name, n, with_base, values, per_model, expected):
    """Merging copies of one model (base included) returns it, for every method."""
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(1))
    out = run(
        name, x.clone() if with_base else None, [x.clone() for _ in range(n)], values, per_model
    )
    expected = x * 0.5 if name == "passthrough" else x  # the table scales passthrough by 0.5
    close(out, expected)


# ---------------------------------------------------------------------- linear


def test_linear_weighted_average():
    a, b = t(1.0, 2.0), t(3.0, 6.0)
    w = [{"weight": 1.0}, {"weight": 3.0}]
    close(run("linear", None, [a, b], {}, w), [(1 + 9) / 4, (2 + 18) / 4])
    close(run("linear", None, [a, b], {"normalize": False}, w), [10.0, 20.0])


def test_linear_zero_weight_sum_is_a_clear_error():
    with pytest.raises(SpecError, match="normalize"):
        run("linear", None, [t(1.0), t(2.0)], {}, [{"weight": 1.0}, {"weight": -1.0}])


@settings(max_examples=30, deadline=None)
@given(
    values=st.lists(st.floats(-100, 100, width=32), min_size=1, max_size=8),
    weights=st.lists(st.floats(0.1, 10), min_size=1, max_size=4),
)
def test_linear_of_identical_tensors_is_identity(values, weights):
    x = torch.tensor(values)
    out = run("linear", None, [x.clone() for _ in weights], {}, [{"weight": w} for w in weights])
    torch.testing.assert_close(out, x, rtol=1e-5, atol=1e-4)


# ----------------------------------------------------------- task arithmetic


def test_task_arithmetic_formula():
    base, x1, x2 = t(1, 1, 1), t(2, 0, 1), t(1, 3, -1)
    w = [{"weight": 0.5}, {"weight": 1.0}]
    # deltas [1,-1,0] and [0,2,-2]; 0.5*d1 + d2 = [0.5, 1.5, -2]
    close(run("task_arithmetic", base, [x1, x2], {}, w), [1.5, 2.5, -1.0])
    close(run("task_arithmetic", base, [x1, x2], {"lambda": 2.0}, w), [2.0, 4.0, -3.0])
    normalized = [1 + 0.5 / 1.5, 1 + 1.5 / 1.5, 1 - 2 / 1.5]
    close(run("task_arithmetic", base, [x1, x2], {"normalize": True}, w), normalized)


def test_task_arithmetic_normalize_guards_a_zero_weight_sum():
    base, x1, x2 = t(0, 0), t(1, 2), t(3, 1)
    w = [{"weight": 1.0}, {"weight": -1.0}]
    close(run("task_arithmetic", base, [x1, x2], {"normalize": True}, w), [-2.0, 1.0])


# ------------------------------------------------------------------------ TIES


def test_ties_trim_elect_disjoint_mean_by_hand():
    base = torch.zeros(4)
    d1, d2 = t(3, -1, 0.5, -4), t(-2, 2, 1, -1)
    pm = [{"weight": 1.0, "density": 0.5}, {"weight": 2.0, "density": 0.5}]
    # trim to 2 of 4:   d1 -> [3, 0, 0, -4]     d2 -> [-2, 2, 0, 0] (|-2| = |2| tie: both kept)
    # weighted:         [3, 0, 0, -4]           [-4, 4, 0, 0]
    # elect (sum):      [-1, 4, 0, -4] -> signs [-, +, +, -]
    # agreeing sums:    [-4, 4, 0, -4]  over weights [2, 2, 0->1, 1]
    close(run("ties", base, [d1, d2], {}, pm), [-2.0, 2.0, 0.0, -4.0])
    close(run("ties", base, [d1, d2], {"normalize": False}, pm), [-4.0, 4.0, 0.0, -4.0])
    close(run("ties", base + 1, [d1 + 1, d2 + 1], {"lambda": 0.5}, pm), [0.0, 2.0, 1.0, -1.0])


def test_ties_zero_weight_sum_over_agreeing_models_divides_by_one():
    # weights 1 and -1: both weighted deltas are +1 and agree, their weights sum
    # to 0, and mergekit then divides by 1 instead
    out = run("ties", t(0.0), [t(1.0), t(-1.0)], {}, [{"weight": 1.0}, {"weight": -1.0}])
    close(out, [2.0])


def test_ties_count_consensus_differs_from_sum():
    weighted = [t(5.0, 1.0), t(-1.0, -1.0), t(-1.0, 2.0)]
    close(_sparsify.majority_sign(weighted, "sum"), [1.0, 1.0])  # 3 and 2
    close(_sparsify.majority_sign(weighted, "count"), [-1.0, 1.0])  # 1 vs 2 votes, 2 vs 1
    close(_sparsify.majority_sign([t(1.0, 0.0), t(-1.0, 0.0)], "sum"), [1.0, 1.0])  # 0 -> +


def test_ties_rescale_restores_l1_norm():
    base = torch.zeros(4)
    d = t(3, -1, 0.5, -4)
    pm = [{"weight": 1.0, "density": 0.5}]
    # trimmed [3, 0, 0, -4] has L1 7; the original 8.5
    close(run("ties", base, [d], {"rescale": True}, pm), [3 * 8.5 / 7, 0, 0, -4 * 8.5 / 7])


@settings(max_examples=40, deadline=None)
@given(
    base=st.lists(st.floats(-10, 10, width=32), min_size=6, max_size=6),
    other=st.lists(st.floats(-10, 10, width=32), min_size=6, max_size=6),
    weight=st.floats(-3, 3).filter(lambda w: abs(w) > 1e-3),
    lam=st.floats(0, 2),
)
def test_ties_with_one_model_and_density_1_is_task_arithmetic(base, other, weight, lam):
    b, x = torch.tensor(base), torch.tensor(other)
    vals = {"normalize": False, "lambda": lam}
    ties = run("ties", b, [x], vals, [{"weight": weight, "density": 1.0}])
    ta = run("task_arithmetic", b, [x], vals, [{"weight": weight}])
    torch.testing.assert_close(ties, ta, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------- magnitude top-k


def test_density_one_is_a_no_op():
    x = torch.randn(10)
    gen = torch.Generator().manual_seed(0)
    assert _sparsify.magnitude(x, 1.0) is x
    assert _sparsify.magnitude(x, 1.5) is x
    assert _sparsify.magnitude_outliers(x, 1.0, gamma=0.1) is x
    assert _sparsify.random_drop(x, 1.0, gen) is x
    assert _sparsify.rank_sampling(x, 1.0, 0.15, gen) is x


def test_magnitude_ties_at_threshold_keep_lower_indices():
    close(_sparsify.magnitude(t(1, -1, 1, 1, 0.5), 0.4), [1, -1, 0, 0, 0])
    close(_sparsify.magnitude(t(0.5, 2, 1, 1, 1), 0.6), [0, 2, 1, 1, 0])
    close(_sparsify.magnitude(t(3, 1), 0.4), [0, 0])  # keeps int(0.8) = 0 entries


@pytest.mark.parametrize("shape, density", [((257,), 0.3), ((64, 48), 0.5), ((8, 3, 5), 0.11)])
def test_topk_matches_an_argsort_reference(shape, density):
    n = math.prod(shape)
    gen = torch.Generator().manual_seed(n)
    # distinct magnitudes, random signs: no ties, so the set is unique
    x = (torch.randperm(n, generator=gen).float() + 1) * (
        torch.randint(0, 2, (n,), generator=gen) * 2 - 1
    )
    x = x.reshape(shape)
    k = int(density * n)
    mask = _sparsify.topk_mask(x, k)
    assert int(mask.sum()) == k
    reference = torch.zeros(n, dtype=torch.bool)
    reference[torch.argsort(x.abs().reshape(-1), descending=True)[:k]] = True
    assert torch.equal(mask.reshape(-1), reference)
    torch.testing.assert_close(_sparsify.magnitude(x, density), x * reference.reshape(shape))


@settings(max_examples=60, deadline=None)
@given(
    values=st.lists(
        st.sampled_from([0.0, 0.5, -0.5, 1.0, -1.0, 2.0, 3.0, -3.0]), min_size=1, max_size=40
    ),
    density=st.floats(0.0, 1.0),
)
def test_topk_with_ties_keeps_exactly_k_like_a_stable_argsort(values, density):
    x = torch.tensor(values)
    k = int(density * x.numel())
    mask = _sparsify.topk_mask(x, k)
    reference = torch.zeros(x.numel(), dtype=torch.bool)
    reference[torch.argsort(x.abs(), descending=True, stable=True)[:k]] = True
    assert int(mask.sum()) == k
    assert torch.equal(mask, reference)


# ------------------------------------------------------------------ breadcrumbs

BREAD = t(0.1, -5, 2, -0.3, 1, 4, -3, 0.2, 0.5, -2.5)


def test_breadcrumbs_cuts_outliers_and_small_entries_by_hand():
    # 10 entries, density 0.5 keeps 5, gamma 0.1 cuts the largest 1, so the
    # smallest 4 go too: |.| sorted 0.1 0.2 0.3 0.5 | 1 2 2.5 3 4 | 5
    expected = [0, 0, 2, 0, 1, 4, -3, 0, 0, -2.5]
    close(_sparsify.magnitude_outliers(BREAD, 0.5, gamma=0.1), expected)
    pm = [{"weight": 2.0, "density": 0.5, "gamma": 0.1}]
    base = torch.ones(10)
    close(run("breadcrumbs", base, [base + BREAD], {}, pm), 1 + 2 * torch.tensor(expected))


def test_breadcrumbs_without_outliers_is_magnitude_top_k():
    # gamma 0 (or a tensor too small for one outlier) cuts only small entries;
    # mergekit's slice [n_bot:-0] would keep nothing here.
    close(_sparsify.magnitude_outliers(BREAD, 0.5, gamma=0.0), _sparsify.magnitude(BREAD, 0.5))
    close(_sparsify.magnitude_outliers(BREAD, 0.5, gamma=0.01), _sparsify.magnitude(BREAD, 0.5))


def test_breadcrumbs_cuts_fewer_outliers_when_density_needs_them():
    # keep 9 of 10 with gamma 0.2 -> only the single largest (|-5|) can go
    expected = BREAD.clone()
    expected[1] = 0
    close(_sparsify.magnitude_outliers(BREAD, 0.95, gamma=0.2), expected)


def test_breadcrumbs_ties_elects_signs():
    base = torch.zeros(10)
    other = -BREAD * 0.5  # opposite sign everywhere, half the size
    pm = [{"weight": 1.0, "density": 0.5, "gamma": 0.1}] * 2
    kept = torch.tensor([0, 0, 2, 0, 1, 4, -3, 0, 0, -2.5])
    # same mask for both; BREAD wins every vote; breadcrumbs_ties does not normalize
    close(run("breadcrumbs_ties", base, [BREAD, other], {}, pm), kept)
    close(run("breadcrumbs", base, [BREAD, other], {}, pm), kept * 0.5)


@settings(max_examples=60, deadline=None)
@given(
    values=st.lists(
        st.sampled_from([0.0, 0.5, -0.5, 1.0, -1.0, 2.0, -3.0]), min_size=1, max_size=40
    ),
    density=st.floats(0.0, 0.99),
    gamma=st.floats(0.0, 0.3),
)
def test_breadcrumbs_matches_a_stable_sort_reference(values, density, gamma):
    x = torch.tensor(values)
    n = x.numel()
    keep, top = int(density * n), int(gamma * n)
    bottom = n - keep - top
    if bottom < 0:
        top, bottom = top + bottom, 0
    order = torch.argsort(x.abs(), stable=True)
    reference = torch.zeros(n, dtype=torch.bool)
    reference[order[bottom : n - top]] = True
    torch.testing.assert_close(_sparsify.magnitude_outliers(x, density, gamma), x * reference)


# ------------------------------------------------------------------------ DARE


def _dare(name, seed, density=0.5, n=64, **values):
    gen = torch.Generator().manual_seed(7)
    base = torch.randn(n, generator=gen)
    xs = [base + torch.randn(n, generator=gen) for _ in range(2)]
    pm = [{"weight": 1.0, "density": density}] * 2
    return base, xs, run(name, base, xs, {"seed": seed, **values}, pm)


@pytest.mark.parametrize("name", ["dare_ties", "dare_linear", "della", "della_linear"])
def test_randomized_methods_are_deterministic_per_seed(name):
    _, _, a = _dare(name, seed=1)
    _, _, b = _dare(name, seed=1)
    _, _, c = _dare(name, seed=2)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_dare_linear_drops_and_rescales_to_the_l1_norm():
    base, (x1, x2), out = _dare("dare_linear", seed=0, density=0.3, n=2000, rescale=True)
    params = params_for(get_method("dare_linear"), 2, {"seed": 0}, [{"weight": 1.0}] * 2)
    mixed = torch.zeros_like(base)
    for i, x in enumerate((x1, x2)):
        d = x - base
        keep = torch.rand(d.shape, generator=params.generator(i)) < 0.3
        mixed += d * keep * (d.abs().sum() / (d * keep).abs().sum())
    close(out, base + mixed, atol=1e-5)
    kept_fraction = (torch.rand(2000, generator=params.generator(0)) < 0.3).float().mean()
    assert abs(float(kept_fraction) - 0.3) < 0.05


def test_dare_ties_is_ties_on_dropped_task_vectors():
    base, (x1, x2), out = _dare("dare_ties", seed=5, density=0.5, n=50, rescale=False)
    params = params_for(get_method("dare_ties"), 2, {"seed": 5}, [{"weight": 1.0}] * 2)
    d = []
    for i, x in enumerate((x1, x2)):
        keep = torch.rand(x.shape, generator=params.generator(i)) < 0.5
        d.append((x - base) * keep)
    elected = torch.where(d[0] + d[1] >= 0, 1.0, -1.0)
    agree = [di.sign() == elected for di in d]
    close(out, base + d[0] * agree[0] + d[1] * agree[1], atol=1e-6)  # weights 1, no normalize


def test_dare_expected_value_is_the_task_vector():
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(400, generator=gen)
    x = base + torch.randn(400, generator=gen)
    pm = [{"weight": 1.0, "density": 0.5}]
    outs = torch.stack([run("dare_linear", base, [x], {"seed": s}, pm) for s in range(300)])
    delta = x - base
    error = (outs.mean(0) - base) - delta
    assert float(error.norm() / delta.norm()) < 0.1
    assert float((outs - base).abs().sum(1).sub(delta.abs().sum()).abs().max()) < 1e-2


def test_dare_density_one_is_task_arithmetic():
    _, _, dare = _dare("dare_linear", seed=3, density=1.0)
    gen = torch.Generator().manual_seed(7)
    base = torch.randn(64, generator=gen)
    xs = [base + torch.randn(64, generator=gen) for _ in range(2)]
    close(dare, run("task_arithmetic", base, xs, {}, [{"weight": 1.0}] * 2), atol=1e-6)


# ----------------------------------------------------------------------- DELLA


def test_della_keep_probability_follows_magnitude_rank():
    rows = 20000
    gen = torch.Generator().manual_seed(0)
    mags = torch.stack([torch.randperm(5, generator=gen) + 1.0 for _ in range(rows)])
    pm = [{"weight": 1.0, "density": 0.5, "epsilon": 0.4}]
    base = torch.zeros_like(mags)
    out = run("della_linear", base, [mags], {"rescale": False}, pm)
    kept = out != 0
    assert torch.equal(out[kept], mags[kept])  # no rescaling
    # ranks 0..4 -> 0.5 - 0.4 + 0.8 * r / 4
    for magnitude, p in zip(range(1, 6), (0.1, 0.3, 0.5, 0.7, 0.9)):
        freq = kept[mags == magnitude].float().mean()
        assert abs(float(freq) - p) < 0.02, (magnitude, float(freq), p)


def test_della_rejects_epsilon_outside_the_density_band():
    with pytest.raises(SpecError, match="epsilon"):
        run("della", torch.zeros(8), [torch.ones(8)], {}, [{"weight": 1.0, "density": 0.9}])


def test_della_lambda_and_normalize():
    base = torch.zeros(6)
    x = t(1, -2, 3, -4, 5, -6)
    pm = [{"weight": 2.0, "density": 1.0}]
    # density 1 keeps everything; della normalizes by the agreeing weight (2)
    close(run("della", base, [x], {"lambda": 0.5}, pm), x * 0.5)
    close(run("della_linear", base, [x], {"lambda": 0.5}, pm), x * 2 * 0.5)


# ----------------------------------------------------------------------- SLERP


def test_slerp_endpoints_and_orthogonal_midpoint():
    a, b = t(2, 0), t(0, 1)
    close(run("slerp", a, [b], {"t": 0.0}), a)
    close(run("slerp", a, [b], {"t": 1.0}), b)
    s = math.sin(math.pi / 4)  # theta = pi/2: both coefficients sin(pi/4) / sin(pi/2)
    close(run("slerp", a, [b], {"t": 0.5}), [2 * s, s])
    s0, s1 = math.sin(math.pi / 2 * 0.75), math.sin(math.pi / 2 * 0.25)
    close(run("slerp", a, [b], {"t": 0.25}), [2 * s0, s1])


def test_slerp_general_angle_formula():
    a, b = t(1, 0, 0), t(1, 1, 0)  # 45 degrees, different norms
    theta = math.pi / 4
    s0, s1 = math.sin(0.7 * theta) / math.sin(theta), math.sin(0.3 * theta) / math.sin(theta)
    close(run("slerp", a, [b], {"t": 0.3}), [s0 + s1, s1, 0])


@pytest.mark.parametrize("other", [t(3, 6, -9), t(-1, -2, 3), t(1, 2.0001, -3)])
def test_slerp_falls_back_to_lerp_when_colinear(other):
    a = t(1, 2, -3)
    close(run("slerp", a, [other], {"t": 0.25}), 0.75 * a + 0.25 * other)


# --------------------------------------------------------------------- NuSLERP


def test_nuslerp_weights_set_t_and_flatten_by_default():
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    b = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    pm = [{"weight": 1.0}, {"weight": 3.0}]  # t = 3 / 4
    # flattened [1,0,0,1] and [0,1,1,0] are orthogonal with equal norms
    s0, s1 = math.sin(math.pi / 2 * 0.25), math.sin(math.pi / 2 * 0.75)
    close(run("nuslerp", None, [a, b], {}, pm), s0 * a + s1 * b)


def test_nuslerp_row_wise_and_column_wise():
    a = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    b = torch.tensor([[0.0, 1.0], [2.0, 0.0]])
    pm = [{"weight": 1.0}, {"weight": 1.0}]  # t = 0.5
    s = math.sin(math.pi / 4)
    # vectors along the last dim: row 0 orthogonal, row 1 colinear -> lerp
    rows = run("nuslerp", None, [a, b], {"nuslerp_flatten": False}, pm)
    close(rows, [[s, s], [1.5, 0.0]])
    # row_wise slerps along dim 0: column 0 is [1,1] vs [0,2] (45 degrees),
    # column 1 is [0,0] vs [1,0] (a zero vector counts as orthogonal)
    cols = run("nuslerp", None, [a, b], {"nuslerp_flatten": False, "nuslerp_row_wise": True}, pm)
    c = math.sin(math.pi / 8) / math.sin(math.pi / 4)
    close(cols, [[c * 1 + c * 0, s], [c * 1 + c * 2, 0.0]])


def test_nuslerp_with_base_slerps_task_vectors():
    base = t(1, 1)
    a, b = base + t(2, 0), base + t(0, 2)
    s = math.sin(math.pi / 4)
    close(
        run("nuslerp", base, [a, b], {}, [{"weight": 1.0}, {"weight": 1.0}]), base + t(2 * s, 2 * s)
    )


def test_nuslerp_cancelling_weights_use_the_midpoint():
    a, b = t(1, 0), t(0, 1)
    s = math.sin(math.pi / 4)
    close(run("nuslerp", None, [a, b], {}, [{"weight": 1.0}, {"weight": -1.0}]), [s, s])


# ----------------------------------------------------------------- Model Stock


def test_model_stock_formula_for_two_models():
    base = t(0, 0)
    x1, x2 = t(1, 0), t(1, 1)
    cos = 1 / math.sqrt(2)
    ratio = 2 * cos / (1 + cos)
    close(run("model_stock", base, [x1, x2]), [ratio * 1.0, ratio * 0.5])


def test_model_stock_averages_pairwise_cosines():
    base = torch.zeros(2)
    xs = [t(1, 0), t(0, 1), t(1, 1)]
    cos = (0.0 + 1 / math.sqrt(2) + 1 / math.sqrt(2)) / 3
    ratio = 3 * cos / (1 + 2 * cos)
    close(run("model_stock", base, xs), ratio * torch.tensor([2 / 3, 2 / 3]))


def test_model_stock_filter_wise_uses_a_ratio_per_row():
    base = torch.zeros(2, 2)
    x1 = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    x2 = torch.tensor([[0.0, 1.0], [2.0, 0.0]])
    out = run("model_stock", base, [x1, x2], {"filter_wise": True})
    # row 0: cos 0 -> ratio 0 -> base; row 1: cos 1 -> ratio 1 -> average
    close(out, [[0.0, 0.0], [1.5, 0.0]])


def test_model_stock_models_equal_to_base_give_base():
    base = t(1, 2, 3)
    close(run("model_stock", base, [base.clone(), base.clone()]), base)


# ----------------------------------------------------------------- passthrough


def test_passthrough_copies_or_scales():
    x = t(1, -2, 3)
    assert torch.equal(run("passthrough", None, [x]), x)
    close(run("passthrough", None, [x], {}, [{"scale": 2.0}]), 2 * x)


def test_model_counts_are_enforced():
    with pytest.raises(SpecError):
        get_method("slerp").check(2, True)
    with pytest.raises(SpecError):
        get_method("slerp").check(1, False)
    with pytest.raises(SpecError):
        get_method("passthrough").check(2, False)
    with pytest.raises(SpecError):
        get_method("model_stock").check(1, True)
    with pytest.raises(SpecError):
        get_method("nuslerp").check(3, True)
    get_method("nuslerp").check(2, False)
    get_method("nuslerp").check(2, True)


@pytest.mark.parametrize("chunk", [1, 3, 7, 1 << 20])
@pytest.mark.parametrize("consensus,normalize", [("sum", True), ("sum", False), ("count", True), (None, False)])
def test_chunked_trim_elect_matches_reference_across_block_edges(monkeypatch, chunk, consensus, normalize):
    """The block-wise fast path (ties / task_arithmetic) equals the whole-tensor
    reference, including ties at the trim threshold that straddle block edges."""
    import weightspace.merges.generalized_ta as gta

    monkeypatch.setattr(gta, "CHUNK", chunk)
    g = torch.Generator().manual_seed(3)
    # integer values throughout, so x - base is exact and magnitudes tie at every threshold
    base = torch.randint(-5, 6, (6, 5), generator=g).float()
    deltas = [torch.randint(-3, 4, (6, 5), generator=g).float() for _ in range(3)]
    weights, dens = [1.0, 0.5, 2.0], [0.5, 0.3, 0.7]
    got = gta.merge_task_vectors(base, [base + d for d in deltas], weights, densities=dens,
                                 sparsification="magnitude", consensus=consensus,
                                 normalize=normalize, lambda_=0.8)
    trimmed = [ref_trim(d, k) for d, k in zip(deltas, dens)]
    if consensus == "count":
        w = [d * wi for d, wi in zip(trimmed, weights)]
        elected = torch.where(sum(x.sign() for x in w) >= 0, 1.0, -1.0)
        masks = [x.sign() == elected for x in w]
        mixed = sum(x * m for x, m in zip(w, masks))
        div = sum(m * wi for m, wi in zip(masks, weights))
        div[div.abs() < 1e-8] = 1
        expected = base + 0.8 * (mixed / div)
    elif consensus == "sum":
        expected = base + 0.8 * ref_elect_mean(trimmed, weights, normalize)
    else:
        expected = base + 0.8 * sum(d * wi for d, wi in zip(trimmed, weights))
    close(got, expected, atol=1e-5)
