"""Robust weight signatures: robustness as a patch you add to a model's weights and take off again.

    report = layer_report(pre, clean, robust)               # where the robust fine-tune moved
    sig = extract_signature(pre, clean, robust, layers="auto", bits=4)
    save_signature(sig, "noise.rws.safetensors")
    patched = patch(clean, [("noise.rws.safetensors", 1.0), ("blur.rws.safetensors", 0.5)])
    save_patched(patched, "clean+noise+blur")                # records what was added
    restored = unpatch(load_space("clean+noise+blur"), [("noise.rws.safetensors", 1.0),
                                                         ("blur.rws.safetensors", 0.5)])

With theta_pre the shared starting point, theta_std fine-tuned on clean data and theta_c
fine-tuned on corruption c, for every kept tensor l (flattened):

    d_c = theta_c(l) - theta_pre(l)          d_s = theta_std(l) - theta_pre(l)
    RWS_c(l) = d_c - (<d_c, d_s> / <d_s, d_s>) d_s          (RWS_c(l) = d_c when d_s = 0)

the part of the robust change orthogonal to the clean change. Patching computes
theta(l) + sum_c alpha_c RWS_c(l) on the tensors a signature keeps (every other tensor
passes through); unpatching subtracts the same terms. Each alpha is applied exactly
once. (The authors' script scales each delta by its coefficient before projecting and
scales the projected signatures again when it sums them, so a combination applies
alpha_c squared; a regression test pins the single application here.)

Layer selection (`select_layers`): robust changes concentrate in the shallow layers, so
a signature keeps only those. Specs: "all"; "first:K" (the first K layers of the main
stack plus the tensors before the stack: embeddings, stem); a glob or `re:REGEX` on
tensor names; "auto" (the shallowest whole layers holding at least `share` of the total
squared RWS norm).

Compression: `bits` in 2..8 packs codes into uint8 bit streams. `scheme="uniform"` is
affine quantization, x ~ (q - zero) * scale, per tensor or per row; `scheme="log"` keeps
the sign and quantizes log2|x| uniformly (see `quantize_tensor`).

File: one safetensors file (see `save_signature`). Patch records live in the patched
checkpoint's safetensors `__metadata__` under "weightspace.rws", so `unpatch` can refuse
to remove what was never added.

Cai, Zhang & Wang 2023, "Robust Weight Signatures: Gaining Robustness as Easy as Patching
Weights?" (ICML 2023, arXiv:2302.12480).
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import math
import os
import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from weightspace.errors import InputError, NonFiniteError, SpecError, WeightspaceError
from weightspace.files import save_safetensors_atomic
from weightspace.ir import ExprRef, MemoryRef, TensorRef, WeightSpace
from weightspace.safetensors_io import Entry, read_header, read_tensor
from weightspace.structure import depth_t, is_pre_stack, parse_layer, structure_of

FORMAT = "weightspace-rws"
FORMAT_VERSION = 1
RECORD_KEY = "weightspace.rws"  # safetensors __metadata__ key of a patched checkpoint
SCHEMES = ("uniform", "log")
GRANULARITIES = ("tensor", "row")

# values per packing chunk: a multiple of 8, so every chunk starts on a byte boundary
_CHUNK = 1 << 18


# ---------------------------------------------------------------------------------------------
# the signature itself


def robust_weight_signature(d_robust: torch.Tensor, d_clean: torch.Tensor) -> torch.Tensor:
    """RWS = d_robust - (<d_robust, d_clean> / <d_clean, d_clean>) d_clean, over flattened tensors.

        robust_weight_signature(theta_c - theta_pre, theta_std - theta_pre)

    Inner products in float64; the result is float32 and orthogonal to `d_clean`.
    A zero `d_clean` leaves `d_robust` unchanged.
    """
    dc = d_robust.detach().to(torch.float64)
    ds = d_clean.detach().to(torch.float64)
    ss = float(torch.dot(ds.reshape(-1), ds.reshape(-1)))
    if ss == 0.0:
        return dc.to(torch.float32)
    coef = float(torch.dot(dc.reshape(-1), ds.reshape(-1))) / ss
    return (dc - coef * ds).to(torch.float32)


# ---------------------------------------------------------------------------------------------
# where a tensor sits in depth


def _layout(names: Sequence[str]) -> dict[str, dict[str, Any]]:
    """name -> {layer, stack, depth, position}. `position` counts in layers of the main
    stack: -1 before the stack, i for layer i, num_layers after it (head, final norm);
    a layer of another stack is placed at the same relative depth."""
    st = structure_of(names)
    n, main = st.num_layers, st.main_prefix
    out: dict[str, dict[str, Any]] = {}
    for name in names:
        ln = parse_layer(name)
        if ln is None:
            pre = is_pre_stack(name)
            out[name] = {"layer": None, "stack": None, "depth": 0.0 if pre else 1.0,
                         "position": -1.0 if pre else float(n)}
            continue
        m = st.stacks[ln.prefix]
        if ln.prefix == main:
            pos = float(ln.index)
        else:
            pos = ln.index * (n - 1) / (m - 1) if m > 1 else 0.0
        out[name] = {"layer": ln.index, "stack": ln.prefix, "depth": depth_t(name, st),
                     "position": pos}
    return out


def _unit_label(position: float, num_layers: int) -> str:
    if position < 0:
        return "pre"
    if position >= num_layers:
        return "post"
    return f"layer {position:g}"


# ---------------------------------------------------------------------------------------------
# inputs


def _space(x: WeightSpace | str | Path) -> WeightSpace:
    if isinstance(x, WeightSpace):
        return x
    from weightspace.sources import load_space

    return load_space(x)


def _where(space: WeightSpace) -> str:
    return str(space.meta.get("location") or space.source)


def _check_compatible(spaces: Mapping[str, WeightSpace]) -> None:
    """Same names, shapes and dtypes in every space; errors name the tensor and the models."""
    (ref_role, ref), *others = spaces.items()
    for role, sp in others:
        for name in ref:
            if name not in sp:
                raise InputError(f"tensor {name!r} is in the {ref_role} model ({_where(ref)}) but not "
                                 f"in the {role} model ({_where(sp)})")
        for name in sp:
            if name not in ref:
                raise InputError(f"tensor {name!r} is in the {role} model ({_where(sp)}) but not "
                                 f"in the {ref_role} model ({_where(ref)})")
        for name, r in ref.items():
            o = sp[name]
            if r.shape != o.shape:
                raise InputError(f"tensor {name!r} has shape {list(r.shape)} in the {ref_role} model "
                                 f"({_where(ref)}) but {list(o.shape)} in the {role} model ({_where(sp)})")
            if r.dtype != o.dtype:
                raise InputError(f"tensor {name!r} is {_dt(r.dtype)} in the {ref_role} model "
                                 f"({_where(ref)}) but {_dt(o.dtype)} in the {role} model ({_where(sp)}); "
                                 f"convert both to one dtype first")


def _dt(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _num(x: float) -> float | None:
    """A JSON-safe number: None where the quantity is undefined (0/0) or infinite."""
    return float(x) if math.isfinite(x) else None


def _ratio(a: float, b: float) -> float | None:
    return _num(a / b) if b > 0 else (0.0 if a == 0 else None)


# ---------------------------------------------------------------------------------------------
# per-tensor report


def layer_report(pretrained: WeightSpace | str | Path, clean: WeightSpace | str | Path,
                 robust: WeightSpace | str | Path) -> list[dict[str, Any]]:
    """Where the robust fine-tune moved, one floating tensor at a time (three tensors in memory).

        for row in layer_report(pre, clean, robust):
            print(row["name"], row["rel_change_robust"], row["rws_share"])

    Each row: name, layer (index in its stack; None for non-layer tensors), stack, depth
    (0 before the stack .. 1 after it), position (in layers of the main stack: -1 before
    it, num_layers after it), numel, pre_norm = ||theta_pre||, robust_norm = ||d_c||,
    clean_norm = ||d_s||, rws_norm = ||RWS_c||, rel_change_robust = ||d_c|| / ||theta_pre||,
    rel_change_clean = ||d_s|| / ||theta_pre||, cos_robust_clean = cos(d_c, d_s), and
    rws_share = ||RWS_c|| / ||d_c|| (the share of the robust change orthogonal to the clean
    change). Undefined ratios (a zero norm below the line) are None.
    """
    pre, std, rob = _space(pretrained), _space(clean), _space(robust)
    _check_compatible({"pretrained": pre, "clean": std, "robust": rob})
    names = [n for n, r in pre.items() if r.dtype.is_floating_point]
    layout = _layout(list(pre))
    rows = []
    for name in names:
        p = pre[name].load("cpu", torch.float64)
        dc = rob[name].load("cpu", torch.float64) - p
        ds = std[name].load("cpu", torch.float64) - p
        rws = robust_weight_signature(dc, ds).to(torch.float64)
        pn, cn, sn, rn = (float(torch.linalg.vector_norm(t)) for t in (p, dc, ds, rws))
        dot = float(torch.dot(dc.reshape(-1), ds.reshape(-1)))
        del p, dc, ds, rws
        rows.append({
            "name": name, **layout[name], "numel": pre[name].numel,
            "pre_norm": pn, "robust_norm": cn, "clean_norm": sn, "rws_norm": rn,
            "rel_change_robust": _ratio(cn, pn), "rel_change_clean": _ratio(sn, pn),
            "cos_robust_clean": _num(dot / (cn * sn)) if cn > 0 and sn > 0 else None,
            "rws_share": _ratio(rn, cn),
        })
    return rows


def layer_summary(report: Sequence[Mapping[str, Any]], kept: Sequence[str] = ()) -> list[dict[str, Any]]:
    """`layer_report` rows aggregated per layer (tensors at the same depth position), shallow first.

    Each: label ("pre", "layer 0", ..., "post"), position, tensors, numel, rel_change_robust,
    rel_change_clean, cos_robust_clean, rws_norm, rws_share (||RWS|| / ||d_c|| over the
    layer), rws_fraction (the layer's share of the total squared RWS norm), kept ("all",
    "some" or "none" of its tensors in `kept`).
    """
    keep = set(kept)
    num_layers = max((int(r["position"]) for r in report if r.get("layer") is not None), default=-1) + 1
    units: dict[float, list[Mapping[str, Any]]] = {}
    for r in report:
        units.setdefault(float(r["position"]), []).append(r)
    total = sum(r["rws_norm"] ** 2 for r in report)
    out = []
    for pos in sorted(units):
        rows = units[pos]
        pre2 = sum(r["pre_norm"] ** 2 for r in rows)
        rob2 = sum(r["robust_norm"] ** 2 for r in rows)
        cln2 = sum(r["clean_norm"] ** 2 for r in rows)
        rws2 = sum(r["rws_norm"] ** 2 for r in rows)
        dot = sum((r["cos_robust_clean"] or 0.0) * r["robust_norm"] * r["clean_norm"] for r in rows)
        n_kept = sum(r["name"] in keep for r in rows)
        out.append({
            "label": _unit_label(pos, num_layers), "position": pos, "tensors": len(rows),
            "numel": sum(r["numel"] for r in rows),
            "rel_change_robust": _ratio(math.sqrt(rob2), math.sqrt(pre2)),
            "rel_change_clean": _ratio(math.sqrt(cln2), math.sqrt(pre2)),
            "cos_robust_clean": _num(dot / math.sqrt(rob2 * cln2)) if rob2 > 0 and cln2 > 0 else None,
            "rws_norm": math.sqrt(rws2), "rws_share": _ratio(math.sqrt(rws2), math.sqrt(rob2)),
            "rws_fraction": _ratio(rws2, total),
            "kept": "all" if n_kept == len(rows) else ("some" if n_kept else "none"),
        })
    return out


# ---------------------------------------------------------------------------------------------
# layer selection


def _layers_hint() -> str:
    return "use all, auto, first:K, a glob such as 'blocks.0.*' or re:REGEX"


def _parse_spec(spec: str) -> tuple[str, Any]:
    """("all"|"auto"|"first"|"glob"|"regex", argument); SpecError naming the spec when malformed."""
    if not isinstance(spec, str) or not spec.strip():
        raise SpecError(f"layers {spec!r}: empty layer selection; {_layers_hint()}")
    s = spec.strip()
    if s in ("all", "auto"):
        return s, None
    if s.startswith("first:"):
        k = s[len("first:"):].strip()
        if not k.isdigit() or int(k) < 1:
            raise SpecError(f"layers {spec!r}: K in first:K must be a whole number >= 1")
        return "first", int(k)
    if s.startswith("re:"):
        try:
            return "regex", re.compile(s[3:])
        except re.error as e:
            raise SpecError(f"layers {spec!r}: not a valid regular expression ({e})") from None
    return "glob", s


def select_layers(report: Sequence[Mapping[str, Any]], spec: str, share: float = 0.5) -> list[str]:
    """The tensor names a signature keeps, in report order.

        select_layers(report, "first:2")        # tensors before the stack + layers 0 and 1
        select_layers(report, "auto", share=0.5)
        select_layers(report, "blocks.0.*")     # glob on names; "re:^blocks\\.[01]\\." for a regex

    "all": every tensor. "first:K": every tensor whose depth position is before layer K
    of the main stack: the pre-stack non-layer tensors (embeddings, stem) and layers
    0..K-1 (a layer of a second stack counts at the same relative depth); K may not
    exceed the number of layers. A glob (fnmatch) or `re:REGEX` (searched) on names.
    "auto": walk the layers from shallow to deep, whole layers at a time (the pre-stack
    tensors first, the head and final norm last), and keep the shallowest ones whose
    squared RWS norms add up to at least `share` of the model's total; shares
    are of ||RWS||^2, so they add across tensors. Models without a recognised layer
    stack have only two depth groups (pre-stack, everything else): use a pattern there.
    """
    kind, arg = _parse_spec(spec)
    if isinstance(share, bool) or not (isinstance(share, (int, float)) and 0 < share <= 1):
        raise SpecError(f"share must be in (0, 1], got {share!r}")
    rows = list(report)
    if kind == "all":
        names = [r["name"] for r in rows]
    elif kind == "glob":
        names = [r["name"] for r in rows if fnmatch.fnmatchcase(r["name"], arg)]
    elif kind == "regex":
        names = [r["name"] for r in rows if arg.search(r["name"])]
    elif kind == "first":
        layers = {float(r["position"]) for r in rows if r.get("layer") is not None}
        if not layers:
            raise SpecError(f"layers {spec!r}: the model has no layer stack this project recognises "
                            f"(model.layers.N, blocks.N, h.N, ...); select tensors with a pattern")
        num_layers = int(max(layers)) + 1
        if arg > num_layers:
            raise SpecError(f"layers {spec!r}: the model has only {num_layers} layers")
        names = [r["name"] for r in rows if float(r["position"]) < arg]
    else:
        total = sum(r["rws_norm"] ** 2 for r in rows)
        if total <= 0:
            raise SpecError(f"layers {spec!r}: the robust weight signature is zero everywhere (the robust "
                            f"change is parallel to the clean change); there is nothing to keep")
        by_pos: dict[float, list[str]] = {}
        mass: dict[float, float] = {}
        for r in rows:
            p = float(r["position"])
            by_pos.setdefault(p, []).append(r["name"])
            mass[p] = mass.get(p, 0.0) + r["rws_norm"] ** 2
        chosen: set[str] = set()
        acc = 0.0
        for p in sorted(by_pos):
            chosen.update(by_pos[p])
            acc += mass[p]
            if acc >= share * total * (1 - 1e-12):
                break
        names = [r["name"] for r in rows if r["name"] in chosen]
    if not names:
        raise SpecError(f"layers {spec!r} selects no tensor; {_layers_hint()}")
    return names


# ---------------------------------------------------------------------------------------------
# bit packing and quantization


def _check_bits(bits: Any) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
        raise SpecError(f"bits must be between 2 and 8, got {bits!r}")
    return bits


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

    Groups: the whole tensor (granularity "tensor") or each row along dim 0 ("row", for
    tensors with two or more dims).
    """
    _check_bits(bits)
    if scheme not in SCHEMES:
        raise SpecError(f"scheme must be one of {', '.join(SCHEMES)}, got {scheme!r}")
    if granularity not in GRANULARITIES:
        raise SpecError(f"granularity must be one of {', '.join(GRANULARITIES)}, got {granularity!r}")
    g = _groups(tuple(x.shape), granularity)
    v = x.detach().to("cpu", torch.float64).reshape(g, -1)
    if v.numel() == 0:
        v = v.new_zeros(g, 0)
    if scheme == "uniform":
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
    return ("scale", "zero") if scheme == "uniform" else ("log2_min", "log2_step")


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
        x = (codes - pb.to(torch.int64).unsqueeze(1)).to(torch.float32) * pa.to(torch.float32).unsqueeze(1)
        return x.reshape(shape)
    half = 1 << (bits - 1)
    k = (codes % half).to(torch.float64)
    neg = codes >= half
    lo = pa.to(torch.float64).unsqueeze(1)
    step = pb.to(torch.float64).unsqueeze(1)
    mag = torch.where(k > 0, torch.exp2(lo + (k - 0.5) * step), torch.zeros_like(k))
    return torch.where(neg, -mag, mag).to(torch.float32).reshape(shape)


