"""The task-vector merge methods, checked against formulas written out here: task arithmetic,
TIES, magnitude top-k, breadcrumbs, DARE, DELLA, and the block-wise trim-elect fast path."""

from __future__ import annotations

import math

import pytest
import torch
from _method_helpers import close, params_for, ref_elect_mean, ref_trim, run, t
from hypothesis import given, settings
from hypothesis import strategies as st

from weightspace.errors import SpecError
from weightspace.merges import _sparsify
from weightspace.methods import get_method

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
    # int(0.8) = 0, but a positive density keeps at least one entry, as in mergekit 0.1.5
    close(_sparsify.magnitude(t(3, 1), 0.4), [3, 0])
    close(_sparsify.magnitude(t(3, 1), 0.0), [0, 0])


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


def _select_reference(mag: torch.Tensor, r: int) -> tuple[float, int, int]:
    """The r-th smallest by a full sort, and how many entries are below and equal to it."""
    v = mag.reshape(-1).sort().values[r - 1]
    return float(v), int((mag < v).sum()), int((mag == v).sum())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("kind", ["distinct", "half zero", "few values", "all equal", "tiny and huge"])
def test_select_magnitude_counts_ties_exactly(dtype, kind):
    gen = torch.Generator().manual_seed(7)
    n = 5000
    x = torch.randn(n, generator=gen)
    if kind == "half zero":  # a partly frozen fine-tune's task vector
        x = x * (torch.rand(n, generator=gen) < 0.5)
    elif kind == "few values":
        x = torch.randint(0, 4, (n,), generator=gen).float()
    elif kind == "all equal":
        x = torch.full((n,), 0.25)
    elif kind == "tiny and huge":  # subnormals, zeros and infinities order like their bit patterns
        x = torch.tensor([0.0, 1e-45, 1e-40, 1.0, float("inf"), 3e38] * 100)
    mag = x.abs().to(dtype)
    for r in sorted({1, 2, mag.numel() // 2, mag.numel() // 2 + 1, mag.numel() - 1, mag.numel()}):
        v, below, equal = _sparsify.select_magnitude(mag, r)
        ref = _select_reference(mag, r)
        assert (float(v), below, equal) == ref, (r, float(v), below, equal, ref)
        assert v.dtype == dtype
        thr, above = _sparsify.kth_and_count_above(mag, r)
        assert float(thr) == ref[0] and above == mag.numel() - ref[1] - ref[2]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("block", [1, 7, 1000, 10_000])
def test_select_magnitude_streamed_equals_the_whole_selection(dtype, block):
    gen = torch.Generator().manual_seed(11)
    n = 3001
    mag = (torch.randn(n, generator=gen) * (torch.rand(n, generator=gen) < 0.5)).abs().to(dtype)
    blocks = lambda: (mag[s:s + block] for s in range(0, n, block))  # noqa: E731
    for r in (1, 1000, 1500, 1501, 2999, n):
        v, below, equal = _sparsify.select_magnitude_streamed(blocks, r)
        assert (float(v), below, equal) == _select_reference(mag, r)
    with pytest.raises(ValueError, match="outside 1..3001"):
        _sparsify.select_magnitude_streamed(blocks, n + 1)


def test_select_magnitude_refuses_a_rank_outside_the_tensor():
    with pytest.raises(ValueError, match="r=0 outside 1..3"):
        _sparsify.select_magnitude(torch.ones(3), 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("density", [0.3, 0.5, 0.7])
def test_trim_at_a_block_of_zeros_keeps_exactly_k_in_stable_order(dtype, density):
    """Half the entries are exactly zero, so k lands in (or at the edge of) the tie block:
    the mask is a stable descending argsort's first k, exactly k entries."""
    gen = torch.Generator().manual_seed(3)
    n = 4096
    x = (torch.randn(n, generator=gen) * (torch.rand(n, generator=gen) < 0.5)).to(dtype)
    k = int(density * n)
    mask = _sparsify.topk_mask(x, k)
    reference = torch.zeros(n, dtype=torch.bool)
    reference[torch.argsort(x.float().abs(), descending=True, stable=True)[:k]] = True
    assert int(mask.sum()) == k and torch.equal(mask, reference)


def test_breadcrumbs_window_with_ties_at_both_ends_is_a_stable_sort_slice():
    x = torch.tensor([0.0, 2.0, 0.0, 1.0, 2.0, 0.0, 1.0, 2.0, 0.0, 1.0])
    order = torch.argsort(x.abs(), stable=True)
    for start, end in [(2, 8), (1, 5), (4, 9), (0, 10), (3, 3)]:
        mask = _sparsify._rank_window(x.abs(), start, end)
        reference = torch.zeros(10, dtype=torch.bool)
        reference[order[start:end]] = True
        assert torch.equal(mask, reference), (start, end)


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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("consensus,normalize", [("sum", True), ("sum", False), ("count", True), ("count", False)])
@pytest.mark.parametrize("weights", [[0.5, 0.5, 0.5], [1.0, -0.5, 0.25], [0.3, 0.0, 1e-30]])
def test_bit_pattern_block_loop_equals_plain_tensor_operations_bit_for_bit(monkeypatch, dtype, consensus,
                                                                           normalize, weights):
    """`_merge_block` selects with integer and/xor on the floats' bit patterns; it must give the
    bits `_merge_block_generic` (torch.where, boolean masks) gives, on task vectors full of ties:
    a third exactly zero, values on a coarse grid, a constant run, across many small blocks."""
    import weightspace.merges.generalized_ta as gta

    monkeypatch.setattr(gta, "CHUNK", 97)
    monkeypatch.setattr(gta, "SELECT_BLOCK", 61)
    g = torch.Generator().manual_seed(5)
    n = 2000
    base = torch.randn(n, generator=g).to(dtype)
    xs = []
    for _ in range(3):
        d = (torch.randn(n, generator=g) * 8).round() / 64  # few distinct magnitudes: ties
        d[torch.rand(n, generator=g) < 0.33] = 0
        d[500:700] = 0.125
        xs.append((base.double() + d.double()).to(dtype))
    bits = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16,
            torch.float64: torch.int64}[dtype]
    dens = [0.3, 0.5, 0.9]
    outs = []
    for block in (gta._merge_block, gta._merge_block_generic):
        st = gta._trim_whole(base, xs, dens)
        out = torch.empty_like(base)
        block(st, base, xs, weights, consensus, normalize, 0.7, out)
        assert all(t == 0 for t in st.tied_to_keep)  # every tie the threshold keeps was placed
        outs.append(out.view(bits))
    assert torch.equal(outs[0], outs[1])
