"""mergekit 0.1.5's further methods: sce, multislerp, karcher, nearswap, arcee_fusion, ram,
ramplus_tl. Their names, parameters and defaults against mergekit's; their numbers on small
seeded tensors against formulas written out here (or in _method_helpers.py) and hand-checked
cases; the special cases mergekit has (zero norms, antipodal inputs, ties, empty selections);
float16/bfloat16 inputs that break mergekit's arithmetic; streaming in row blocks; and each
method end to end through `wsmerge run` in float32, float16 and bfloat16.
"""

from __future__ import annotations

import math

import pytest
import torch
from _method_helpers import (
    MERGEKIT_FAMILY,
    close,
    ref_arcee_fusion,
    ref_multislerp,
    ref_nearswap,
    ref_ram,
    ref_ramplus_tl,
    ref_sce,
    run,
    t,
)

from weightspace import load_space
from weightspace.errors import InputError, SpecError
from weightspace.merge import plan_merge, run_plan
from weightspace.methods import all_methods, get_method
from weightspace.spec import parse_spec

# ---------------------------------------------------------------- names, parameters, defaults

# As mergekit 0.1.5 declares them (merge_methods/*.py): base policy, models besides the base
# (min, max), global parameters with defaults (None: required), per-model parameters.
MERGEKIT = {
    "sce": ("required", 1, None, {"select_topk": 1.0, "int8_mask": False}, {}),
    "multislerp": ("optional", 1, None, {"normalize_weights": True, "eps": 1e-8}, {"weight": None}),
    # mergekit's base_model is one more model here: the planner adds an unlisted one last
    "karcher": ("none", 1, None, {"max_iter": 10, "tol": 1e-5}, {}),
    "nearswap": ("required", 1, 1, {"t": None}, {}),
    "arcee_fusion": ("required", 1, 1, {}, {}),
    "ram": ("required", 1, None, {"epsilon": 1e-5}, {}),
    "ramplus_tl": ("required", 1, None, {"r": 0.1, "alpha": 0.2, "epsilon": 1e-5}, {}),
}
URLS = {
    "sce": "https://arxiv.org/abs/2408.07990",
    "multislerp": "https://goddard.blog/posts/multislerp-wow-what-a-cool-idea",
    "karcher": "https://arxiv.org/abs/2603.04972",
    "nearswap": "https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001",
    "arcee_fusion": "https://arcee.ai",
    "ram": "https://arxiv.org/abs/2601.13572",
    "ramplus_tl": "https://arxiv.org/abs/2601.13572",
}


@pytest.mark.parametrize("name", sorted(MERGEKIT))
def test_names_parameters_and_defaults_are_mergekits(name):
    assert set(MERGEKIT) == MERGEKIT_FAMILY
    m = all_methods()[name]
    uses_base, lo, hi, global_defaults, model_defaults = MERGEKIT[name]
    assert (m.uses_base, m.min_models, m.max_models) == (uses_base, lo, hi)
    got = {p.name: (None if p.required else p.default) for p in m.all_global_params()}
    assert got == global_defaults
    assert {p.name: (None if p.required else p.default) for p in m.model_params} == model_defaults
    assert m.pretty_name and m.paper and m.reference_url == URLS[name]
    assert not m.randomized
    assert m.elementwise == (name in ("nearswap", "ram"))
    for p in (*m.all_global_params(), *m.model_params):  # every number has a declared range
        if p.kind in (int, float) and p.name != "weight":
            assert p.range_text(), (name, p.name)


def test_wsmerge_methods_lists_each_with_its_paper(run_cli):
    import json

    code, out, _ = run_cli("methods", "--json")
    assert code == 0
    data = {m["name"]: m for m in json.loads(out)}
    for name in MERGEKIT:
        assert data[name]["url"] == URLS[name] and data[name]["base_model"] == MERGEKIT[name][0]
    code, out, _ = run_cli("methods", "ramplus_tl")
    assert code == 0 and "Behavior Knowledge Merge in Reinforced Agentic Models" in out


def _seeded(n, shape=(6, 5), seed=0, scale=0.5):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(*shape, generator=g)
    return base, [base + scale * torch.randn(*shape, generator=g) for _ in range(n)]


# ------------------------------------------------------------------------------------ sce


