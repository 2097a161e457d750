"""Compression of signature tensors: 2..8-bit codes packed into uint8 bit streams.

    parts = quantize_tensor(rws, 4, scheme="log", granularity="row")
    approx = dequantize_tensor(parts, rws.shape, 4, scheme="log")

`scheme="uniform"` is affine quantization, x ~ (q - zero) * scale, per tensor or per row;
`scheme="log"` keeps the sign and quantizes log2|x| uniformly; `scheme="minmax"` is the
authors' linear quantization, 2^bits levels from min x to max x (see `quantize_tensor`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from weightspace.errors import InputError, SpecError, WeightspaceError

SCHEMES = ("uniform", "log", "minmax")
GRANULARITIES = ("tensor", "row")
# values per packing chunk: a multiple of 8, so every chunk starts on a byte boundary
_CHUNK = 1 << 18


def _check_bits(bits: Any) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
        raise SpecError(f"bits must be between 2 and 8, got {bits!r}")
    return bits


# ---------------------------------------------------------------------------------------------
# bit packing


def packed_size(n: int, bits: int) -> int:
    """Bytes holding `n` codes of `bits` bits each."""
    return (n * bits + 7) // 8


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes in [0, 2**bits) into a uint8 bit stream, least significant bit first.

        pack_bits(torch.tensor([1, 2, 3]), 2)   # tensor([57], dtype=torch.uint8): 1 | 2<<2 | 3<<4

    Code i occupies bits i*bits .. (i+1)*bits - 1 of the stream; the last byte is zero-padded.
    """
    _check_bits(bits)
    flat = codes.reshape(-1).to(torch.int32)
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= 1 << bits):
        raise WeightspaceError(f"internal: codes outside [0, {1 << bits}) for {bits}-bit packing")
    out = torch.empty(packed_size(flat.numel(), bits), dtype=torch.uint8)
    shifts = torch.arange(bits, dtype=torch.int32)
    weights = (1 << torch.arange(8, dtype=torch.int32))
    pos = 0
    for start in range(0, flat.numel(), _CHUNK):
        c = flat[start:start + _CHUNK]
        stream = ((c.unsqueeze(1) >> shifts) & 1).reshape(-1)
        pad = -stream.numel() % 8
        if pad:
            stream = torch.cat([stream, stream.new_zeros(pad)])
        by = (stream.reshape(-1, 8) * weights).sum(1).to(torch.uint8)
        out[pos:pos + by.numel()] = by
        pos += by.numel()
    return out