# ---------------------------------------------------------------------------------------------
# signatures


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()).hexdigest()


def _fingerprint(shapes: Mapping[str, Sequence[int]], digests: Mapping[str, str]) -> str:
    body = json.dumps([[n, list(shapes[n]), digests[n]] for n in sorted(digests)], separators=(",", ":"))
    return hashlib.sha256(body.encode()).hexdigest()


def _compact(row: Mapping[str, Any]) -> dict[str, Any]:
    """A report row for the file: floats to 6 significant digits (the header stays small)."""
    return {k: float(f"{v:.6g}") if isinstance(v, float) else v for k, v in row.items()}


def _sample(t: torch.Tensor, k: int = 64) -> torch.Tensor:
    flat = t.reshape(-1)
    if flat.numel() <= k:
        return flat
    return flat[torch.linspace(0, flat.numel() - 1, k).round().to(torch.int64)]


@dataclass
class Signature:
    """A robust weight signature: the kept tensors (float32, dequantized) and what made them.

    `meta`: format, kept (tensor names), shapes, dtypes (of the model), layers (the spec),
    share, bits, scheme, granularity, provenance (pretrained/clean/robust sources, the
    pretrained model's fingerprint, anything passed as `provenance`), report
    (`layer_report` rows), tensor_sha256 (per kept tensor, of the float32 values),
    fingerprint (sha256 over names, shapes and those digests: what patch records name),
    model_nbytes (bytes of the full robust checkpoint's tensors).
    `payload`: the tensors exactly as stored (packed codes and parameters when quantized);
    `nbytes_stored`: their bytes.
    """

    tensors: dict[str, torch.Tensor]
    meta: dict[str, Any]
    nbytes_stored: int
    payload: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    path: Path | None = None

    @property
    def fingerprint(self) -> str:
        return str(self.meta["fingerprint"])

    @property
    def kept(self) -> list[str]:
        return list(self.meta["kept"])

    def space(self) -> WeightSpace:
        """The signature as a WeightSpace (model names, float32)."""
        return WeightSpace.from_tensors(self.tensors, {"source": self.label, "format": "memory"})

    @property
    def label(self) -> str:
        return self.path.name if self.path is not None else f"signature {self.fingerprint[:12]}"

    def __repr__(self) -> str:
        q = f"{self.meta.get('bits')}-bit {self.meta.get('scheme')}" if self.meta.get("bits") else "float32"
        return (f"Signature({self.label!r}, {len(self.tensors)} tensors, {q}, "
                f"{self.nbytes_stored:,} bytes stored)")