@pytest.mark.parametrize("select_topk", [1.0, 0.5, 0.1])
@pytest.mark.parametrize("shape", [(6, 5), (11,)])
def test_sce_matches_the_formula(select_topk, shape):
    base, xs = _seeded(3, shape)
    close(run("sce", base, xs, {"select_topk": select_topk}), ref_sce(base, xs, select_topk), atol=1e-5)


def test_sce_by_hand():
    # d1 = (1, 2, -1), d2 = (3, -2, -1): mean squares 2 and 14/3 give weights 0.3 and 0.7.
    # Entry 0: both agree, (0.3 + 2.1) / 1; entry 1: the sum is 0, + is elected, only d1 agrees;
    # entry 2: both agree on -.
    out = run("sce", torch.zeros(3), [t(1, 2, -1), t(3, -2, -1)])
    close(out, [2.4, 2.0, -1.0])


def test_sce_selection_keeps_the_highest_variance_positions():
    d1, d2 = t(1, 0, 3, 0.5), t(-1, 1, 3, 0.0)  # variances 1, 0.25, 0, 0.0625: 3 nonzero
    out = run("sce", torch.zeros(4), [d1, d2], {"select_topk": 0.7})  # k = int(3 * 0.7) = 2
    # positions 0 and 1 stay. Entry 0: the sum is 0, + elected, only d1 (weight 1/2 each: the
    # kept mean squares are equal) agrees -> 1; entry 1: only d2 is nonzero -> 1.
    close(out, [1.0, 1.0, 0.0, 0.0])


def test_sce_edge_cases():
    base, xs = _seeded(2)
    assert torch.equal(run("sce", base, xs, {"select_topk": 0.0}), base)  # nothing selected
    assert torch.equal(run("sce", base, [base.clone(), base.clone()]), base)  # no change
    # task vectors whose mean squares sum below 1e-6 are weighted equally
    tiny = [base + 1e-4 * (x - base) for x in xs]
    d = [x - base for x in tiny]
    up = (d[0] + d[1]) >= 0
    agree = [torch.where(up, di > 0, di < 0).float() for di in d]
    count = agree[0] + agree[1]
    expected = base + torch.where(count > 0, (d[0] * agree[0] + d[1] * agree[1]) / count.clamp(min=1), 0.0)
    close(run("sce", base, tiny), expected, atol=1e-7)
    # a zero entry agrees with neither sign and adds nothing to the divisor
    close(run("sce", torch.zeros(1), [t(0.0), t(2.0)]), [2.0])


# ----------------------------------------------------------------------------- multislerp


@pytest.mark.parametrize("with_base", [False, True])
@pytest.mark.parametrize("weights", [(1.0, 1.0), (0.2, 0.5, 0.3), (2.0, -0.5, 1.0)])
def test_multislerp_matches_the_closed_form(with_base, weights):
    base, xs = _seeded(len(weights))
    out = run("multislerp", base if with_base else None, xs, {},
              [{"weight": w} for w in weights])
    close(out, ref_multislerp(xs, list(weights), base if with_base else None), atol=1e-5)


def test_multislerp_by_hand():
    a, b = t(3, 0), t(0, 1)  # unit directions e1, e2; norms 3 and 1
    out = run("multislerp", None, [a, b], {}, [{"weight": 1.0}, {"weight": 1.0}])
    close(out, [2 / math.sqrt(2), 2 / math.sqrt(2)])  # the bisector, times the mean norm 2
    # normalize_weights: false leaves the weights as they are: 0.5 e1 + 0.5 e2 -> same
    # direction, the norm (0.5 * 3 + 0.5 * 1) = 2 again; with weights 1, 1 it doubles
    out = run("multislerp", None, [a, b], {"normalize_weights": False},
              [{"weight": 1.0}, {"weight": 1.0}])
    close(out, [4 / math.sqrt(2), 4 / math.sqrt(2)])


