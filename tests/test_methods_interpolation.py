"""The merge methods that interpolate between models, checked against formulas written out here:
linear, SLERP, NuSLERP, Model Stock."""

from __future__ import annotations

import math

import pytest
import torch
from _method_helpers import close, run, t
from hypothesis import given, settings
from hypothesis import strategies as st

from weightspace.errors import SpecError

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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("normalize", [True, False])
def test_linear_in_cache_sized_blocks_is_mergekits_whole_tensor_sum_bit_for_bit(monkeypatch, dtype, normalize):
    """The CPU path sums blocks in float32 buffers; mergekit 0.1.5 sums the whole tensor in a
    float32 zeros tensor with addcmul_, divides, and casts back. Same bits, across block edges."""
    import weightspace.merges.linear as linear

    monkeypatch.setattr(linear, "BLOCK", 7)
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(5, 13, generator=g).to(dtype) for _ in range(3)]
    weights = [0.6, 0.3, 0.45]
    work = torch.float64 if dtype == torch.float64 else torch.float32
    w = torch.tensor(weights, dtype=work)
    expected = torch.zeros(5, 13, dtype=work)
    for x, wi in zip(xs, w):
        expected.addcmul_(x, wi)
    if normalize:
        expected /= w.sum()
    got = linear.weighted_average(xs, weights, normalize)
    bits = {torch.float32: torch.int32, torch.float64: torch.int64}.get(dtype, torch.int16)
    assert got.dtype == dtype and got.shape == (5, 13)
    assert torch.equal(got.view(bits), expected.to(dtype).view(bits))


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