def _check_options(bits: Any, scheme: str, granularity: str, share: Any) -> None:
    if bits is not None:
        _check_bits(bits)
    if scheme not in SCHEMES:
        raise SpecError(f"scheme must be one of {', '.join(SCHEMES)}, got {scheme!r}")
    if granularity not in GRANULARITIES:
        raise SpecError(f"granularity must be one of {', '.join(GRANULARITIES)}, got {granularity!r}")
    if isinstance(share, bool) or not (isinstance(share, (int, float)) and 0 < share <= 1):
        raise SpecError(f"share must be in (0, 1], got {share!r}")


def _encode(name: str, rws: torch.Tensor, bits: int | None, scheme: str,
            granularity: str) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """(stored tensors under their file keys, the float32 values they stand for)."""
    if bits is None:
        t = rws.to(torch.float32).contiguous()
        return {name: t}, t
    parts = quantize_tensor(rws, bits, scheme, granularity)
    return {f"{name}::{k}": v for k, v in parts.items()}, dequantize_tensor(parts, rws.shape, bits, scheme)


def extract_signature(
    pretrained: WeightSpace | str | Path,
    clean: WeightSpace | str | Path,
    robust: WeightSpace | str | Path,
    *,
    layers: str = "auto",
    share: float = 0.5,
    bits: int | None = None,
    scheme: str = "uniform",
    granularity: str = "tensor",
    provenance: Mapping[str, Any] | None = None,
    max_relative_change: float = 1.0,
) -> Signature:
    """The robust weight signature of `robust` against `clean`, both fine-tuned from `pretrained`.

        sig = extract_signature(pre, clean, robust_noise, layers="first:2", bits=4, scheme="log")
        save_signature(sig, "noise.rws.safetensors")

    The three models must have the same tensor names, shapes and dtypes. Models that look
    unrelated to `pretrained` are refused: over the whole model,
    ||theta - theta_pre|| / ||theta_pre|| must not exceed `max_relative_change` (1.0:
    a fine-tune that moved further than the weights' own norm did not start from
    `pretrained`). Everything streams one tensor at a time: a first pass builds the
    `layer_report`, `select_layers(report, layers, share)` picks the kept tensors, a
    second pass computes and (with `bits`) quantizes their signatures. Only floating
    tensors are considered; only kept ones are stored.
    """
    _check_options(bits, scheme, granularity, share)
    _parse_spec(layers)
    pre, std, rob = _space(pretrained), _space(clean), _space(robust)
    report = layer_report(pre, std, rob)
    if not report:
        raise InputError(f"the pretrained model ({_where(pre)}) has no floating-point tensors")
    pre2 = sum(r["pre_norm"] ** 2 for r in report)
    for role, sp, key in (("clean", std, "clean_norm"), ("robust", rob, "robust_norm")):
        moved = math.sqrt(sum(r[key] ** 2 for r in report))
        rel = moved / math.sqrt(pre2) if pre2 > 0 else (0.0 if moved == 0 else math.inf)
        if rel > max_relative_change:
            raise InputError(
                f"the {role} model ({_where(sp)}) looks unrelated to the pretrained model ({_where(pre)}): "
                f"its weights differ by {rel:.0%} of the pretrained weights' norm (at most "
                f"{max_relative_change:.0%} allowed); a signature needs both fine-tunes to start from "
                f"the same pretrained model")
    kept = select_layers(report, layers, share)
    tensors: dict[str, torch.Tensor] = {}
    payload: dict[str, torch.Tensor] = {}
    digests: dict[str, str] = {}
    pre_hash = hashlib.sha256()
    for name in kept:
        p = pre[name].load("cpu", torch.float32)
        pre_hash.update(json.dumps([name, list(p.shape), _dt(pre[name].dtype)]).encode())
        pre_hash.update(_sample(p).contiguous().numpy().tobytes())
        dc = rob[name].load("cpu", torch.float32) - p
        ds = std[name].load("cpu", torch.float32) - p
        rws = robust_weight_signature(dc, ds)
        del p, dc, ds
        if not bool(torch.isfinite(rws).all()):
            raise InputError(f"tensor {name!r}: the signature has NaN or Inf values; check the models "
                             f"({_where(pre)}, {_where(std)}, {_where(rob)})")
        stored, values = _encode(name, rws, bits, scheme, granularity)
        payload.update(stored)
        tensors[name] = values
        digests[name] = _digest(values)
    shapes = {n: list(pre[n].shape) for n in kept}
    meta = {
        "format": FORMAT, "version": FORMAT_VERSION, "kept": kept, "shapes": shapes,
        "dtypes": {n: _dt(pre[n].dtype) for n in kept},
        "layers": layers, "share": share, "bits": bits,
        "scheme": scheme if bits is not None else None,
        "granularity": granularity if bits is not None else None,
        "provenance": {"pretrained": _where(pre), "clean": _where(std), "robust": _where(rob),
                       "pretrained_fingerprint": pre_hash.hexdigest(), **dict(provenance or {})},
        "model_nbytes": rob.nbytes, "model_params": rob.num_params,
        "report": [_compact(r) for r in report], "tensor_sha256": digests, "fingerprint": _fingerprint(shapes, digests),
    }
    return Signature(tensors, meta, sum(t.numel() * t.element_size() for t in payload.values()), payload)


