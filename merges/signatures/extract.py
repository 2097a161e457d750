"""Extracting a signature from three models: pretrained, fine-tuned on clean data, fine-tuned
on a corruption.

    sig = extract_signature(pre, clean, robust, layers="auto", bits=4)
    save_signature(sig, "noise.rws.safetensors")
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from weightspace.errors import InputError
from weightspace.ir import WeightSpace
from weightspace.merges.signatures.file_format import (
    FORMAT,
    FORMAT_VERSION,
    Signature,
    _digest,
    _fingerprint,
)
from weightspace.merges.signatures.formula import robust_weight_signature
from weightspace.merges.signatures.inputs import _dt, _space, _where, checkpoint_file_bytes
from weightspace.merges.signatures.quantize import (
    _check_bits,
    _check_scheme,
    dequantize_tensor,
    quantize_tensor,
)
from weightspace.merges.signatures.report import layer_report
from weightspace.merges.signatures.selection import _check_share, _parse_spec, select_layers


def _compact(row: Mapping[str, Any]) -> dict[str, Any]:
    """A report row for the file: floats to 6 significant digits (the header stays small)."""
    return {k: float(f"{v:.6g}") if isinstance(v, float) else v for k, v in row.items()}


def _sample(t: torch.Tensor, k: int = 64) -> torch.Tensor:
    flat = t.reshape(-1)
    if flat.numel() <= k:
        return flat
    return flat[torch.linspace(0, flat.numel() - 1, k).round().to(torch.int64)]


def _check_options(bits: Any, scheme: str, granularity: str, share: Any) -> None:
    if bits is not None:
        _check_bits(bits)
    _check_scheme(scheme, granularity)
    _check_share(share)


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
    _check_related(report, pre, std, rob, max_relative_change)
    kept = select_layers(report, layers, share)
    tensors, payload, digests, pre_fingerprint = _signature_tensors(kept, pre, std, rob, bits, scheme,
                                                                    granularity)
    shapes = {n: list(pre[n].shape) for n in kept}
    meta = {
        "format": FORMAT, "version": FORMAT_VERSION, "kept": kept, "shapes": shapes,
        "dtypes": {n: _dt(pre[n].dtype) for n in kept},
        "layers": layers, "share": share, "bits": bits,
        "scheme": scheme if bits is not None else None,
        "granularity": granularity if bits is not None else None,
        "provenance": {"pretrained": _where(pre), "clean": _where(std), "robust": _where(rob),
                       "pretrained_fingerprint": pre_fingerprint, **dict(provenance or {})},
        "model_nbytes": rob.nbytes, "model_file_bytes": checkpoint_file_bytes(rob),
        "model_params": rob.num_params,
        "report": [_compact(r) for r in report], "tensor_sha256": digests, "fingerprint": _fingerprint(shapes, digests),
    }
    return Signature(tensors, meta, sum(t.numel() * t.element_size() for t in payload.values()), payload)


def _check_related(report: Sequence[Mapping[str, Any]], pre: WeightSpace, std: WeightSpace,
                   rob: WeightSpace, max_relative_change: float) -> None:
    """Refuse a fine-tune whose whole-model ||theta - theta_pre|| / ||theta_pre|| exceeds the limit."""
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


def _signature_tensors(
    kept: Sequence[str], pre: WeightSpace, std: WeightSpace, rob: WeightSpace,
    bits: int | None, scheme: str, granularity: str,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, str], str]:
    """The second pass, one tensor at a time: (values, stored payload, value digests, the
    pretrained model's fingerprint over the kept tensors)."""
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
    return tensors, payload, digests, pre_hash.hexdigest()
