"""How the planner turns one output tensor into executor steps.

Small tensors are one step. An elementwise method streams a large tensor in row
blocks (`block_rows`); a method with a `Blocked` recipe (TIES) first runs a
statistics pass over the whole tensor, then merges it block by block
(`blocked_steps`). `merge_fn` adapts a method's `merge` to a step's flat input
list; `output_config` is the config.json of the result.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

import torch

from weightspace.executor import Step
from weightspace.ir import TensorRef, slice_rows
from weightspace.methods import Blocked, MergeMethod, TensorParams


def blocked_steps(blocked: Blocked, name: str, refs: list[TensorRef], out_dtype: torch.dtype,
                  compute_dtype: torch.dtype, info: dict, block_bytes: int) -> list[Step]:
    """A statistics step that reads the tensor block by block, then one step per row block."""
    first = refs[0]
    n_rows = first.shape[0]
    rows = max(1, block_bytes // max(1, first.nbytes // n_rows))
    cols = max(1, first.numel // n_rows)
    stride = max(1, n_rows // max(1, (1 << 20) // cols))

    def load(r0: int, r1: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
        ts = [slice_rows(r, r0, r1).load("cpu", compute_dtype) for r in refs]
        return ts[0], ts[1:]

    def sample():
        for r in range(0, n_rows, stride):
            yield load(r, r + 1)

    def blocks():
        for r0 in range(0, n_rows, rows):
            yield load(r0, min(n_rows, r0 + rows))

    state: dict[str, Any] = {}

    def prepare(_: list[torch.Tensor]) -> None:
        state["st"] = blocked.prepare(first.numel, sample, blocks)

    # the statistics pass reads every row once (plus a small sample) before the blocks read it again
    steps = [Step(name, None, out_dtype, [], prepare,
                  info={**info, "stage": "statistics", "extra_read_bytes": sum(r.nbytes for r in refs)})]
    for r0 in range(0, n_rows, rows):
        r1 = min(n_rows, r0 + rows)
        steps.append(Step(name, (r1 - r0, *first.shape[1:]), out_dtype,
                          [slice_rows(r, r0, r1) for r in refs],
                          lambda ts: blocked.merge_block(state["st"], ts[0], ts[1:]),
                          info={**info, "rows": (r0, r1), "full_shape": first.shape}))
    return steps


def block_rows(ref: TensorRef, block_bytes: int) -> int | None:
    """Rows per block for `ref`, or None when it is small enough to take whole."""
    if len(ref.shape) < 1 or ref.shape[0] < 2 or ref.nbytes * 2 <= block_bytes:
        return None
    row = max(1, ref.nbytes // ref.shape[0])
    return max(1, block_bytes // row)


def merge_fn(method: MergeMethod, name: str, has_base: bool, n_others: int, params: TensorParams,
             comp_names: list[str], comp_present: list[bool] | None = None
             ) -> Callable[[list[torch.Tensor]], torch.Tensor]:
    """The step's compute function: splits its flat input list into base, model tensors and
    companions (None where a model has no companion tensor) and calls `method.merge`."""
    present = comp_present if comp_present is not None else [True] * (len(comp_names) * n_others)

    def fn(ts: list[torch.Tensor]) -> torch.Tensor:
        i = 0
        base = None
        if has_base:
            base, i = ts[0], 1
        tensors = ts[i : i + n_others]
        rest = iter(ts[i + n_others :])
        flat = [next(rest) if p else None for p in present]
        companions = {c: flat[j * n_others : (j + 1) * n_others] for j, c in enumerate(comp_names)}
        return method.merge(name, base, tensors, params, companions)

    return fn


_LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers")


def output_config(config: dict | None, out_dtype: torch.dtype | None, layers: int | None,
                  layer_sources: Sequence[tuple[dict | None, int]] | None = None) -> dict | None:
    """The output's config.json: dtype, and for stacked slices the layer count and every
    per-layer list (Qwen2's `layer_types`, or any top-level list as long as the layer count)
    rewritten so output layer j takes the entry of the layer it was copied from:
    `layer_sources[j]` = (that source model's config, its layer index)."""
    if config is None:
        return None
    cfg = json.loads(json.dumps(config))
    if out_dtype is not None:
        name = str(out_dtype).replace("torch.", "")
        cfg["torch_dtype"] = name
        if "dtype" in cfg:
            cfg["dtype"] = name
    if layers is None:
        return cfg
    key = next((k for k in _LAYER_KEYS if k in cfg), "num_hidden_layers")
    depth_in = cfg.get(key)
    cfg[key] = layers
    if layer_sources is not None and isinstance(depth_in, int) and depth_in > 1:
        for name, value in config.items():
            if name in _NOT_PER_LAYER or not isinstance(value, list) or len(value) != depth_in:
                continue
            cfg[name] = [_per_layer(src or config, name, idx, value) for src, idx in layer_sources]
    return cfg


# top-level lists that are never per-layer, whatever their length
_NOT_PER_LAYER = {"architectures"}


def _per_layer(src: dict, name: str, idx: int, fallback: list) -> Any:
    """Entry `idx` of the source model's per-layer list `name` (the reference's if it has none)."""
    own = src.get(name)
    values = own if isinstance(own, list) and idx < len(own) else fallback
    return json.loads(json.dumps(values[min(idx, len(values) - 1)]))


# Elementwise methods stream tensors larger than this (per input) in row blocks,
# so their peak memory does not depend on the largest tensor either.
BLOCK_BYTES = 32 * 2**20


# Methods with a `blocked` recipe (TIES) stream tensors larger than this per input.
BLOCKED_MIN_BYTES = 128 * 2**20


__all__ = ["BLOCKED_MIN_BYTES", "BLOCK_BYTES", "block_rows", "blocked_steps", "merge_fn", "output_config"]