# ---------------------------------------------------------------------------------------------
# the file


def save_signature(sig: Signature, path: str | Path) -> Path:
    """Write a signature to one safetensors file, atomically (temporary file + os.replace).

        save_signature(sig, "noise.rws.safetensors")

    Tensors: `<name>` (float32, the tensor's shape) when unquantized; quantized:
    `<name>::q` (uint8, packed codes, ceil(numel * bits / 8) bytes) plus
    `<name>::scale` (float32) and `<name>::zero` (uint8) for uniform, or
    `<name>::log2_min` and `<name>::log2_step` (float32) for log, one value per group.
    `__metadata__`: {"format": "pt", "kind": "weightspace-rws", "rws": JSON of `sig.meta`}.
    """

    path = Path(path)
    if path.suffix != ".safetensors":
        raise SpecError(f"{path}: a signature file is a .safetensors file; name it *.rws.safetensors")
    if not sig.payload:
        raise WeightspaceError("save_signature: the signature has no stored tensors")
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {**sig.meta, "report": _report_columns(sig.meta.get("report", []))}
    metadata = {"format": "pt", "kind": FORMAT,
                "rws": json.dumps(meta, sort_keys=True, allow_nan=False, separators=(",", ":"))}
    save_safetensors_atomic(sig.payload, path, metadata)
    sig.path = path
    return path


