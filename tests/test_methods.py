"""The classic merge methods, checked against formulas written out here.

Each method runs once in a shared table on tiny seeded tensors; each then gets
hand-checkable numbers, edge cases, and a few properties (hypothesis). This file
holds the registry, the table, passthrough and the model counts; the task-vector
methods are in test_methods_task_vectors.py, the interpolations in
test_methods_interpolation.py, the formulas in _method_helpers.py.
"""

from __future__ import annotations

import pytest
import torch
from _method_helpers import (
    CLASSIC,
    MERGEKIT_FAMILY,
    close,
    ref_arcee_fusion,
    ref_breadcrumbs,
    ref_elect_mean,
    ref_karcher_pair,
    ref_model_stock,
    ref_multislerp,
    ref_nearswap,
    ref_ram,
    ref_ramplus_tl,
    ref_sce,
    ref_slerp,
    ref_trim,
    run,
    t,
)

from weightspace.errors import SpecError
from weightspace.methods import all_methods, get_method

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
        ("task_arithmetic", False, None),  # sparsifies nothing: no rescale, no density
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
    assert defaults["normalize"] is normalize and defaults.get("rescale") is rescale
    assert defaults["lambda"] == 1.0 and defaults["int8_mask"] is False
    per_model = {p.name: p for p in m.model_params}
    assert per_model["weight"].required
    if rescale is None:
        assert "rescale" not in defaults and "density" not in per_model
        assert set(m.ignored_params) == {"density", "rescale"}
    else:
        assert per_model["density"].default == 1.0
    assert ("gamma" in per_model) == name.startswith("breadcrumbs")
    assert ("epsilon" in per_model) == name.startswith("della")
    assert m.uses_base == "required"


# --------------------------------------------- one table runs every method


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
    # mergekit 0.1.5's further methods (more in test_methods_mergekit_family.py)
    ("sce", 3, True, {"select_topk": 0.6}, None, lambda b, xs: ref_sce(b, xs, 0.6)),
    (
        "multislerp",
        3,
        True,
        {},
        [{"weight": w} for w in (0.5, 0.3, 0.2)],
        lambda b, xs: ref_multislerp(xs, [0.5, 0.3, 0.2], b),
    ),
    ("karcher", 2, False, {}, None, ref_karcher_pair),
    ("nearswap", 1, True, {"t": 0.3}, None, lambda b, xs: ref_nearswap(b, xs[0], 0.3)),
    ("arcee_fusion", 1, True, {}, None, lambda b, xs: ref_arcee_fusion(b, xs[0])),
    ("ram", 3, True, {"epsilon": 0.3}, None, lambda b, xs: ref_ram(b, xs, 0.3)),
    (
        "ramplus_tl",
        3,
        True,
        {"epsilon": 0.3, "r": 0.5, "alpha": 0.5},
        None,
        lambda b, xs: ref_ramplus_tl(b, xs, 0.5, 0.5, 0.3),
    ),
]
IDS = [row[0] for row in TABLE]


def test_table_covers_every_classic_method():
    assert {row[0] for row in TABLE} == CLASSIC | MERGEKIT_FAMILY


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
