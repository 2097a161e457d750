"""Robust weight signatures: bit packing and quantization."""

from __future__ import annotations

import math

import pytest
import torch

import weightspace.merges.signatures.quantize as rws_quantize
from weightspace.errors import InputError
from weightspace.merges.signatures import (
    dequantize_tensor,
    pack_bits,
    packed_size,
    quantize_tensor,
    unpack_bits,
)

# ---------------------------------------------------------------------------------------------
# packing


def test_pack_bits_golden():
    assert pack_bits(torch.tensor([1, 2, 3]), 2).tolist() == [0b00111001]
    assert pack_bits(torch.tensor([5, 3]), 3).tolist() == [0b00011101]  # 5 | 3 << 3
    assert pack_bits(torch.tensor([255, 1]), 8).tolist() == [255, 1]


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("n", [0, 1, 3, 7, 9, 13, 61])
def test_pack_round_trip_odd_sizes(bits, n, monkeypatch):
    monkeypatch.setattr(rws_quantize, "_CHUNK", 16)  # several chunks, and a partial last one
    g = torch.Generator().manual_seed(bits * 100 + n)
    codes = torch.randint(0, 1 << bits, (n,), generator=g)
    packed = pack_bits(codes, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == packed_size(n, bits) == math.ceil(n * bits / 8)
    assert torch.equal(unpack_bits(packed, bits, n), codes)


def test_unpack_refuses_a_wrong_length():
    with pytest.raises(InputError, match="expected 2 uint8 bytes"):
        unpack_bits(torch.zeros(3, dtype=torch.uint8), 2, 5)


# ---------------------------------------------------------------------------------------------
# quantization


def _heavy(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * torch.exp(torch.randn(shape, generator=g))
    x.view(-1)[::7] = 0.0  # exact zeros (entries a fine-tune did not move)
    return x


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("granularity", ["tensor", "row"])
def test_uniform_quantization_error_is_at_most_half_a_step(bits, granularity):
    x = _heavy((6, 11), seed=bits)
    x[2] += 3.0  # a row that is all positive: the range still includes 0
    parts = quantize_tensor(x, bits, "uniform", granularity)
    groups = 6 if granularity == "row" else 1
    assert parts["scale"].shape == (groups,) and parts["zero"].dtype == torch.uint8
    assert parts["q"].numel() == packed_size(x.numel(), bits)
    y = dequantize_tensor(parts, x.shape, bits, "uniform")
    half = (parts["scale"] / 2).reshape(-1, 1) if groups > 1 else parts["scale"] / 2
    err = (y - x).reshape(groups, -1).abs()
    assert bool((err <= half * (1 + 1e-4) + 1e-7).all())
    assert bool((y[x == 0] == 0).all()) and int((x == 0).sum()) >= 5  # zeros stay exact


def test_row_granularity_is_tighter_and_vectors_use_one_group():
    x = torch.stack([torch.linspace(-1, 1, 32) * s for s in (0.01, 1.0, 100.0)])
    err = {g: (dequantize_tensor(quantize_tensor(x, 4, "uniform", g), x.shape, 4) - x).abs()[0].max()
           for g in ("tensor", "row")}
    assert err["row"] < err["tensor"] / 10
    assert quantize_tensor(torch.randn(5), 4, "uniform", "row")["scale"].shape == (1,)


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("granularity", ["tensor", "row"])
def test_log_quantization_error_is_at_most_half_a_step_in_log_space(bits, granularity):
    x = _heavy((5, 13), seed=10 + bits)
    parts = quantize_tensor(x, bits, "log", granularity)
    y = dequantize_tensor(parts, x.shape, bits, "log")
    nz = x != 0
    assert bool((y[~nz] == 0).all()) and bool((torch.sign(y[nz]) == torch.sign(x[nz])).all())
    step = parts["log2_step"].reshape(-1, 1) if granularity == "row" else parts["log2_step"]
    err = (torch.log2(y.abs().double()) - torch.log2(x.abs().double())).reshape(step.shape[0], -1)
    err = torch.where(nz.reshape(err.shape), err.abs(), torch.zeros_like(err))
    assert bool((err <= step.double() / 2 + 1e-5).all())
    # the grid covers [min |x|, max |x|] of the nonzero entries in n = 2^(b-1) - 1 bins
    mag = x.abs()[nz]
    if granularity == "tensor":
        n = (1 << (bits - 1)) - 1
        expect = (math.log2(float(mag.max())) - math.log2(float(mag.min()))) / n
        assert float(parts["log2_step"]) == pytest.approx(expect, rel=1e-5)


def _authors_linear_quant(x: torch.Tensor, n_nums: int) -> torch.Tensor:
    """quantize_utils/func.py `linear_quant(x, n_nums, min(x), max(x), clamp=False)` of the authors'
    code (VITA-Group/Robust_Weight_Signatures), written out: scale = n_nums - 1,
    x' = (x - min) / (max - min), round(x' * scale) / scale * (max - min) + min."""
    lo, hi = float(x.min()), float(x.max())
    scale = n_nums - 1
    y = (x - lo) / (hi - lo)
    return torch.round(y * scale) / scale * (hi - lo) + lo


@pytest.mark.parametrize("bits", range(2, 9))
def test_minmax_is_the_authors_linear_quantization(bits):
    """scheme="minmax" at b bits gives what the authors' decompose gives with
    --quantization 2^b --quantization_type linear (to float32 rounding)."""
    x = _heavy((7, 9), seed=30 + bits).double()
    parts = quantize_tensor(x, bits, "minmax")
    assert set(parts) == {"q", "min", "step"} and parts["q"].numel() == packed_size(x.numel(), bits)
    got = dequantize_tensor(parts, x.shape, bits, "minmax").double()
    want = _authors_linear_quant(x, 1 << bits)
    step = (float(x.max()) - float(x.min())) / ((1 << bits) - 1)
    # equal codes: a value can only differ by float32 rounding of min and step, far below a step
    assert float((got - want).abs().max()) < 1e-5 * step + 1e-6
    assert float(got.min()) == pytest.approx(float(x.min()), rel=1e-6)   # both ends are levels
    assert float(got.max()) == pytest.approx(float(x.max()), rel=1e-5)
    if bits <= 3:  # 0 is not a level of this grid in general (uniform keeps it exact)
        assert not bool((got[x == 0] == 0).all())
    rows = quantize_tensor(x, bits, "minmax", "row")
    assert rows["min"].shape == (7,)
    y = dequantize_tensor(rows, x.shape, bits, "minmax").double()
    assert bool(((y - x).abs() <= rows["step"].double().reshape(-1, 1) / 2 + 1e-6).all())


@pytest.mark.parametrize("scheme", ["uniform", "log", "minmax"])
def test_constant_zero_and_empty_tensors_survive(scheme):
    for x in (torch.zeros(3, 4), torch.full((4,), -0.25), torch.zeros(0, 3)):
        parts = quantize_tensor(x, 3, scheme, "row")
        assert torch.equal(dequantize_tensor(parts, x.shape, 3, scheme), x)