def _report_columns(report: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The report as {"columns": [...], "rows": [[...], ...]}: a third of the size of a list of dicts."""
    cols = list(report[0]) if report else []
    return {"columns": cols, "rows": [[r.get(c) for c in cols] for r in report]}


def _report_rows(table: Any, where: str) -> list[dict[str, Any]]:
    try:
        cols, rows = table["columns"], table["rows"]
        if not all(isinstance(c, str) for c in cols) or not all(len(r) == len(cols) for r in rows):
            raise ValueError
        return [dict(zip(cols, r)) for r in rows]
    except (KeyError, TypeError, ValueError):
        raise InputError(f"{where}: corrupt metadata (the layer report is not a columns/rows table)") from None


def _expected_parts(name: str, shape: Sequence[int], meta: Mapping[str, Any]) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    bits = meta["bits"]
    if bits is None:
        return {name: (torch.float32, tuple(shape))}
    g = _groups(shape, meta["granularity"])
    a, b = _part_names(meta["scheme"])
    b_dtype = torch.uint8 if meta["scheme"] == "uniform" else torch.float32
    return {f"{name}::q": (torch.uint8, (packed_size(math.prod(shape), bits),)),
            f"{name}::{a}": (torch.float32, (g,)), f"{name}::{b}": (b_dtype, (g,))}


def _open_signature(path: str | Path) -> tuple[Path, dict[str, Any], dict[str, Entry]]:
    """Read and check a signature file's header (no tensor data): (path, meta, entries)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise InputError(f"{path}: no such signature file")
    entries, header = read_header(path)
    where = f"signature file {str(path)!r}"
    if header.get("kind") != FORMAT:
        raise InputError(f"{where} is not a robust weight signature (write one with save_signature "
                         f"or `wsmerge rws extract`)")
    try:
        meta = json.loads(header["rws"])
        if not isinstance(meta, dict):
            raise ValueError("not a JSON object")
        kept, shapes, bits = meta["kept"], meta["shapes"], meta["bits"]
        scheme, granularity, digests = meta["scheme"], meta["granularity"], meta["tensor_sha256"]
        fp = meta["fingerprint"]
    except (KeyError, ValueError, TypeError) as e:
        raise InputError(f"{where}: corrupt metadata ({type(e).__name__}: {e})") from None
    meta["report"] = _report_rows(meta.get("report", {"columns": [], "rows": []}), where)
    if meta.get("version") != FORMAT_VERSION:
        raise InputError(f"{where}: format version {meta.get('version')!r}; this weightspace reads "
                         f"version {FORMAT_VERSION}")
    ok = (isinstance(kept, list) and kept and all(isinstance(n, str) for n in kept)
          and isinstance(shapes, dict) and isinstance(digests, dict) and isinstance(fp, str)
          and all(isinstance(shapes.get(n), list) and all(type(s) is int and s >= 0 for s in shapes[n])
                  and isinstance(digests.get(n), str) for n in kept))
    if not ok:
        raise InputError(f"{where}: corrupt metadata (kept, shapes and tensor_sha256 must describe "
                         f"every kept tensor)")
    if bits is not None:
        if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
            raise InputError(f"{where}: bits must be between 2 and 8, got {bits!r}")
        if scheme not in SCHEMES or granularity not in GRANULARITIES:
            raise InputError(f"{where}: unknown scheme {scheme!r} or granularity {granularity!r}")
    if _fingerprint(shapes, {n: digests[n] for n in kept}) != fp:
        raise InputError(f"{where}: the fingerprint does not match the tensor digests (edited metadata)")
    expected: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}
    for name in kept:
        expected.update(_expected_parts(name, shapes[name], meta))
    for key, (dtype, shape) in expected.items():
        e = entries.get(key)
        if e is None:
            raise InputError(f"{where}: tensor {key!r} is missing")
        if e.dtype != dtype or tuple(e.shape) != shape:
            raise InputError(f"{where}: tensor {key!r} is {_dt(e.dtype)} {list(e.shape)}, expected "
                             f"{_dt(dtype)} {list(shape)}")
    extra = sorted(set(entries) - set(expected))
    if extra:
        raise InputError(f"{where}: unexpected tensor {extra[0]!r} (not a kept tensor's part)")
    return path, meta, entries