def test_multislerp_special_cases():
    x = t(1, 2, 3)
    assert torch.equal(run("multislerp", None, [x], {}, [{"weight": 0.3}]), x)
    assert torch.equal(run("multislerp", torch.zeros(3), [x], {}, [{"weight": 0.3}]), x)
    # two antipodal models with equal weights: mergekit's fallback, the weighted sum
    close(run("multislerp", None, [x, -x], {}, [{"weight": 1.0}] * 2), [0.0, 0.0, 0.0])
    close(run("multislerp", None, [x, -2 * x], {}, [{"weight": 1.0}] * 2), -0.5 * x)
    # three whose directions cancel: an error naming the tensor, as mergekit raises
    e = [t(1, 0), t(-0.5, math.sqrt(3) / 2), t(-0.5, -math.sqrt(3) / 2)]
    with pytest.raises(InputError, match="multislerp: tensor 'layers.0.w'.*weights"):
        run("multislerp", None, e, {}, [{"weight": 1.0}] * 3)
    # ...but a tensor that no fine-tune changed returns the base (mergekit raises here too)
    base = t(1, 2, 3)
    assert torch.equal(run("multislerp", base, [base.clone()] * 3, {}, [{"weight": 1.0}] * 3), base)


def test_multislerp_weights_that_cannot_be_normalized_are_a_spec_error():
    with pytest.raises(SpecError, match="weights sum to 0.*normalize_weights: false"):
        get_method("multislerp").check_params(
            _params("multislerp", 2, per_model=[{"weight": 1.0}, {"weight": -1.0}]), ["a", "b"])
    get_method("multislerp").check_params(  # one model: its weight is never used
        _params("multislerp", 1, per_model=[{"weight": 0.0}]), ["a"])


def _params(name, n, values=None, per_model=None):
    from _method_helpers import params_for

    return params_for(get_method(name), n, values, per_model)


# -------------------------------------------------------------------------------- karcher


def test_karcher_of_two_is_the_geodesic_midpoint_scaled_by_the_mean_norm():
    out = run("karcher", None, [t(2, 0, 0), t(0, 4, 0)])
    close(out, [3 / math.sqrt(2), 3 / math.sqrt(2), 0.0])


def test_karcher_of_three_is_a_stationary_point():
    """At the Karcher mean the log maps of the directions sum to zero; the scale is the mean norm."""
    _, xs = _seeded(3, scale=1.0)
    out = run("karcher", None, xs, {"max_iter": 200, "tol": 1e-9}).double().reshape(-1)
    norms = [float(x.double().norm()) for x in xs]
    assert float(out.norm()) == pytest.approx(sum(norms) / 3, rel=1e-5)
    m = out / out.norm()
    grad = torch.zeros_like(m)
    for x in xs:
        u = x.double().reshape(-1) / x.double().norm()
        cos = float(torch.clamp(u @ m, -1, 1))
        theta = math.acos(cos)
        grad += theta / math.sin(theta) * (u - cos * m)
    assert float(grad.norm()) < 1e-5
    # the defaults (10 iterations, stop below a 1e-5 step) get there to about tol
    close(run("karcher", None, xs).double().reshape(-1), out, atol=1e-4)


def test_karcher_special_cases():
    x = t(1, -2, 2)
    assert torch.equal(run("karcher", None, [x]), x)
    assert torch.equal(run("karcher", None, [torch.zeros(3), torch.zeros(3)]), torch.zeros(3))
    # a zero model takes no part in the direction but its norm (0) counts in the mean norm
    a, b = t(2, 0, 0), t(0, 4, 0)
    close(run("karcher", None, [a, torch.zeros(3), b]), [2 / math.sqrt(2), 2 / math.sqrt(2), 0.0])



def test_an_unlisted_base_model_is_one_more_model_last(tiny_models, tmp_path):
    """As mergekit 0.1.5: base_model not listed among the models joins them, last (karcher has
    no base of its own, so it is merged like the others)."""
    from weightspace import load_space
    from weightspace.merge import plan_merge, run_plan
    from weightspace.spec import parse_spec

    m = tiny_models
    outs = {}
    for key, head in (("base", f"base_model: {m.base}\nmodels: [{{model: {m.ft_a}}}, {{model: {m.ft_b}}}]"),
                      ("listed", f"models: [{{model: {m.ft_a}}}, {{model: {m.ft_b}}}, {{model: {m.base}}}]")):
        run_plan(plan_merge(parse_spec(f"merge_method: karcher\n{head}\n")), tmp_path / key, progress=False)
        outs[key] = load_space(tmp_path / key)
    assert all(torch.equal(outs["base"][n].load(), outs["listed"][n].load()) for n in outs["base"])


