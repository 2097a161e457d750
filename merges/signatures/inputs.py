"""The models a signature is computed from or patched into: opening them and checking that
they match, with errors that name the tensor and the models.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

from weightspace.errors import InputError
from weightspace.ir import WeightSpace


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


def checkpoint_file_bytes(space: WeightSpace) -> int | None:
    """Bytes of the weight files `space` is read from, headers included: the distinct
    safetensors files (shards) its tensors live in, or the one .bin/.pt file it was opened
    from; None for a space in memory or an expression over other spaces.

        checkpoint_file_bytes(load_space("runs/rws/std"))   # os.stat of model.safetensors

    What a signature file's size is compared with: file against file, so neither side's
    header is left out.
    """
    from weightspace.ir import SafetensorsRef

    files: dict[Path, None] = {}
    for ref in space.values():
        if not isinstance(ref, SafetensorsRef):
            files = {}
            break
        files[Path(ref.path)] = None
    if files:
        return sum(p.stat().st_size for p in files)
    loc = space.meta.get("location")
    if space.meta.get("format") == "torch" and loc is not None and Path(loc).is_file():
        return Path(loc).stat().st_size
    return None
