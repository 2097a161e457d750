"""Adding signatures to a model and taking them off again, with a record of what was added.

    patched = patch(clean, [("noise.rws.safetensors", 1.0), ("blur.rws.safetensors", 0.5)])
    save_patched(patched, "clean+noise+blur")                # records what was added
    restored = unpatch(load_space("clean+noise+blur"), [("noise.rws.safetensors", 1.0),
                                                         ("blur.rws.safetensors", 0.5)])

Patching computes theta(l) + sum_c k_c RWS_c(l) on the tensors a signature keeps (every
other tensor passes through); unpatching subtracts the same terms. The coefficient k_c
comes from the alphas by one of two scalings:

    scaling="linear"  (default)   k_c = alpha_c                      each alpha applied once
    scaling="authors"             k_c = (alpha_c / n)^2              n = signatures in the call

"authors" is what the authors' script runs (VITA-Group/Robust_Weight_Signatures,
model_patching.py): `main` sets every weight to alpha / n (`--alpha`, default 1), and
`decompose` multiplies each robust delta by its weight before the projection
(`(state[key] - pretrained_weight[key]) * weight[idx]`) and the projected signatures by the
weight again when it sums them (`torch.diag(weight).matmul(vectors)`), so signature c is
added (alpha / n)^2 times: one signature at alpha = 1 is added once, two at alpha = 1 a
quarter each, and the sign of alpha is lost. Their `--finetune_alpha w_1 .. w_n` adds
w_c^2 times, which is scaling="authors" with alpha_c = n * w_c.

Patch records live in the patched checkpoint's safetensors `__metadata__` under
"weightspace.rws", so `unpatch` can refuse to remove what was never added.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from weightspace.errors import InputError, NonFiniteError, SpecError
from weightspace.ir import ExprRef, MemoryRef, TensorRef, WeightSpace
from weightspace.merges.signatures.file_format import Signature, SignatureRef, _open_signature
from weightspace.merges.signatures.inputs import _dt, _space, _where
from weightspace.safetensors_io import read_header

RECORD_KEY = "weightspace.rws"  # safetensors __metadata__ key of a patched checkpoint
SCALINGS = ("linear", "authors")
APPLIED_KEY = "weightspace.rws.applied"  # meta of a patch/unpatch result: what that call added or took off


# ---------------------------------------------------------------------------------------------
# which signatures, and do they fit


@dataclass(frozen=True)
class _Resolved:
    label: str
    fingerprint: str
    refs: dict[str, TensorRef]
    alpha: float
    scaling: str = "linear"
    coefficient: float = 0.0  # what is added: alpha under "linear", (alpha / n)^2 under "authors"


def _alpha(a: Any, label: str) -> float:
    if isinstance(a, bool) or not isinstance(a, (int, float)) or not math.isfinite(a):
        raise SpecError(f"signature {label}: alpha must be a finite number, got {a!r}")
    return float(a)


def coefficients(alphas: Sequence[float], scaling: str = "linear") -> list[float]:
    """The multiple of each signature that patching adds, from the alphas of one call.

        coefficients([1.0, 1.0], "linear")    # [1.0, 1.0]
        coefficients([1.0, 1.0], "authors")   # [0.25, 0.25]: (alpha / n)^2, n = 2

    "linear": alpha_c. "authors": (alpha_c / n)^2 with n = len(alphas), the authors'
    `--alpha` scaling (see the module docstring).
    """
    _check_scaling(scaling)
    if scaling == "linear":
        return [float(a) for a in alphas]
    n = len(alphas)
    return [(float(a) / n) ** 2 for a in alphas]


def _check_scaling(scaling: Any) -> None:
    if scaling not in SCALINGS:
        raise SpecError(f"scaling must be one of {', '.join(SCALINGS)}, got {scaling!r}")


def _resolve(signatures: Sequence[tuple[Signature | str | Path, float]], scaling: str = "linear"
             ) -> list[_Resolved]:
    _check_scaling(scaling)
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
    ks = coefficients([s.alpha for s in out], scaling)
    return [replace(s, scaling=scaling, coefficient=k) for s, k in zip(out, ks)]


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
    """The signatures already added to `model`: [{fingerprint, signature, alpha, scaling,
    coefficient}, ...], `coefficient` being the multiple of the signature that was added.

    From `model.meta["weightspace.rws"]` when `patch` made it, else from the
    "weightspace.rws" key of its safetensors `__metadata__`; [] when there is none.
    Entries written before scalings existed (no scaling, no coefficient) read as
    scaling "linear", coefficient = alpha.
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


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _parse_record(text: str, where: Path | str) -> list[dict[str, Any]]:
    try:
        rec = json.loads(text)
        if not isinstance(rec, list):
            raise ValueError("not a list")
        for e in rec:
            if not (isinstance(e, dict) and isinstance(e.get("fingerprint"), str)
                    and isinstance(e.get("signature"), str) and _is_number(e.get("alpha"))):
                raise ValueError("entries need fingerprint, signature and alpha")
            if e.get("scaling", "linear") not in SCALINGS or not _is_number(e.get("coefficient", e["alpha"])):
                raise ValueError(f"scaling must be one of {', '.join(SCALINGS)}, coefficient a number")
    except ValueError as e:
        raise InputError(f"{where}: corrupt {RECORD_KEY!r} patch record in the safetensors metadata ({e})") from None
    return [{"fingerprint": e["fingerprint"], "signature": e["signature"], "alpha": float(e["alpha"]),
             "scaling": e.get("scaling", "linear"), "coefficient": float(e.get("coefficient", e["alpha"]))}
            for e in rec]