def _read_values(path: Path, meta: Mapping[str, Any], entries: Mapping[str, Entry], name: str,
                 fd: int | None = None) -> torch.Tensor:
    """One kept tensor's float32 values, checked against its digest."""
    shape = meta["shapes"][name]
    if meta["bits"] is None:
        values = read_tensor(path, entries[name], fd)
    else:
        parts = {k.split("::", 1)[1]: read_tensor(path, entries[k], fd)
                 for k in _expected_parts(name, shape, meta)}
        values = dequantize_tensor(parts, shape, meta["bits"], meta["scheme"])
    if _digest(values) != meta["tensor_sha256"][name]:
        raise InputError(f"signature file {str(path)!r}: tensor {name!r} does not match its recorded "
                         f"digest (the file was modified or is corrupt)")
    if not bool(torch.isfinite(values).all()):
        raise InputError(f"signature file {str(path)!r}: tensor {name!r} has NaN or Inf values")
    return values


def load_signature(path: str | Path) -> Signature:
    """Read and check a signature file; a malformed one raises InputError naming it."""
    p, meta, entries = _open_signature(path)
    fd = os.open(p, os.O_RDONLY)
    try:
        tensors = {n: _read_values(p, meta, entries, n, fd) for n in meta["kept"]}
        keys = [k for n in meta["kept"] for k in _expected_parts(n, meta["shapes"][n], meta)]
        payload = {k: read_tensor(p, entries[k], fd) for k in keys}
    finally:
        os.close(fd)
    return Signature(tensors, meta, sum(entries[k].nbytes for k in keys), payload, p)


def signature_size_report(sig_path: str | Path, model_nbytes: int) -> dict[str, Any]:
    """Bytes of a signature file against the full checkpoint's tensor bytes.

        signature_size_report("noise.rws.safetensors", load_space("clean").nbytes)
        # {'bytes': 5120, 'payload_bytes': 4096, 'model_bytes': 81920, 'fraction': 0.0625,
        #  'times_smaller': 16.0, 'kept_tensors': 4, 'kept_params': 4096, 'float32_bytes': 16384, ...}

    `bytes` is the whole file (header and metadata included); `payload_bytes` the stored
    tensors; `float32_bytes` what the kept tensors take unquantized.
    """
    p, meta, entries = _open_signature(sig_path)
    size = p.stat().st_size
    params = sum(math.prod(meta["shapes"][n]) for n in meta["kept"])
    model_nbytes = int(model_nbytes)
    return {
        "path": str(p), "bytes": size, "payload_bytes": sum(e.nbytes for e in entries.values()),
        "model_bytes": model_nbytes, "fraction": size / model_nbytes if model_nbytes else None,
        "times_smaller": model_nbytes / size if size else None,
        "kept_tensors": len(meta["kept"]), "kept_params": params, "float32_bytes": 4 * params,
        "bits": meta["bits"], "scheme": meta["scheme"], "granularity": meta["granularity"],
    }


