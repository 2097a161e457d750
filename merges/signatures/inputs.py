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
