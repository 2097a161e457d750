"""Which models a coefficients file was learned for: a resolved path and a content fingerprint.

    ids = model_identities([load_space("ft0"), load_space("ft1")], ["ft0", "ft1"])
    # [{"name": "ft0", "path": "/abs/ft0", "fingerprint": "9c1f..."}, ...]
    check_identities(ids, [load_space("ft1"), load_space("ft0")], "coefficients file 'c.safetensors'")
    # InputError: ... learned for the task vectors [...] in this order, but the models are [...]

A coefficient row scales one task vector; applied to another model, or to the same models
listed in another order, it silently builds a different merge. The path alone cannot tell
(`wsmerge atlas learn` records --task-vectors as typed, relative to where it ran; a model
may be copied or moved), so every model is also fingerprinted by its content: a hash of
each tensor's name, dtype, shape and three 1 KiB windows of its stored bytes (start,
middle, end). Stored safetensors are read with positioned reads of those windows only, so
fingerprinting a 70B model reads a few MB; other sources load each tensor once.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from weightspace.errors import InputError
from weightspace.ir import SafetensorsRef, TensorRef, WeightSpace
from weightspace.safetensors_io import Entry, dtype_tag, read_tensor

WINDOW = 1024  # bytes hashed at the start, middle and end of every tensor


def _windows(nbytes: int) -> list[tuple[int, int]]:
    """The byte ranges of a tensor that are hashed: all of it when small, else three windows."""
    if nbytes <= 3 * WINDOW:
        return [(0, nbytes)]
    mid = nbytes // 2 - WINDOW // 2
    return [(0, WINDOW), (mid, mid + WINDOW), (nbytes - WINDOW, nbytes)]


def _sample(ref: TensorRef) -> list[bytes]:
    if isinstance(ref, SafetensorsRef):  # positioned reads of the windows, nothing else
        e = ref.entry
        return [read_tensor(ref.path, Entry(e.name, torch.uint8, (b - a,), e.start + a, b - a)).numpy().tobytes()
                for a, b in _windows(e.nbytes)]
    raw = ref.load("cpu").contiguous().reshape(-1).view(torch.uint8)
    return [raw[a:b].numpy().tobytes() for a, b in _windows(raw.numel())]


def fingerprint(space: WeightSpace) -> str:
    """A hash (16 hex digits) of the space's content: per tensor, in name order, its name,
    dtype, shape and sampled stored bytes. The same model read from a copy, another folder or
    memory gives the same fingerprint; a model saved in another dtype does not."""
    h = hashlib.blake2b(digest_size=8)
    for name in sorted(space):
        ref = space[name]
        h.update(f"{name}\x00{dtype_tag(ref.dtype)}\x00{list(ref.shape)}\x00".encode())
        for chunk in _sample(ref):
            h.update(chunk)
    return h.hexdigest()


def location(space: WeightSpace) -> str | None:
    """The model's resolved path, or None for tensors in memory."""
    where = space.meta.get("location")
    return str(Path(where).resolve()) if where else None


def model_identities(spaces: Sequence[WeightSpace], names: Sequence[str | None]) -> list[dict[str, Any]]:
    """What a coefficients file records of each task vector's model: name, path, fingerprint."""
    return [{"name": None if n is None else str(n), "path": location(s), "fingerprint": fingerprint(s)}
            for s, n in zip(spaces, names)]


def _describe(i: int, ident: dict[str, Any]) -> str:
    path, name = ident.get("path"), ident.get("name")
    label = f"{name} at " if name and name != path else ""
    where = "" if not path or Path(path).is_absolute() else "relative to the file; "  # as save_coefficients writes it
    return f"{i}: {label}{path or 'in memory'} ({where}fingerprint {ident['fingerprint']})"


def check_identities(recorded: list[dict[str, Any]] | None, models: Sequence[WeightSpace], where: str) -> None:
    """Refuse models that are not, in order, the ones the coefficients were learned for.

    `recorded` is the file's list (None: an older file, or coefficients built by hand, which
    record none: not checked). Models are compared by fingerprint, so a moved or copied model
    passes and another model, or the same models in another order, is refused, naming both
    lists. The number of models is checked elsewhere (`check_fits`)."""
    if not recorded or len(recorded) != len(models):
        return
    given = model_identities(models, [None] * len(models))
    want = [r["fingerprint"] for r in recorded]
    got = [g["fingerprint"] for g in given]
    if got == want:
        return
    i = next(k for k, (a, b) in enumerate(zip(got, want)) if a != b)
    if got[i] in want:
        j = want.index(got[i])
        problem = f"model {i} is task vector {j} ({recorded[j].get('name') or recorded[j].get('path')})"
    else:
        problem = f"model {i} ({given[i]['path'] or 'in memory'}) is none of the task vectors it was learned for"
    raise InputError(
        f"{where}: learned for the task vectors [{'; '.join(_describe(k, r) for k, r in enumerate(recorded))}] "
        f"in this order, but the models are [{'; '.join(_describe(k, g) for k, g in enumerate(given))}]: "
        f"{problem}. List the fine-tuned models in the file's task order (`wsmerge atlas show` prints "
        f"it), or learn coefficients for these models; if they are the same models saved again in "
        f"another dtype, set check_models false (spec parameters, or "
        f"apply_coefficients(check_models=False))")
