"""Fisher files: writing one, checking one, and the norms that `normalize_fishers` divides by."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from weightspace.errors import InputError, SpecError
from weightspace.files import FileCache, save_safetensors_atomic
from weightspace.ir import WeightSpace
from weightspace.paths import expand_user
from weightspace.safetensors_io import read_header
from weightspace.sources import load_space


def save_fisher(space: WeightSpace, path: str | Path) -> Path:
    """Write a Fisher (or any small space) to one safetensors file, atomically.

        save_fisher(fisher_diagonal(adapter, batches), "ft_a.fisher.safetensors")

    `__metadata__` holds {"format": "pt", "fisher": JSON of space.meta["fisher"]}.
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        raise SpecError(f"{path}: a Fisher file is a .safetensors file; name it *.safetensors")
    tensors = {n: ref.load("cpu") for n, ref in space.items()}
    metadata = {"format": "pt", "fisher": json.dumps(space.meta.get("fisher", {}), sort_keys=True)}
    return save_safetensors_atomic(tensors, path, metadata)


def check_fisher(path: str | Path) -> dict[str, Any]:
    """Read a Fisher file through once and summarize it; raise InputError when it cannot weigh a merge.

        check_fisher("ft_a.fisher.safetensors")
        # {'tensors': 8, 'numel': 1234, 'norm': 0.31, 'max': 0.02, 'zero_tensors': [...], 'fisher': {...}}

    `path` is a `.safetensors` file or a sharded directory (`wsmerge fisher -o DIR`); tensors
    are read one at a time. Refused: negative or non-finite entries, and a file that is zero everywhere (a saturated or
    broken estimate: merged with it, that model would count only through the floor).
    """
    space = load_space(path)
    squares = 0.0
    peak = 0.0
    numel = 0
    zero_tensors = []
    for name, ref in space.items():
        f = ref.load("cpu", torch.float64)
        _check_values(f, name, str(path))
        squares += float(f.square().sum())
        peak = max(peak, float(f.max()) if f.numel() else 0.0)
        numel += f.numel()
        if not bool(f.any()):
            zero_tensors.append(name)
    if len(zero_tensors) == len(space):
        raise InputError(f"Fisher file {str(path)!r} is zero everywhere ({len(space)} tensors); "
                         f"recompute it (a saturated model has a zero exact Fisher: try estimator "
                         f"empirical) or leave the model out")
    return {"tensors": len(space), "numel": numel, "norm": math.sqrt(squares), "max": peak,
            "zero_tensors": zero_tensors, "fisher": fisher_info(path, space)}


def fisher_info(path: str | Path, space: WeightSpace | None = None) -> dict[str, Any]:
    """The metadata a Fisher file or directory records (estimator, examples, seed, passes,
    examples per second...): a directory's `fisher.json`, else the first shard's
    `__metadata__["fisher"]`; {} when there is none (a note only, never an error)."""
    p = expand_user(path)
    try:
        if p.is_dir() and (p / "fisher.json").is_file():
            info = json.loads((p / "fisher.json").read_text(encoding="utf-8"))
            return info if isinstance(info, dict) else {}
        if p.is_dir():
            space = space if space is not None else load_space(p)
            first = next((getattr(r, "path", None) for r in space.values()), None)
            p = Path(first) if first is not None else p
        if not p.is_file():
            return {}
        _, header_meta = read_header(p)
        info = json.loads(header_meta.get("fisher", "{}"))
    except (OSError, ValueError, RecursionError, InputError):
        return {}
    return info if isinstance(info, dict) else {}


_NORMS = FileCache()


def _norm_of_file(p: Path) -> float:
    squares = 0.0
    for ref in load_space(p).values():
        squares += float(ref.load("cpu", torch.float64).square().sum())
    return math.sqrt(squares)


def fisher_norms(paths: Iterable[str | Path]) -> list[float]:
    """The L2 norm of each Fisher file over all its tensors (what `normalize_fishers` divides by).

        fisher_norms(["a.fisher.safetensors", "b.fisher.safetensors"])   # [0.31, 0.07]

    Each file is read once per process (cached by path, size and mtime). Put a value in a
    spec as `models[i].parameters.fisher_norm` when the merge cannot find the file itself.
    """
    return [_NORMS.get(expand_user(p), _norm_of_file, what="Fisher file") for p in paths]


def _check_values(f: torch.Tensor, name: str, where: str) -> None:
    if not bool(torch.isfinite(f).all()):
        hint = (" (loaded as float16, where values above 65504 overflow: use dtype float32 or "
                "bfloat16)" if f.dtype == torch.float16 else "")
        raise InputError(f"Fisher for tensor {name!r} has NaN or Inf entries ({where}){hint}")
    if bool((f < 0).any()):
        raise InputError(f"Fisher for tensor {name!r} has negative entries ({where}); "
                         f"a diagonal Fisher is a mean of squares")