def patch_record(model: WeightSpace, signatures: Sequence[tuple[Signature | str | Path, float]],
                 *, scaling: str = "linear") -> list[dict[str, Any]]:
    """The record after adding `signatures` to `model`: the model's record plus one entry each.

        patch_record(clean, [("noise.rws.safetensors", 1.0)])
        # [{'fingerprint': '3f9a...', 'signature': 'noise.rws.safetensors', 'alpha': 1.0,
        #   'scaling': 'linear', 'coefficient': 1.0}]

    Entries name what was added (signature fingerprint, file name, alpha, scaling and the
    resulting coefficient), nothing about the model's config, so any checkpoint format can
    carry them.
    """
    return read_patch_record(model) + [_entry(s) for s in _resolve(signatures, scaling)]


def _entry(s: _Resolved) -> dict[str, Any]:
    return {"fingerprint": s.fingerprint, "signature": s.label, "alpha": s.alpha, "scaling": s.scaling,
            "coefficient": s.coefficient}


# ---------------------------------------------------------------------------------------------
# patching


def _combine(sigs: Sequence[_Resolved], model: WeightSpace, sign: float) -> WeightSpace:
    """theta + sign * sum_c k_c RWS_c on kept tensors, lazily; each coefficient applied once."""
    terms: dict[str, list[tuple[TensorRef, float]]] = {}
    for s in sigs:
        for name, ref in s.refs.items():
            terms.setdefault(name, []).append((ref, sign * s.coefficient))
    refs = {name: _patched_ref(ref, terms[name]) if name in terms else ref for name, ref in model.items()}
    verb = "+" if sign > 0 else "-"
    src = model.source + "".join(f" {verb} {s.coefficient:g}*{s.label}" for s in sigs)
    # what this call added or took off, for a caller to show (the record is in RECORD_KEY)
    done = [{**_entry(s), "sign": verb} for s in sigs]
    return WeightSpace(refs, {**model.meta, "source": src, APPLIED_KEY: done})


def _patched_ref(ref: TensorRef, terms: Sequence[tuple[TensorRef, float]]) -> ExprRef:
    """theta + sum k * RWS for one tensor, refused where the sum leaves the model's dtype."""
    ks = [k for _, k in terms]
    name, dtype = ref.name, ref.dtype

    def op(theta: torch.Tensor, *rws: torch.Tensor) -> torch.Tensor:
        out = theta.clone()
        for k, r in zip(ks, rws):
            out.add_(r, alpha=k)
        if not bool(torch.isfinite(out.to(dtype)).all()):  # e.g. past float16's range
            raise NonFiniteError(f"tensor {name!r}: patching produced NaN/Inf values in "
                                 f"{_dt(dtype)}; use smaller alphas or a wider dtype")
        return out

    return ExprRef(name, op, [ref, *(r for r, _ in terms)], ref.shape, ref.dtype)