# ---------------------------------------------------------------------------------------------
# patching


class SignatureRef(TensorRef):
    """One kept tensor of a signature file, dequantized (float32) and checked when loaded."""

    __slots__ = ("path", "meta", "entries", "parts")

    def __init__(self, path: Path, meta: Mapping[str, Any], entries: Mapping[str, Entry], name: str):
        super().__init__(name, tuple(meta["shapes"][name]), torch.float32)
        self.path, self.meta, self.entries = path, meta, entries
        self.parts = list(_expected_parts(name, meta["shapes"][name], meta))

    @property
    def nbytes(self) -> int:  # what is read from disk
        return sum(self.entries[k].nbytes for k in self.parts)

    def _load_cpu(self) -> torch.Tensor:
        return _read_values(self.path, self.meta, self.entries, self.name)


@dataclass(frozen=True)
class _Resolved:
    label: str
    fingerprint: str
    refs: dict[str, TensorRef]
    alpha: float


def _alpha(a: Any, label: str) -> float:
    if isinstance(a, bool) or not isinstance(a, (int, float)) or not math.isfinite(a):
        raise SpecError(f"signature {label}: alpha must be a finite number, got {a!r}")
    return float(a)


def _resolve(signatures: Sequence[tuple[Signature | str | Path, float]]) -> list[_Resolved]:
    if isinstance(signatures, (str, Path, Signature)) or not signatures:
        raise SpecError("give the signatures as a non-empty list of (signature, alpha) pairs")
    out = []
    for item in signatures:
        if not (isinstance(item, (tuple, list)) and len(item) == 2):
            raise SpecError(f"each signature is a (signature, alpha) pair, got {item!r}")
        sig, a = item
        if isinstance(sig, Signature):
            refs: dict[str, TensorRef] = {n: MemoryRef(n, t) for n, t in sig.tensors.items()}
            out.append(_Resolved(sig.label, sig.fingerprint, refs, _alpha(a, sig.label)))
        elif isinstance(sig, (str, Path)):
            p, meta, entries = _open_signature(sig)
            refs = {n: SignatureRef(p, meta, entries, n) for n in meta["kept"]}
            out.append(_Resolved(p.name, meta["fingerprint"], refs, _alpha(a, p.name)))
        else:
            raise SpecError(f"a signature is a Signature or a file path, got {type(sig).__name__}")
    return out


def _check_fits(model: WeightSpace, sigs: Sequence[_Resolved]) -> None:
    for s in sigs:
        for name, ref in s.refs.items():
            if name not in model:
                raise InputError(f"signature {s.label}: tensor {name!r} is not in the model ({_where(model)}); "
                                 f"a signature for another architecture?")
            m = model[name]
            if m.shape != ref.shape:
                raise InputError(f"signature {s.label}: tensor {name!r} has shape {list(ref.shape)} there but "
                                 f"{list(m.shape)} in the model ({_where(model)}); a signature for another "
                                 f"architecture?")
            if not m.dtype.is_floating_point:
                raise InputError(f"signature {s.label}: tensor {name!r} is {_dt(m.dtype)} in the model "
                                 f"({_where(model)}); only floating tensors can be patched")


def read_patch_record(model: WeightSpace) -> list[dict[str, Any]]:
    """The signatures already added to `model`: [{fingerprint, signature, alpha}, ...].

    From `model.meta["weightspace.rws"]` when `patch` made it, else from the
    "weightspace.rws" key of its safetensors `__metadata__`; [] when there is none.
    """
    if RECORD_KEY in model.meta:
        return [dict(e) for e in model.meta[RECORD_KEY]]
    from weightspace.ir import SafetensorsRef

    files: list[Path] = []
    for ref in model.values():
        if not isinstance(ref, SafetensorsRef):
            return []  # an expression over other models: their records do not describe it
        if ref.path not in files:
            files.append(ref.path)
    for f in files:
        _, header = read_header(f)
        if RECORD_KEY in header:
            return _parse_record(header[RECORD_KEY], f)
    return []


def _parse_record(text: str, where: Path | str) -> list[dict[str, Any]]:
    try:
        rec = json.loads(text)
        if not isinstance(rec, list):
            raise ValueError("not a list")
        for e in rec:
            if not (isinstance(e, dict) and isinstance(e.get("fingerprint"), str)
                    and isinstance(e.get("signature"), str) and isinstance(e.get("alpha"), (int, float))
                    and not isinstance(e.get("alpha"), bool)):
                raise ValueError("entries need fingerprint, signature and alpha")
    except ValueError as e:
        raise InputError(f"{where}: corrupt {RECORD_KEY!r} patch record in the safetensors metadata ({e})") from None
    return [{"fingerprint": e["fingerprint"], "signature": e["signature"], "alpha": float(e["alpha"])}
            for e in rec]


def patch_record(model: WeightSpace, signatures: Sequence[tuple[Signature | str | Path, float]]
                 ) -> list[dict[str, Any]]:
    """The record after adding `signatures` to `model`: the model's record plus one entry each.

        patch_record(clean, [("noise.rws.safetensors", 1.0)])
        # [{'fingerprint': '3f9a...', 'signature': 'noise.rws.safetensors', 'alpha': 1.0}]

    Entries name what was added (signature fingerprint, file name, alpha), nothing about
    the model's config, so any checkpoint format can carry them.
    """
    return read_patch_record(model) + [_entry(s) for s in _resolve(signatures)]


