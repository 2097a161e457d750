"""The signature file: the `Signature` in memory, and one safetensors file on disk that
`save_signature` writes and `load_signature` checks and reads.

    save_signature(sig, "noise.rws.safetensors")
    sig = load_signature("noise.rws.safetensors")     # InputError naming the file if malformed

A signature is named by its fingerprint (sha256 over kept names, shapes and per-tensor
digests), which patch records cite. `SignatureRef` reads one kept tensor lazily, so a
patch streams the file a tensor at a time.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from weightspace.errors import InputError, SpecError, WeightspaceError
from weightspace.files import save_safetensors_atomic
from weightspace.inputs import open_input_fd, parse_json
from weightspace.ir import TensorRef, WeightSpace
from weightspace.merges.signatures.inputs import _dt
from weightspace.merges.signatures.quantize import (
    GRANULARITIES,
    SCHEMES,
    _groups,
    _part_names,
    dequantize_tensor,
    packed_size,
)
from weightspace.paths import expand_user
from weightspace.safetensors_io import Entry, read_header, read_tensor

FORMAT = "weightspace-rws"
FORMAT_VERSION = 1
# what every signature file's "rws" metadata must hold
_META_KEYS = ("kept", "shapes", "bits", "scheme", "granularity", "tensor_sha256", "fingerprint")


# ---------------------------------------------------------------------------------------------
# the signature in memory


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()).hexdigest()


def _fingerprint(shapes: Mapping[str, Sequence[int]], digests: Mapping[str, str]) -> str:
    body = json.dumps([[n, list(shapes[n]), digests[n]] for n in sorted(digests)], separators=(",", ":"))
    return hashlib.sha256(body.encode()).hexdigest()


@dataclass
class Signature:
    """A robust weight signature: the kept tensors (float32, dequantized) and what made them.

    `meta`: format, kept (tensor names), shapes, dtypes (of the model), layers (the spec),
    share, bits, scheme, granularity, provenance (pretrained/clean/robust sources, the
    pretrained model's fingerprint, anything passed as `provenance`), report
    (`layer_report` rows), tensor_sha256 (per kept tensor, of the float32 values),
    fingerprint (sha256 over names, shapes and those digests: what patch records name),
    model_nbytes (bytes of the full robust checkpoint's tensors), model_file_bytes (bytes of
    its weight files, `checkpoint_file_bytes`; None when it was not read from files).
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


# ---------------------------------------------------------------------------------------------
# writing


def save_signature(sig: Signature, path: str | Path) -> Path:
    """Write a signature to one safetensors file, atomically (temporary file + os.replace).

        save_signature(sig, "noise.rws.safetensors")

    Tensors: `<name>` (float32, the tensor's shape) when unquantized; quantized:
    `<name>::q` (uint8, packed codes, ceil(numel * bits / 8) bytes) plus
    `<name>::scale` (float32) and `<name>::zero` (uint8) for uniform,
    `<name>::log2_min` and `<name>::log2_step` (float32) for log, or `<name>::min` and
    `<name>::step` (float32) for minmax, one value per group.
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


# ---------------------------------------------------------------------------------------------
# reading


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
    path = expand_user(path)
    if not path.is_file():
        raise InputError(f"{path}: no such signature file")
    entries, header = read_header(path)
    where = f"signature file {str(path)!r}"
    if header.get("kind") != FORMAT:
        raise InputError(f"{where} is not a robust weight signature (write one with save_signature "
                         f"or `wsmerge rws extract`)")
    meta = _read_meta(header, where)
    _check_meta(meta, where)
    _check_entries(entries, meta, where)
    return path, meta, entries


def _read_meta(header: Mapping[str, str], where: str) -> dict[str, Any]:
    """The "rws" metadata with every key a reader needs, its report as rows, of this version."""
    try:
        meta = parse_json(header["rws"], where, "corrupt metadata")
        if not isinstance(meta, dict):
            raise ValueError("not a JSON object")
        missing = [k for k in _META_KEYS if k not in meta]
        if missing:
            raise KeyError(missing[0])
    except (KeyError, ValueError, TypeError) as e:
        raise InputError(f"{where}: corrupt metadata ({type(e).__name__}: {e})") from None
    meta["report"] = _report_rows(meta.get("report", {"columns": [], "rows": []}), where)
    if meta.get("version") != FORMAT_VERSION:
        raise InputError(f"{where}: format version {meta.get('version')!r}; this weightspace reads "
                         f"version {FORMAT_VERSION}")
    return meta


def _check_meta(meta: Mapping[str, Any], where: str) -> None:
    """Kept names, shapes and digests describe each other; bits and scheme are known; the
    fingerprint is the one those digests give."""
    kept, shapes, bits = meta["kept"], meta["shapes"], meta["bits"]
    scheme, granularity, digests = meta["scheme"], meta["granularity"], meta["tensor_sha256"]
    fp = meta["fingerprint"]
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


def _check_entries(entries: Mapping[str, Entry], meta: Mapping[str, Any], where: str) -> None:
    """The file holds exactly the parts of the kept tensors, each with its dtype and shape."""
    expected: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}
    for name in meta["kept"]:
        expected.update(_expected_parts(name, meta["shapes"][name], meta))
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
    fd = open_input_fd(p)
    try:
        tensors = {n: _read_values(p, meta, entries, n, fd) for n in meta["kept"]}
        keys = [k for n in meta["kept"] for k in _expected_parts(n, meta["shapes"][n], meta)]
        payload = {k: read_tensor(p, entries[k], fd) for k in keys}
    finally:
        os.close(fd)
    return Signature(tensors, meta, sum(entries[k].nbytes for k in keys), payload, p)


def signature_size_report(sig_path: str | Path, model_bytes: int | None = None) -> dict[str, Any]:
    """Bytes of a signature file against the bytes of the checkpoint file(s) it stands in for.

        signature_size_report("noise.rws.safetensors")          # against the robust checkpoint's files
        signature_size_report("noise.rws.safetensors", checkpoint_file_bytes(load_space("clean")))
        # {'bytes': 5120, 'payload_bytes': 4096, 'header_bytes': 1024, 'model_bytes': 81920,
        #  'model_bytes_are': 'file', 'fraction': 0.0625, 'times_smaller': 16.0, ...}

    File against file: `bytes` is the whole signature file (header, report and provenance
    included) and `model_bytes` the checkpoint's weight files as `checkpoint_file_bytes`
    counts them (headers included). Without `model_bytes`, the robust checkpoint's file
    bytes recorded at extraction are used; a signature extracted from models in memory has
    none, and then the checkpoint's tensor bytes stand in (`model_bytes_are` says which).
    `payload_bytes` are the stored tensors, `header_bytes` the rest of the file, and
    `float32_bytes` what the kept tensors take unquantized.
    """
    p, meta, entries = _open_signature(sig_path)
    size = p.stat().st_size
    params = sum(math.prod(meta["shapes"][n]) for n in meta["kept"])
    kind = "file"
    if model_bytes is None:
        model_bytes = meta.get("model_file_bytes")
        if model_bytes is None:
            model_bytes, kind = meta.get("model_nbytes") or 0, "tensors"
    model_bytes = int(model_bytes)
    payload = sum(e.nbytes for e in entries.values())
    return {
        "path": str(p), "bytes": size, "payload_bytes": payload, "header_bytes": size - payload,
        "model_bytes": model_bytes, "model_bytes_are": kind,
        "fraction": size / model_bytes if model_bytes else None,
        "times_smaller": model_bytes / size if size and model_bytes else None,
        "kept_tensors": len(meta["kept"]), "kept_params": params, "float32_bytes": 4 * params,
        "bits": meta["bits"], "scheme": meta["scheme"], "granularity": meta["granularity"],
    }


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