# ------------------------------------------------------------------------------- nearswap


def test_nearswap_matches_the_formula():
    base, (x,) = _seeded(1, scale=0.3)
    for tv in (0.0, 0.05, 0.2, 10.0):
        close(run("nearswap", base, [x], {"t": tv}), ref_nearswap(base, x, tv))
    assert torch.equal(run("nearswap", base, [x], {"t": 0.0}), base)
    assert torch.equal(run("nearswap", base, [x], {"t": 1e9}), x)
    # |a - b| below 1e-6 counts as 1e-6
    close(run("nearswap", t(0.0), [t(1e-7)], {"t": 5e-7}), [0.5e-7])


# --------------------------------------------------------------------------- arcee_fusion


@pytest.mark.parametrize("shape", [(12, 9), (40,)])
def test_arcee_fusion_matches_the_formula(shape):
    base, (x,) = _seeded(1, shape, seed=3)
    out = run("arcee_fusion", base, [x])
    close(out, ref_arcee_fusion(base, x))
    took = out != base
    assert 0 < int(took.sum()) < out.numel() // 2 and torch.equal(out[took], x[took])


def test_arcee_fusion_quartiles_are_mergekits_order_statistics():
    from weightspace.merges.arcee_fusion import order_statistics

    v = torch.tensor([7.0, 1.0, 5.0, 3.0, 9.0, 2.0])  # sorted 1 2 3 5 7 9; n - 1 = 5
    assert [float(q) for q in order_statistics(v, (0.25, 0.5, 0.75))] == [2.0, 3.0, 5.0]  # 1, 2, 3
    assert torch.equal(run("arcee_fusion", t(1, 2, 3), [t(1, 2, 3)]), t(1, 2, 3))


# ---------------------------------------------------------------------------- ram, ramplus_tl


def test_ram_by_hand():
    base = torch.zeros(5)
    xs = [t(2.0, 1.0, 0.0, 1e-6, -3.0), t(0.0, 3.0, 0.0, 0.0, 1.0)]
    # unique: kept; shared: averaged; unchanged or below epsilon: 0
    close(run("ram", base, xs), [2.0, 2.0, 0.0, 0.0, -1.0])
    close(run("ram", base, xs, {"epsilon": 0.0}), [2.0, 2.0, 0.0, 1e-6, -1.0])


def test_ramplus_tl_by_hand():
    base = torch.zeros(4)
    xs = [t(2.0, 1.0, 1.0, 0.0), t(0.0, 3.0, 0.0, 4.0), t(0.0, 0.0, 0.0, 0.0)]
    # model 0: shares 1 entry, has 2 alone -> rho 0.5 -> lambda 1 + 0.5 * min(0.5, 0.4) = 1.2
    # model 1: shares 1, alone 1 -> rho 1 -> lambda 1.2; model 2 changed nothing
    out = run("ramplus_tl", base, xs, {"r": 0.5, "alpha": 0.4})
    close(out, [2.4, 2.0, 1.2, 4.8])
    close(out, ref_ramplus_tl(base, xs, 0.5, 0.4))


@pytest.mark.parametrize("eps", [1e-5, 0.4])
def test_ram_and_ramplus_tl_match_the_formulas(eps):
    base, xs = _seeded(3)
    sparse = [base + (x - base) * (torch.rand(x.shape, generator=torch.Generator().manual_seed(i)) < 0.4)
              for i, x in enumerate(xs)]
    close(run("ram", base, sparse, {"epsilon": eps}), ref_ram(base, sparse, eps))
    close(run("ramplus_tl", base, sparse, {"epsilon": eps, "r": 1.0, "alpha": 0.7}),
          ref_ramplus_tl(base, sparse, 1.0, 0.7, eps))


# -------------------------------------------------- float16 / bfloat16: what breaks mergekit