def _entry(s: _Resolved) -> dict[str, Any]:
    return {"fingerprint": s.fingerprint, "signature": s.label, "alpha": s.alpha}


def _combine(sigs: Sequence[_Resolved], model: WeightSpace, sign: float) -> WeightSpace:
    """theta + sign * sum_c alpha_c RWS_c on kept tensors, lazily; each alpha applied once."""
    terms: dict[str, list[tuple[TensorRef, float]]] = {}
    for s in sigs:
        for name, ref in s.refs.items():
            terms.setdefault(name, []).append((ref, sign * s.alpha))
    refs: dict[str, TensorRef] = {}
    for name, ref in model.items():
        if name not in terms:
            refs[name] = ref
            continue
        alphas = [a for _, a in terms[name]]

        def op(theta: torch.Tensor, *rws: torch.Tensor, _alphas: list[float] = alphas,
               _name: str = name, _dtype: torch.dtype = ref.dtype) -> torch.Tensor:
            out = theta.clone()
            for a, r in zip(_alphas, rws):
                out.add_(r, alpha=a)
            if not bool(torch.isfinite(out.to(_dtype)).all()):  # e.g. past float16's range
                raise NonFiniteError(f"tensor {_name!r}: patching produced NaN/Inf values in "
                                     f"{_dt(_dtype)}; use smaller alphas or a wider dtype")
            return out

        refs[name] = ExprRef(name, op, [ref, *(r for r, _ in terms[name])], ref.shape, ref.dtype)
    verb = "+" if sign > 0 else "-"
    src = model.source + "".join(f" {verb} {s.alpha:g}*{s.label}" for s in sigs)
    return WeightSpace(refs, {**model.meta, "source": src})


def patch(model: WeightSpace | str | Path,
          signatures: Sequence[tuple[Signature | str | Path, float]]) -> WeightSpace:
    """`model` with theta + sum_c alpha_c RWS_c on every tensor a signature keeps, lazily.

        patched = patch(load_space("clean"), [("noise.rws.safetensors", 1.0), (blur_sig, 0.5)])
        save_patched(patched, "clean+noise+blur")

    Tensors no signature keeps pass through untouched; sums run in float32 (float64 for
    float64 models) and are cast back to the model's dtype. Every signature tensor must
    exist in the model with the same shape. Signature files are read one tensor at a time
    while the result streams. `meta["weightspace.rws"]` holds the updated patch record.
    """
    m = _space(model)
    sigs = _resolve(signatures)
    _check_fits(m, sigs)
    record = read_patch_record(m) + [_entry(s) for s in sigs]
    out = _combine(sigs, m, +1.0)
    out.meta[RECORD_KEY] = record
    return out


def unpatch(model: WeightSpace | str | Path,
            signatures: Sequence[tuple[Signature | str | Path, float]], *, force: bool = False
            ) -> WeightSpace:
    """Take signatures off again: theta - sum_c alpha_c RWS_c, lazily.

        restored = unpatch(load_space("clean+noise"), [("noise.rws.safetensors", 1.0)])

    Each (signature, alpha) must appear in the model's patch record (same fingerprint,
    same alpha); one matching entry is removed per pair. A pair that is not recorded is
    refused (InputError), unless `force=True`: then it is subtracted anyway with a warning.
    Once every entry is removed, the result equals the unpatched model up to float rounding
    (in float32, about one ulp; a float16/bfloat16 model keeps the rounding of its patched copy).
    """
    m = _space(model)
    sigs = _resolve(signatures)
    _check_fits(m, sigs)
    record = read_patch_record(m)
    for s in sigs:
        hit = next((i for i, e in enumerate(record)
                    if e["fingerprint"] == s.fingerprint and e["alpha"] == s.alpha), None)
        if hit is not None:
            record.pop(hit)
            continue
        applied = [e["alpha"] for e in record if e["fingerprint"] == s.fingerprint]
        why = (f"it was added with alpha {', '.join(f'{a:g}' for a in applied)}, not {s.alpha:g}" if applied
               else "the model's patch record does not list it")
        if not force:
            raise InputError(f"signature {s.label} (alpha {s.alpha:g}) was never added to the model "
                             f"({_where(m)}): {why}; pass force=True (--force) to subtract it anyway")
        warnings.warn(f"subtracting signature {s.label} (alpha {s.alpha:g}) although {why}", stacklevel=2)
    out = _combine(sigs, m, -1.0)
    out.meta[RECORD_KEY] = record
    return out


def save_patched(space: WeightSpace, out: str | Path, *, overwrite: bool = False,
                 shard_size: int | str = "5G") -> Path:
    """Stream a patched (or unpatched) space to a checkpoint directory, atomically, with its
    patch record in every shard's safetensors `__metadata__` ("weightspace.rws", JSON;
    left out once the record is empty) and the model's config.json and tokenizer files."""
    from weightspace.sink import save_space

    record = space.meta.get(RECORD_KEY, [])
    metadata = {RECORD_KEY: json.dumps(record)} if record else None
    return save_space(space, out, metadata=metadata, config=space.meta.get("config"),
                      overwrite=overwrite, shard_size=shard_size)


__all__ = [
    "FORMAT",
    "RECORD_KEY",
    "Signature",
    "SignatureRef",
    "dequantize_tensor",
    "extract_signature",
    "layer_report",
    "layer_summary",
    "load_signature",
    "pack_bits",
    "packed_size",
    "patch",
    "patch_record",
    "quantize_tensor",
    "read_patch_record",
    "robust_weight_signature",
    "save_patched",
    "save_signature",
    "select_layers",
    "signature_size_report",
    "unpack_bits",
    "unpatch",
]
