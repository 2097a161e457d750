"""Adding signatures to a model and taking them off again, with a record of what was added.

    patched = patch(clean, [("noise.rws.safetensors", 1.0), ("blur.rws.safetensors", 0.5)])
    save_patched(patched, "clean+noise+blur")                # records what was added
    restored = unpatch(load_space("clean+noise+blur"), [("noise.rws.safetensors", 1.0),
                                                         ("blur.rws.safetensors", 0.5)])

Patching computes theta(l) + sum_c alpha_c RWS_c(l) on the tensors a signature keeps
(every other tensor passes through); unpatching subtracts the same terms. Each alpha is
applied exactly once. (The authors' script scales each delta by its coefficient before
projecting and scales the projected signatures again when it sums them, so a combination
applies alpha_c squared; a regression test pins the single application here.)

Patch records live in the patched checkpoint's safetensors `__metadata__` under
"weightspace.rws", so `unpatch` can refuse to remove what was never added.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from weightspace.errors import InputError, NonFiniteError, SpecError
from weightspace.ir import ExprRef, MemoryRef, TensorRef, WeightSpace
from weightspace.merges.signatures.file_format import Signature, SignatureRef, _open_signature
from weightspace.merges.signatures.inputs import _dt, _space, _where
from weightspace.safetensors_io import read_header

RECORD_KEY = "weightspace.rws"  # safetensors __metadata__ key of a patched checkpoint


# ---------------------------------------------------------------------------------------------
# which signatures, and do they fit


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


# ---------------------------------------------------------------------------------------------
# patch records


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


# ---------------------------------------------------------------------------------------------
# patching


def _combine(sigs: Sequence[_Resolved], model: WeightSpace, sign: float) -> WeightSpace:
    """theta + sign * sum_c alpha_c RWS_c on kept tensors, lazily; each alpha applied once."""
    terms: dict[str, list[tuple[TensorRef, float]]] = {}
    for s in sigs:
        for name, ref in s.refs.items():
            terms.setdefault(name, []).append((ref, sign * s.alpha))
    refs = {name: _patched_ref(ref, terms[name]) if name in terms else ref for name, ref in model.items()}
    verb = "+" if sign > 0 else "-"
    src = model.source + "".join(f" {verb} {s.alpha:g}*{s.label}" for s in sigs)
    return WeightSpace(refs, {**model.meta, "source": src})


def _patched_ref(ref: TensorRef, terms: Sequence[tuple[TensorRef, float]]) -> ExprRef:
    """theta + sum alpha * RWS for one tensor, refused where the sum leaves the model's dtype."""
    alphas = [a for _, a in terms]
    name, dtype = ref.name, ref.dtype

    def op(theta: torch.Tensor, *rws: torch.Tensor) -> torch.Tensor:
        out = theta.clone()
        for a, r in zip(alphas, rws):
            out.add_(r, alpha=a)
        if not bool(torch.isfinite(out.to(dtype)).all()):  # e.g. past float16's range
            raise NonFiniteError(f"tensor {name!r}: patching produced NaN/Inf values in "
                                 f"{_dt(dtype)}; use smaller alphas or a wider dtype")
        return out

    return ExprRef(name, op, [ref, *(r for r, _ in terms)], ref.shape, ref.dtype)


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
    record = _take_off_record(read_patch_record(m), sigs, m, force)
    out = _combine(sigs, m, -1.0)
    out.meta[RECORD_KEY] = record
    return out


def _take_off_record(record: list[dict[str, Any]], sigs: Sequence[_Resolved], model: WeightSpace,
                     force: bool) -> list[dict[str, Any]]:
    """`record` less one matching entry (fingerprint and alpha) per signature; one that is not
    there is refused, or with `force` warned about (the warning points at unpatch's caller)."""
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
                             f"({_where(model)}): {why}; pass force=True (--force) to subtract it anyway")
        warnings.warn(f"subtracting signature {s.label} (alpha {s.alpha:g}) although {why}", stacklevel=3)
    return record


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