HAZARDS = [  # inputs on which mergekit's float16 arithmetic gives NaN (or worse)
    ("multislerp", True, {}, [{"weight": 0.5}, {"weight": 0.5}], "untouched"),  # 0 / (0 + 1e-8)
    ("multislerp", False, {}, [{"weight": 0.5}, {"weight": 0.5}], "same"),  # sin(0) / (0 + 1e-8)
    ("nearswap", True, {"t": 0.0}, None, "near"),  # 0 * (1 / 1e-6 = Inf)
    ("nearswap", True, {"t": 1e-6}, None, "near"),  # t / |a - b| over 1 where 1/|a - b| is Inf
    ("arcee_fusion", True, {}, None, "peaked"),  # softmax underflows, 0 * log(0 / q)
    ("karcher", False, {}, None, "same"),
    ("sce", True, {"select_topk": 0.5}, None, "tiny"),  # squares of 1e-4 are 0 in float16
    ("ram", True, {}, None, "tiny"),
    ("ramplus_tl", True, {}, None, "tiny"),
]


def _hazard_inputs(kind):
    g = torch.Generator().manual_seed(7)
    base = torch.randn(8, 16, generator=g) * 0.02 + 0.01
    if kind == "untouched":
        return base, [base.clone(), base.clone()]
    if kind == "same":
        return None, [base.clone(), base.clone()]
    if kind == "tiny":
        return base, [base + 1e-4 * torch.randn(8, 16, generator=g), base + 3e-6 * torch.randn(8, 16, generator=g)]
    if kind == "near":
        return base, [base + 1e-5 * torch.randn(8, 16, generator=g)]
    peaked = base.clone()
    peaked[:, 0] = 30.0  # every other softmax entry ~1e-13: 0 in float16
    return peaked, [peaked + 0.01 * torch.randn(8, 16, generator=g)]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name, with_base, values, per_model, kind", HAZARDS,
                         ids=[f"{h[0]}-{h[4]}-{i}" for i, h in enumerate(HAZARDS)])
def test_low_precision_inputs_give_finite_results_close_to_float32(dtype, name, with_base, values,
                                                                   per_model, kind):
    base, xs = _hazard_inputs(kind)
    base = base if with_base else None
    low = [x.to(dtype) for x in xs]
    out = run(name, base.to(dtype) if base is not None else None, low, values, per_model)
    assert out.dtype == dtype and torch.isfinite(out).all()
    # the same inputs (already rounded) in float32, rounded once: what a float16 merge should give
    exact = run(name, base.to(dtype).float() if base is not None else None, [x.float() for x in low],
                values, per_model).to(dtype)
    if name in ("ram", "ramplus_tl"):  # mergekit's arithmetic in the compute dtype, on purpose
        scale = float(base.abs().max())
        torch.testing.assert_close(out.float(), exact.float(), atol=2 * torch.finfo(dtype).eps * scale, rtol=0)
    else:
        assert torch.equal(out, exact)


def test_precision_is_float32_for_half_inputs_and_float64_stays():
    from weightspace.merges._precision import working_dtype

    assert working_dtype(torch.float16) == working_dtype(torch.bfloat16) == torch.float32
    assert working_dtype(torch.float64) == torch.float64
    base, xs = _seeded(3)
    x64 = [x.double() for x in xs]
    for name, pm in [("sce", None), ("karcher", None), ("multislerp", [{"weight": 1.0}] * 3)]:
        out = run(name, base.double() if name == "sce" else None, x64, {}, pm)
        assert out.dtype == torch.float64


# ------------------------------------------------------------------- streaming in row blocks


def _integer_models(root, n=3, shape=(64, 32)):
    """Checkpoints with small integer values: exact deltas, ties, zeros (sparse changes)."""
    from weightspace import WeightSpace

    g = torch.Generator().manual_seed(0)
    base = {"model.embed_tokens.weight": torch.randint(-4, 5, shape, generator=g).float(),
            "model.layers.0.mlp.up_proj.weight": torch.randint(-4, 5, shape, generator=g).float()}
    paths = [WeightSpace.from_tensors(base).save(root / "base")]
    for k in range(n):
        t_ = {name: v + torch.randint(-2, 3, shape, generator=g).float()
              * (torch.rand(shape, generator=g) < 0.5) for name, v in base.items()}
        paths.append(WeightSpace.from_tensors(t_).save(root / f"m{k}"))
    return paths


