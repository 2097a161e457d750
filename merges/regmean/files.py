"""Gram files: one `.safetensors` file (small models) or a directory of shards (any size).

    save_gram(gram_matrices(adapter, batches), "ft_a.gram.safetensors")
    write_grams(adapter, batches, "ft_a-gram", max_memory=2 * 2**30)     # streamed, sharded
    gram_info("ft_a-gram")        # {"examples", "tokens", "skipped", "layouts", "passes", ...}

A file's safetensors `__metadata__` holds `{"format": "pt", "weightspace_kind": "gram",
"weightspace_gram": JSON info}`. A directory is a checkpoint-style set of shards (one
`model.safetensors`, or `model-0000K-of-0000N.safetensors` and `model.safetensors.index.json`)
written by weightspace.sink.CheckpointSink, every shard's metadata saying `weightspace_kind:
gram` and `weightspace_gram_info: gram.json`, plus `gram.json`, the same info (written last,
once every layer's token count is known; the whole directory appears atomically). A layer the
forward never reached has zeros in a directory (its size was declared before the passes) and
is listed in `skipped` as unused; the merge reads it as no Gram.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from weightspace.binding import Adapter
from weightspace.errors import InputError, SpecError
from weightspace.files import read_json_object, save_safetensors_atomic
from weightspace.ir import WeightSpace
from weightspace.merges.regmean.grams import GRAM_KIND, GramRun
from weightspace.safetensors_io import read_header
from weightspace.sink import DEFAULT_SHARD_SIZE, CheckpointSink

GRAM_INFO = "gram.json"
INFO_KEYS = ("examples", "batches", "tokens", "skipped", "padding", "layouts", "dtype", "passes")


def _info(meta: Mapping[str, Any]) -> dict[str, Any]:
    return {k: meta.get(k) for k in INFO_KEYS if k in meta}


def save_gram(space: WeightSpace, path: str | Path, *, shard_size: int = DEFAULT_SHARD_SIZE,
              overwrite: bool = False) -> Path:
    """Write Grams (from `gram_matrices`) to a `.safetensors` file (replaced if it exists) or to
    a directory (sharded; an existing one needs `overwrite`), atomically."""
    path = Path(path)
    info = _info(space.meta)
    dtypes = {space[n].dtype for n in space}
    dtype = torch.float64 if dtypes == {torch.float64} else torch.float32
    if path.suffix == ".safetensors":
        metadata = {"format": "pt", "weightspace_kind": GRAM_KIND, "weightspace_gram": json.dumps(info)}
        tensors = {n: space[n].load("cpu", dtype) for n in space}
        return save_safetensors_atomic(tensors, path, metadata)
    if path.suffix:
        raise SpecError(f"save_gram: {path} should end in .safetensors (one file) or have no suffix "
                        f"(a directory)")
    sink = CheckpointSink(path, [(n, dtype, tuple(space[n].shape)) for n in space], shard_size=shard_size,
                          metadata=_shard_metadata(info), overwrite=overwrite, inputs=())
    try:
        for n in sink.order:
            sink.write(n, space[n].load("cpu", dtype))
        return sink.finish(extra_json={GRAM_INFO: info})
    except BaseException:
        sink.abort()
        raise


def _shard_metadata(info: Mapping[str, Any]) -> dict[str, str]:
    return {"weightspace_kind": GRAM_KIND, "weightspace_gram_info": GRAM_INFO,
            "padding": str(info.get("padding")), "dtype": str(info.get("dtype"))}


def write_grams(
    adapter: Adapter,
    batches: Iterable[Mapping[str, Any]],
    out: str | Path,
    *,
    max_memory: int | None = 2 * 2**30,
    shard_size: int = DEFAULT_SHARD_SIZE,
    overwrite: bool = False,
    inputs: Iterable[str | Path] = (),
    **options: Any,
) -> dict[str, Any]:
    """Grams of `adapter`'s linear layers streamed to the directory `out`; returns the info.

        info = write_grams(HFCausalLMAdapter(model), batches, "runs/ft_a-gram", max_memory=2**30)
        info["passes"]          # 1 when every accumulator fits max_memory at once

    `options` are gram_matrices' (params, n_examples, modules, padding, dtype, progress). The
    shards are declared before the first pass, each group's Grams are written as soon as its
    pass ends and then dropped, so memory holds one group's accumulators at a time. `out` may
    not be, hold or lie in `inputs`; nothing is in place until the last shard is written.
    """
    run = GramRun(adapter, batches, **options)
    specs = [(n, run.dtype, (la.in_dim, la.in_dim)) for n, la in run.layers.items()]
    static = {"padding": run.padding, "dtype": str(run.dtype).removeprefix("torch.")}
    sink = CheckpointSink(out, specs, shard_size=shard_size, metadata=_shard_metadata(static),
                          overwrite=overwrite, inputs=inputs)
    groups = run.groups(sink.order, max_memory)  # consecutive in the order the shards take them
    try:
        for name, g in run.grams(groups):
            d = run.layers[name].in_dim
            sink.write(name, g.to(run.dtype) if g is not None else torch.zeros(d, d, dtype=run.dtype))
        info = _info(run.meta)
        sink.finish(extra_json={GRAM_INFO: info})
    except BaseException:
        sink.abort()
        raise
    return info


@lru_cache(maxsize=64)
def _info_cached(path: str, stamp: tuple[int, int]) -> dict[str, Any]:
    p = Path(path)
    if p.is_dir():
        f = p / GRAM_INFO
        if not f.is_file():
            raise InputError(f"{p}: no {GRAM_INFO}, so it is not a Gram directory written by "
                             f"`wsmerge gram -o DIR`; recompute it")
        info: Any = read_json_object(f)
    else:
        raw = read_header(p)[1].get("weightspace_gram")
        if raw is None:
            return {}
        try:
            info = json.loads(raw)
        except (ValueError, RecursionError):
            raise InputError(f"{p}: its weightspace_gram metadata is not JSON; recompute it") from None
    if not isinstance(info, dict):
        raise InputError(f"{path}: its Gram metadata is not a JSON object; recompute it")
    for key, kind in (("skipped", dict), ("layouts", dict), ("tokens", dict)):
        if key in info and not isinstance(info[key], kind):
            raise InputError(f"{path}: Gram metadata field {key!r} is not a JSON object; recompute it")
    return info


def gram_info(path: str | Path) -> dict[str, Any]:
    """The info a Gram file or directory records ({} for a file without it, or a path that does
    not exist: Grams handed over in memory); an InputError naming the file when it is unreadable
    or of another shape. Cached by path, size and mtime."""
    p = Path(path)
    if not p.exists():
        return {}
    target = p / GRAM_INFO if p.is_dir() else p
    try:
        st = os.stat(target)
        stamp = (st.st_mtime_ns, st.st_size)
    except OSError:
        stamp = (0, 0)
    return _info_cached(str(p), stamp)


__all__ = ["GRAM_INFO", "gram_info", "save_gram", "write_grams"]