def unpack_bits(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """The `n` codes (int64) that `pack_bits(codes, bits)` packed into `packed`."""
    _check_bits(bits)
    if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != packed_size(n, bits):
        raise InputError(f"packed codes: expected {packed_size(n, bits)} uint8 bytes for {n} "
                         f"{bits}-bit values, got {packed.dtype} {list(packed.shape)}")
    out = torch.empty(n, dtype=torch.int64)
    shifts8 = torch.arange(8, dtype=torch.uint8)
    weights = (1 << torch.arange(bits, dtype=torch.int64))
    for start in range(0, n, _CHUNK):
        m = min(_CHUNK, n - start)
        b0 = start * bits // 8
        by = packed[b0:b0 + packed_size(m, bits)]
        stream = ((by.unsqueeze(1) >> shifts8) & 1).reshape(-1)[: m * bits]
        out[start:start + m] = (stream.reshape(m, bits).to(torch.int64) * weights).sum(1)
    return out


# ---------------------------------------------------------------------------------------------
# quantization


def _groups(shape: Sequence[int], granularity: str) -> int:
    """Quantization groups: 1 per tensor, or one per row (dim 0) for tensors of 2+ dims.
    Vectors and scalars always use one group (a scale per entry would cost more than it saves)."""
    if granularity == "row" and len(shape) >= 2 and shape[0] > 0:
        return int(shape[0])
    return 1


def quantize_tensor(x: torch.Tensor, bits: int, scheme: str = "uniform",
                    granularity: str = "tensor") -> dict[str, torch.Tensor]:
    """Quantize `x` to `bits` bits per value; the parts `save_signature` stores.

        parts = quantize_tensor(rws, 4)                     # {"q", "scale", "zero"}
        approx = dequantize_tensor(parts, rws.shape, 4)     # |approx - rws| <= scale / 2

    uniform: affine, x ~ (q - zero) * scale with q in 0..2^b-1, scale = (hi - lo) / (2^b - 1)
    over [lo, hi] = [min(min x, 0), max(max x, 0)] and an integer zero point (0 is exact,
    so unchanged weights stay unchanged); the error is at most scale / 2. Parts: q (packed
    uint8), scale (float32, one per group), zero (uint8, one per group).

    log: the top bit is the sign; the other b-1 bits hold k in 0..n, n = 2^(b-1) - 1.
    k = 0 is an exact zero; k >= 1 stands for |x| = 2^(log2_min + (k - 1/2) * log2_step),
    the midpoints of n equal bins of log2|x| over [log2 min|x|, log2 max|x|] (nonzero
    entries), so |log2|x_hat| - log2|x|| <= log2_step / 2: a bounded relative error, which
    suits the heavy-tailed entries of weight differences. Parts: q, log2_min, log2_step
    (float32, one per group).

    minmax: the authors' linear quantization (VITA-Group/Robust_Weight_Signatures,
    quantize_utils/func.py `linear_quant`, as model_patching.py `decompose` calls it with
    `--quantization_type linear`): x ~ min + q * step, q in 0..2^b-1, step = (max - min) /
    (2^b - 1) over [min x, max x], so both ends are exact and 0 in general is not; the
    error is at most step / 2. Their `--quantization Q` counts levels, so it is bits =
    log2 Q here. (They take min and max over the signatures of one call stacked, after
    scaling by alpha / n; a signature file stands alone, so here they are its own. Scaling
    commutes with this grid, so one signature comes out the same.) Parts: q, min, step
    (float32, one per group).

    Groups: the whole tensor (granularity "tensor") or each row along dim 0 ("row", for
    tensors with two or more dims).
    """
    _check_bits(bits)
    _check_scheme(scheme, granularity)
    g = _groups(tuple(x.shape), granularity)
    v = x.detach().to("cpu", torch.float64).reshape(g, -1)
    if v.numel() == 0:
        v = v.new_zeros(g, 0)
    if scheme == "uniform":
        return _quantize_uniform(v, bits)
    return _quantize_log(v, bits) if scheme == "log" else _quantize_minmax(v, bits)


def _check_scheme(scheme: Any, granularity: Any) -> None:
    if scheme not in SCHEMES:
        raise SpecError(f"scheme must be one of {', '.join(SCHEMES)}, got {scheme!r}")
    if granularity not in GRANULARITIES:
        raise SpecError(f"granularity must be one of {', '.join(GRANULARITIES)}, got {granularity!r}")


def _quantize_uniform(v: torch.Tensor, bits: int) -> dict[str, torch.Tensor]:
    """Affine codes for `v` (float64, one group per row): q, scale and zero per group."""
    g = v.shape[0]
    top = (1 << bits) - 1
    lo = (v.amin(1) if v.shape[1] else v.new_zeros(g)).clamp(max=0.0)
    hi = (v.amax(1) if v.shape[1] else v.new_zeros(g)).clamp(min=0.0)
    scale = ((hi - lo) / top).to(torch.float32)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero group
    s = scale.to(torch.float64).unsqueeze(1)
    zero = torch.round(-lo / scale.to(torch.float64)).clamp(0, top)
    q = (torch.round(v / s) + zero.unsqueeze(1)).clamp(0, top)
    return {"q": pack_bits(q.to(torch.int32), bits), "scale": scale,
            "zero": zero.to(torch.uint8)}


def _quantize_minmax(v: torch.Tensor, bits: int) -> dict[str, torch.Tensor]:
    """The authors' linear_quant codes for `v` (float64, one group per row): q, min and step."""
    g = v.shape[0]
    top = (1 << bits) - 1
    lo = (v.amin(1) if v.shape[1] else v.new_zeros(g)).to(torch.float32)
    hi = v.amax(1) if v.shape[1] else v.new_zeros(g)
    step = ((hi - lo.to(torch.float64)) / top).to(torch.float32)
    st = step.to(torch.float64).unsqueeze(1)
    pos = (v - lo.to(torch.float64).unsqueeze(1)) / torch.where(st > 0, st, torch.ones_like(st))
    q = torch.where(st > 0, torch.round(pos), torch.zeros_like(pos)).clamp(0, top)  # a constant group: q = 0
    return {"q": pack_bits(q.to(torch.int32), bits), "min": lo, "step": step}


def _quantize_log(v: torch.Tensor, bits: int) -> dict[str, torch.Tensor]:
    """Sign + log2|x| codes for `v` (float64, one group per row): q, log2_min and log2_step."""
    g = v.shape[0]
    n = (1 << (bits - 1)) - 1
    mag = v.abs()
    nz = mag > 0
    logm = torch.log2(torch.where(nz, mag, torch.ones_like(mag)))
    inf = torch.tensor(math.inf, dtype=torch.float64)
    lo = torch.where(nz, logm, inf).amin(1) if v.shape[1] else v.new_zeros(g)
    hi = torch.where(nz, logm, -inf).amax(1) if v.shape[1] else v.new_zeros(g)
    empty = ~torch.isfinite(lo)  # a group with no nonzero entry
    lo = torch.where(empty, torch.zeros_like(lo), lo).to(torch.float32)
    hi = torch.where(empty, torch.zeros_like(hi), hi)
    step = ((hi - lo.to(torch.float64)) / n).clamp(min=0).to(torch.float32)
    st = step.to(torch.float64).unsqueeze(1)
    pos = (logm - lo.to(torch.float64).unsqueeze(1)) / torch.where(st > 0, st, torch.ones_like(st))
    k = torch.where(st > 0, torch.floor(pos) + 1, torch.ones_like(pos)).clamp(1, n)
    k = torch.where(nz, k, torch.zeros_like(k))
    code = k + (v < 0).to(torch.float64) * (1 << (bits - 1))
    return {"q": pack_bits(code.to(torch.int32), bits), "log2_min": lo, "log2_step": step}


def _part_names(scheme: str) -> tuple[str, str]:
    return {"uniform": ("scale", "zero"), "log": ("log2_min", "log2_step"), "minmax": ("min", "step")}[scheme]


def dequantize_tensor(parts: Mapping[str, torch.Tensor], shape: Sequence[int], bits: int,
                      scheme: str = "uniform") -> torch.Tensor:
    """The float32 tensor that `quantize_tensor` parts stand for (deterministic, on CPU)."""
    shape = tuple(int(s) for s in shape)
    numel = math.prod(shape)
    a, b = _part_names(scheme)
    pa, pb = parts[a].reshape(-1), parts[b].reshape(-1)
    g = pa.numel()
    if g < 1 or pb.numel() != g or (numel and numel % g):
        raise InputError(f"quantization parameters: {g} groups do not divide a tensor of shape {list(shape)}")
    codes = unpack_bits(parts["q"], bits, numel).reshape(g, -1)
    if scheme == "uniform":
        return _dequantize_uniform(codes, pa, pb).reshape(shape)
    if scheme == "minmax":
        return _dequantize_minmax(codes, pa, pb).reshape(shape)
    return _dequantize_log(codes, pa, pb, bits).reshape(shape)


def _dequantize_uniform(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    return (codes - zero.to(torch.int64).unsqueeze(1)).to(torch.float32) * scale.to(torch.float32).unsqueeze(1)


def _dequantize_minmax(codes: torch.Tensor, lo: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    return (lo.to(torch.float64).unsqueeze(1) + codes.to(torch.float64) * step.to(torch.float64).unsqueeze(1)
            ).to(torch.float32)


def _dequantize_log(codes: torch.Tensor, log2_min: torch.Tensor, log2_step: torch.Tensor,
                    bits: int) -> torch.Tensor:
    half = 1 << (bits - 1)
    k = (codes % half).to(torch.float64)
    neg = codes >= half
    lo = log2_min.to(torch.float64).unsqueeze(1)
    step = log2_step.to(torch.float64).unsqueeze(1)
    mag = torch.where(k > 0, torch.exp2(lo + (k - 0.5) * step), torch.zeros_like(k))
    return torch.where(neg, -mag, mag).to(torch.float32)