@pytest.mark.parametrize("method, params", [
    ("sce", "{select_topk: 0.3}"), ("sce", "{}"), ("ramplus_tl", "{r: 1.0, alpha: 0.5}"),
    ("ram", "{}"), ("nearswap", "{t: 1.5}"),
])
def test_large_tensors_stream_in_blocks_with_the_same_result(tmp_path, monkeypatch, method, params):
    import weightspace.tensor_steps as wm  # the block sizes the planner reads

    base, *models = _integer_models(tmp_path)
    if method == "nearswap":
        models = models[:1]
    text = (f"merge_method: {method}\nbase_model: {base}\nmodels:\n"
            + "".join(f"  - model: {m}\n" for m in models) + f"parameters: {params}\n")
    whole = plan_merge(parse_spec(text))
    assert all(s.shape is not None and "rows" not in s.info for s in whole.steps)
    run_plan(whole, tmp_path / "whole", progress=False)
    monkeypatch.setattr(wm, "BLOCKED_MIN_BYTES", 0)
    monkeypatch.setattr(wm, "BLOCK_BYTES", 1000)  # 64x32 fp32 -> blocks of 7 rows
    blocked = plan_merge(parse_spec(text))
    assert len(blocked.steps) > 10
    stats = sum(s.shape is None for s in blocked.steps)
    assert stats == (2 if method in ("sce", "ramplus_tl") else 0)  # a statistics pass per tensor
    run_plan(blocked, tmp_path / "blocked", progress=False)
    a, b = load_space(tmp_path / "whole"), load_space(tmp_path / "blocked")
    for name in a:
        # integer inputs: sums are exact, so even the float32 weights agree to the last bit
        assert torch.equal(a[name].load(), b[name].load()), name


def test_whole_tensor_methods_say_what_they_hold():
    import importlib

    for name in MERGEKIT:
        doc = importlib.import_module(type(all_methods()[name]).__module__).__doc__
        assert "Memory:" in doc or "stream" in doc, name
        assert "Precision:" in doc, name


# ------------------------------------------------------------------- validation before reading


@pytest.mark.parametrize("method, where, text, message", [
    ("sce", "parameters.select_topk (line 6)", "parameters: {select_topk: 1.5}", "must be in [0, 1]"),
    ("karcher", "parameters.tol (line 6)", "parameters: {tol: 0}", "must be > 0"),
    ("karcher", "parameters.max_iter (line 6)", "parameters: {max_iter: 2.5}", "expected int"),
    ("multislerp", "parameters.eps (line 6)", "parameters: {eps: -1.0e-8}", "must be > 0"),
    ("nearswap", "parameters.t (line 6)", "parameters: {t: -0.1}", "must be >= 0"),
    ("ramplus_tl", "parameters.epsilon (line 6)", "parameters: {epsilon: 0}", "must be > 0"),
    ("ram", "parameters.epsilon (line 6)", "parameters: {epsilon: -1}", "must be >= 0"),
    ("ramplus_tl", "parameters.lambda (line 6)", "parameters: {lambda: 2}", "unknown parameter"),
    ("sce", "models[0].parameters.weight (line 5)", None, "unknown parameter"),
])
def test_spec_values_are_checked_before_any_model_is_opened(method, where, text, message):
    """The models do not exist: the parameter error comes first and names its field and line."""
    models = ("models:\n  - model: nowhere/a\n    parameters: {weight: 1}\n  - model: nowhere/b\n"
              if text is None else "models:\n  - model: nowhere/a\n  - model: nowhere/b\n")
    spec = parse_spec(f"merge_method: {method}\nbase_model: nowhere/base\n{models}{text or ''}\n",
                      source="<spec>")
    with pytest.raises(SpecError, match=r"^" + _re(where) + ".*" + _re(message)):
        plan_merge(spec)


def _re(s):
    import re

    return re.escape(s)


