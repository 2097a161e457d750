"""Learngene fitting: least-squares TLEG (theta_l = A + x_l B) and SWS stage means, stages, errors."""

from __future__ import annotations

import pytest
import torch

from tests.learngene_models import SUFFIXES, _model, _random_stack, _zoo_config
from weightspace.errors import InputError, SpecError
from weightspace.ir import WeightSpace
from weightspace.merges.learngene import expand, fit_gene, layer_position, parse_stages, stage_sizes

# ---------------------------------------------------------------------------------------------
# fitting


@pytest.mark.parametrize("denominator", ["L", "L-1"])
def test_fit_recovers_an_exact_linear_stack(denominator):
    L = 5
    g = torch.Generator().manual_seed(1)
    A = {s: torch.randn(shape, generator=g, dtype=torch.float64) for s, shape in SUFFIXES.items()}
    B = {s: torch.randn(shape, generator=g, dtype=torch.float64) for s, shape in SUFFIXES.items()}
    x = [i / (L if denominator == "L" else L - 1) for i in range(L)]
    model = _model({s: [A[s] + x[i] * B[s] for i in range(L)] for s in SUFFIXES}, _zoo_config(L))
    gene = fit_gene(model, denominator=denominator)
    for s in SUFFIXES:
        torch.testing.assert_close(gene.space[f"gene.A.{s}"].load(), A[s], atol=1e-12, rtol=0)
        torch.testing.assert_close(gene.space[f"gene.B.{s}"].load(), B[s], atol=1e-12, rtol=0)
    rep = gene.meta["report"]
    assert rep["relative_residual"] < 1e-13 and max(rep["per_layer"]) < 1e-13
    assert gene.meta["source_depth"] == L and gene.meta["prefix"] == "blocks"
    assert gene.meta["non_layer"] == ["stem.weight", "head.weight"] and gene.meta["denominator"] == denominator
    assert torch.equal(gene.space["stem.weight"].load(), model["stem.weight"].load())


def test_fit_residual_is_the_least_squares_residual():
    L = 6
    stack = _random_stack(L, seed=3)
    gene = fit_gene(_model(stack))
    x = torch.tensor([i / L for i in range(L)], dtype=torch.float64)
    X = torch.stack([torch.ones(L, dtype=torch.float64), x], 1)          # (L, 2)
    rows = {r["suffix"]: r for r in gene.meta["report"]["suffixes"]}
    total_res, total = 0.0, 0.0
    for s in SUFFIXES:
        Y = torch.stack([t.reshape(-1) for t in stack[s]])                # (L, numel)
        sol = torch.linalg.lstsq(X, Y).solution                           # (2, numel)
        shape = SUFFIXES[s]
        torch.testing.assert_close(gene.space[f"gene.A.{s}"].load(torch.float64), sol[0].reshape(shape),
                                   atol=1e-6, rtol=1e-6)  # stored float32
        torch.testing.assert_close(gene.space[f"gene.B.{s}"].load(torch.float64), sol[1].reshape(shape),
                                   atol=1e-6, rtol=1e-6)
        res = Y - X @ sol
        assert rows[s]["relative_residual"] == pytest.approx(float(res.norm() / Y.norm()), rel=1e-9)
        assert rows[s]["per_layer"] == pytest.approx((res.norm(dim=1) / Y.norm(dim=1)).tolist(), rel=1e-9)
        assert rows[s]["norms"] == pytest.approx(Y.norm(dim=1).tolist())
        total_res += float(res.square().sum())
        total += float(Y.square().sum())
    assert gene.meta["report"]["relative_residual"] == pytest.approx((total_res / total) ** 0.5, rel=1e-9)


def test_sws_fit_is_the_mean_of_each_stage():
    L = 6
    stack = _random_stack(L, seed=4)
    gene = fit_gene(_model(stack), mode="sws", stages=[1, 4, 1])
    assert gene.meta["stages"] == [1, 4, 1] and gene.num_stages == 3
    for s in SUFFIXES:
        t = stack[s]
        want = [t[0], (t[1] + t[2] + t[3] + t[4]) / 4, t[5]]
        for k in range(3):
            torch.testing.assert_close(gene.space[f"gene.stage{k}.{s}"].load(torch.float64), want[k])
    rows = {r["suffix"]: r for r in gene.meta["report"]["suffixes"]}
    assert rows["fc1.bias"]["per_layer"][0] == 0.0 and rows["fc1.bias"]["per_layer"][5] == 0.0
    # a count splits evenly, earlier stages first; the default is 3 stages
    assert fit_gene(_model(_random_stack(7)), mode="sws", stages=3).meta["stages"] == [3, 2, 2]
    assert fit_gene(_model(_random_stack(7)), mode="sws").meta["stages"] == [3, 2, 2]