def patch(model: WeightSpace | str | Path,
          signatures: Sequence[tuple[Signature | str | Path, float]], *,
          scaling: str = "linear") -> WeightSpace:
    """`model` with theta + sum_c k_c RWS_c on every tensor a signature keeps, lazily.

        patched = patch(load_space("clean"), [("noise.rws.safetensors", 1.0), (blur_sig, 0.5)])
        save_patched(patched, "clean+noise+blur")
        as_run = patch(clean, [(noise, 1.0), (blur, 1.0)], scaling="authors")   # 0.25 each

    k_c = alpha_c with scaling "linear" (the default), (alpha_c / n)^2 with "authors"
    (n = len(signatures); the authors' model_patching.py, see the module docstring).
    Tensors no signature keeps pass through untouched; sums run in float32 (float64 for
    float64 models) and are cast back to the model's dtype. Every signature tensor must
    exist in the model with the same shape. Signature files are read one tensor at a time
    while the result streams. `meta["weightspace.rws"]` holds the updated patch record.
    """
    m = _space(model)
    sigs = _resolve(signatures, scaling)
    _check_fits(m, sigs)
    record = read_patch_record(m) + [_entry(s) for s in sigs]
    out = _combine(sigs, m, +1.0)
    out.meta[RECORD_KEY] = record
    return out


def unpatch(model: WeightSpace | str | Path,
            signatures: Sequence[tuple[Signature | str | Path, float]], *, scaling: str = "linear",
            force: bool = False) -> WeightSpace:
    """Take signatures off again: theta - sum_c k_c RWS_c, lazily.

        restored = unpatch(load_space("clean+noise"), [("noise.rws.safetensors", 1.0)])

    Each (signature, alpha) must appear in the model's patch record with the same
    fingerprint, alpha and `scaling`; one matching entry is removed per pair and the
    coefficient it records is subtracted (so one signature of several added together with
    scaling "authors" can come off alone). A pair that is not recorded is refused
    (InputError), unless `force=True`: then it is subtracted anyway, with the coefficient
    `scaling` gives over this call's signatures, and a warning.
    Once every entry is removed, the result equals the unpatched model up to float rounding
    (in float32, about one ulp; a float16/bfloat16 model keeps the rounding of its patched copy).
    """
    m = _space(model)
    sigs = _resolve(signatures, scaling)
    _check_fits(m, sigs)
    record, sigs = _take_off_record(read_patch_record(m), sigs, m, force)
    out = _combine(sigs, m, -1.0)
    out.meta[RECORD_KEY] = record
    return out


def _describe(e: Mapping[str, Any]) -> str:
    if e.get("scaling", "linear") == "linear":
        return f"alpha {e['alpha']:g}"
    return f"alpha {e['alpha']:g} with {e['scaling']} scaling (coefficient {e['coefficient']:g})"


def _take_off_record(record: list[dict[str, Any]], sigs: Sequence[_Resolved], model: WeightSpace,
                     force: bool) -> tuple[list[dict[str, Any]], list[_Resolved]]:
    """`record` less one matching entry (fingerprint, alpha, scaling) per signature, and the
    signatures with the coefficients to subtract (the recorded ones); one that is not there
    is refused, or with `force` warned about (the warning points at unpatch's caller)."""
    out = []
    for s in sigs:
        hit = next((i for i, e in enumerate(record)
                    if e["fingerprint"] == s.fingerprint and e["alpha"] == s.alpha
                    and e["scaling"] == s.scaling), None)
        if hit is not None:
            out.append(replace(s, coefficient=record.pop(hit)["coefficient"]))
            continue
        same = [e for e in record if e["fingerprint"] == s.fingerprint]
        asked = _describe({"alpha": s.alpha, "scaling": s.scaling, "coefficient": s.coefficient})
        if not same:
            why = "the model's patch record does not list it"
        elif s.scaling == "linear" and all(e["scaling"] == "linear" for e in same):
            added = ", ".join(f"{e['alpha']:g}" for e in same)
            why = f"it was added with alpha {added}, not {s.alpha:g}"
        else:
            why = f"it was added with {', '.join(_describe(e) for e in same)}, not {asked}"
        if not force:
            raise InputError(f"signature {s.label} ({asked}) was never added to the model "
                             f"({_where(model)}): {why}; pass force=True (--force) to subtract it anyway")
        warnings.warn(f"subtracting signature {s.label} ({asked}) although {why}", stacklevel=3)
        out.append(s)
    return record, out


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