def test_plan_errors_name_the_fields(tiny_models):
    m = tiny_models
    spec = parse_spec(f"merge_method: multislerp\nmodels:\n  - model: {m.ft_a}\n    parameters: {{weight: 1}}\n"
                      f"  - model: {m.ft_b}\n    parameters: {{weight: -1}}\n", source="s.yaml")
    with pytest.raises(SpecError, match=r"models\[0\]\.parameters \(line 4\), models\[1\]\.parameters "
                                        r"\(line 6\): multislerp: the weights sum to 0"):
        plan_merge(spec)
    spec = parse_spec(f"merge_method: nearswap\nbase_model: {m.base}\nmodels:\n  - model: {m.ft_a}\n",
                      source="s.yaml")
    with pytest.raises(SpecError, match=r"missing required parameter 't'"):
        plan_merge(spec)
    spec = parse_spec(f"merge_method: arcee_fusion\nbase_model: {m.base}\nmodels:\n  - model: {m.ft_a}\n"
                      f"  - model: {m.ft_b}\n", source="s.yaml")
    with pytest.raises(SpecError, match=r"'arcee_fusion' takes exactly 1 model\(s\) besides the base"):
        plan_merge(spec)


# ------------------------------------------------------------ end to end, in three dtypes


def _spec(method, m, dtype):
    body = {
        "sce": (True, [m.ft_a, m.ft_b], "", "parameters: {select_topk: 0.5}"),
        "multislerp": (True, [m.ft_a, m.ft_b], "{weight: 0.6}|{weight: 0.4}", ""),
        "karcher": (False, [m.ft_a, m.ft_b, m.base], "", ""),
        "nearswap": (True, [m.base, m.ft_a], "", "parameters: {t: 0.005}"),
        "arcee_fusion": (True, [m.base, m.ft_a], "", ""),
        "ram": (True, [m.ft_a, m.ft_b], "", ""),
        "ramplus_tl": (True, [m.ft_a, m.ft_b], "", "parameters: {r: 0.5}"),
    }[method]
    with_base, models, per_model, params = body
    pm = per_model.split("|") if per_model else [""] * len(models)
    lines = [f"merge_method: {method}"] + ([f"base_model: {m.base}"] if with_base else []) + ["models:"]
    for path, p in zip(models, pm):
        lines.append(f"  - model: {path}" + (f"\n    parameters: {p}" if p else ""))
    return "\n".join(lines + [params, f"dtype: {dtype}", ""])


# How far a float16 / bfloat16 merge may be from the float32 one. The inputs are rounded
# first, and most of these methods then decide entry by entry (an elected sign, a variance
# rank, an importance threshold, |d| against epsilon): there a rounded input may tip the
# decision, and the entry takes another of the values being merged. So: within a few eps of
# the dtype (at the tensor's scale) nearly everywhere, and never outside the inputs' spread.
DISCRETE = {"sce", "arcee_fusion", "ram", "ramplus_tl"}


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("method", sorted(MERGEKIT))
def test_every_method_end_to_end_in_three_dtypes(tiny_models, run_cli, write_spec, method, dtype):
    m = tiny_models
    out = m.root / f"{method}-{dtype}"
    code, _, err = run_cli("run", write_spec(_spec(method, m, dtype), f"{method}-{dtype}.yaml"),
                           out, "--no-progress", "--device", "cpu")
    assert code == 0, err
    merged = load_space(out)
    assert len(merged) == 21
    ref = None
    if dtype != "float32":
        code, _, err = run_cli("run", write_spec(_spec(method, m, "float32"), f"{method}-ref.yaml"),
                               m.root / f"{method}-ref", "--no-progress", "--device", "cpu")
        assert code == 0, err
        ref = load_space(m.root / f"{method}-ref")
    inputs = [load_space(p) for p in (m.base, m.ft_a, m.ft_b)]
    eps = torch.finfo(getattr(torch, dtype)).eps
    off = total = 0
    for name in merged:
        x = merged[name].load()
        assert x.dtype == getattr(torch, dtype) and torch.isfinite(x).all(), name
        if ref is None:
            continue
        y = ref[name].load()
        tol = 4 * eps * float(y.abs().max())
        err = (x.float() - y).abs()
        if method not in DISCRETE:
            assert float(err.max()) <= tol, name
            continue
        values = [i[name].load() for i in inputs]
        spread = torch.stack([(v - y).abs() for v in values]).amax(0)
        # ramplus_tl scales a unique change d by lambda <= 1 + r * alpha = 1.1 here: past x_i by 0.1 |d|
        change = torch.stack([(v - values[0]).abs() for v in values]).amax(0)
        assert bool((err <= spread + 0.1 * change + tol).all()), name
        off, total = off + int((err > tol).sum()), total + err.numel()
    assert off <= 0.01 * total