@pytest.mark.parametrize("depth, stages, want", [
    (7, 3, [3, 2, 2]), (12, 3, [4, 4, 4]), (8, 3, [3, 3, 2]), (5, 1, [5]), (3, 3, [1, 1, 1]),
    (7, [2, 3, 2], [2, 3, 2]), (3, [1, 0, 2], [1, 0, 2]),
    # fewer layers than stages: first and last kept, the ones between skipped evenly
    (2, 3, [1, 0, 1]), (1, 3, [1, 0, 0]), (3, 5, [1, 0, 1, 0, 1]), (2, 4, [1, 0, 0, 1]),
])
def test_stage_sizes(depth, stages, want):
    assert stage_sizes(depth, stages) == want


@pytest.mark.parametrize("depth, stages, match", [
    (6, [2, 2, 3], "add up to 7 layers, but the network has 6"),
    (4, 0, "stage count must be >= 1"),
    (4, [2, -1, 3], "whole layer counts"),
    (0, 2, "depth must be a whole number >= 1"),
])
def test_stage_sizes_errors(depth, stages, match):
    with pytest.raises(SpecError, match=match):
        stage_sizes(depth, stages)


def test_parse_stages_and_positions():
    assert parse_stages("3") == 3 and parse_stages("2,3,2") == [2, 3, 2] and parse_stages(None) is None
    with pytest.raises(SpecError, match="--stages"):
        parse_stages("2,x")
    assert [layer_position(i, 4) for i in range(4)] == [0.0, 0.25, 0.5, 0.75]
    assert [layer_position(i, 3, "L-1") for i in range(3)] == [0.0, 0.5, 1.0]
    assert layer_position(0, 1, "L-1") == 0.0


# ---------------------------------------------------------------------------------------------
# errors


def test_errors():
    flat = WeightSpace.from_tensors({"w": torch.zeros(2, 2), "b": torch.zeros(2)}, {"source": "flat"})
    with pytest.raises(InputError, match="flat has no layer stack the structure rules can read"):
        fit_gene(flat)
    with pytest.raises(InputError, match="needs at least two layers"):
        fit_gene(_model(_random_stack(1)))
    with pytest.raises(SpecError, match="add up to 6 layers, but the network has 5"):
        fit_gene(_model(_random_stack(5)), mode="sws", stages=[2, 2, 2])
    with pytest.raises(SpecError, match="denominator must be 'L'"):
        fit_gene(_model(_random_stack(3)), denominator="L+1")
    with pytest.raises(SpecError, match="mode: unknown 'lego'"):
        fit_gene(_model(_random_stack(3)), mode="lego")
    with pytest.raises(SpecError, match="stages apply to sws genes"):
        fit_gene(_model(_random_stack(3)), stages=[1, 2])
    for stages in ([3, 0], 4):
        with pytest.raises(SpecError, match="every stage needs at least one of the 3 layers"):
            fit_gene(_model(_random_stack(3)), mode="sws", stages=stages)
    uneven = _random_stack(3)
    uneven["fc1.weight"][2] = torch.zeros(7, 4, dtype=torch.float64)
    with pytest.raises(InputError, match=r"blocks.2.fc1.weight has shape \[7, 4\], but \[6, 4\] in layer 0"):
        fit_gene(_model(uneven))
    two = WeightSpace.from_tensors({"encoder.layers.0.w": torch.zeros(2), "decoder.layers.0.w": torch.zeros(2)})
    with pytest.raises(InputError, match="has 2 layer stacks"):
        fit_gene(two)
    gene = fit_gene(_model(_random_stack(3)))
    with pytest.raises(SpecError, match="depth must be a whole number >= 1, got 0"):
        expand(gene, 0)
    with pytest.raises(SpecError, match="stages apply to sws genes"):
        expand(gene, 4, stages=[2, 2])
