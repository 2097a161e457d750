"""Sizes read from files or the command line, checked before anything is allocated from them.

    hidden = check_size(meta["vae"]["hidden"], "vae.hidden", where=gf)     # a positive int within a bound
    shapes = module_shapes(lambda: ChunkVAE(**settings))                  # on the meta device: no memory
    check_config_matches(shapes, header_shapes(path), config=gf, tensors=path, fields=settings)

A config (a zoo checkpoint's config.json, a generator.json) describes the modules its
tensors fill, and nothing stops it from claiming a width of 60000 next to tensors of
width 16. So every module built from a file's sizes is built first on the meta device
(shapes, no storage), compared with the shapes in the safetensors header (metadata
only, no tensor read) and only then built for real: its memory is then that of
tensors the file really holds. Where there are no tensors yet (a zoo spec about to be
trained), the parameter count is bounded instead (`MAX_PARAMS`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from weightspace.errors import InputError, WeightspaceError

# one dimension of a module (a width, a hidden size, a count of chunks or time steps)
MAX_SIZE = 1 << 24
# layers of one network (a zoo model, a learngene expansion, a generator's blocks)
MAX_DEPTH = 4096
# parameters of one model built without tensors to check it against (a zoo model to train)
MAX_PARAMS = 100_000_000
# models one call generates (`wsmerge generate sample -n`; each is decoded in memory first)
MAX_SAMPLES = 10_000


def check_size(value: Any, field: str, where: str | Path | None = None, *, limit: int = MAX_SIZE,
               minimum: int = 1, error: type[WeightspaceError] = InputError) -> int:
    """`value` as an int in minimum..limit, else `error` naming `where` and `field`.

    >>> check_size(16, "arch.width")
    16
    """
    at = f"{where}: " if where is not None else ""
    if isinstance(value, bool) or not isinstance(value, int):
        raise error(f"{at}{field} must be a whole number, got {value!r}")
    if value < minimum:
        raise error(f"{at}{field} must be >= {minimum}, got {value}")
    if value > limit:
        raise error(f"{at}{field} is {value:,}, more than the {limit:,} weightspace allows")
    return value


def check_sizes(values: Mapping[str, Any], fields: Mapping[str, int | tuple[int, int]],
                where: str | Path | None = None, *, prefix: str = "",
                error: type[WeightspaceError] = InputError) -> None:
    """`check_size` for every field named in `fields` (name -> limit, or (minimum, limit)) that
    `values` holds."""
    for name, bound in fields.items():
        if name in values:
            lo, hi = bound if isinstance(bound, tuple) else (1, bound)
            check_size(values[name], f"{prefix}{name}", where, limit=hi, minimum=lo, error=error)


def module_shapes(build: Callable[[], Any]) -> dict[str, tuple[int, ...]]:
    """The state_dict shapes of the module `build()` makes, built on the meta device (no storage)."""
    import torch

    with torch.device("meta"):
        module = build()
    return {n: tuple(t.shape) for n, t in module.state_dict().items()}


def num_params(shapes: Mapping[str, Sequence[int]]) -> int:
    n = 0
    for s in shapes.values():
        k = 1
        for d in s:
            k *= int(d)
        n += k
    return n


def header_shapes(path: str | Path) -> dict[str, tuple[int, ...]]:
    """Tensor shapes from a safetensors header (checked; no tensor data is read)."""
    from weightspace.safetensors_io import read_header

    entries, _ = read_header(path)
    return {n: tuple(e.shape) for n, e in entries.items()}


def _suspects(fields: Mapping[str, Any], claimed: Sequence[int], have: Sequence[int]) -> list[str]:
    """Fields whose value is a dimension of the claimed shape that the real one lacks."""
    odd = {d for d in claimed if d not in have} or set(claimed) ^ set(have)
    return [f"{k}={v}" for k, v in fields.items()
            if isinstance(v, int) and not isinstance(v, bool) and v in odd]


def check_config_matches(config_shapes: Mapping[str, Sequence[int]], header: Mapping[str, Sequence[int]], *,
                         config: str | Path, tensors: str | Path,
                         fields: Mapping[str, Any] | None = None) -> None:
    """InputError unless the tensors the config implies (`config_shapes`) are exactly the ones
    the file holds (`header`), by name and shape; the message names both files, the first
    tensor that differs and the config's fields that look responsible."""
    fields = dict(fields or {})
    hint = ", ".join(f"{k}={v}" for k, v in fields.items() if isinstance(v, int) and not isinstance(v, bool))
    for name, shape in config_shapes.items():
        if name not in header:
            raise InputError(f"{config}: describes a tensor {name!r} that {tensors} does not hold"
                             f"{f' (config: {hint})' if hint else ''}; the config does not describe "
                             f"these tensors")
        have = tuple(header[name])
        if tuple(shape) != have:
            named = _suspects(fields, shape, have)
            why = f"check {', '.join(named)}" if named else (f"config: {hint}" if hint else "")
            raise InputError(f"{config}: tensor {name!r} would have shape {list(shape)}, but in {tensors} "
                             f"it has {list(have)}{f' ({why})' if why else ''}; the config does not "
                             f"describe these tensors")
    extra = [n for n in header if n not in config_shapes]
    if extra:
        raise InputError(f"{tensors}: tensor {extra[0]!r} is not in the module that {config} describes"
                         f"{f' (config: {hint})' if hint else ''}")


def build_checked(build: Callable[[], Any], header: Mapping[str, Sequence[int]], *, config: str | Path,
                  tensors: str | Path, fields: Mapping[str, Any] | None = None) -> Any:
    """`build()`, once its meta-device twin's shapes match the file's `header` (check_config_matches)."""
    check_config_matches(module_shapes(build), header, config=config, tensors=tensors, fields=fields)
    return build()
