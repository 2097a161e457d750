"""Reading a model's one stack of identical layers: container, depth, per-layer suffixes.

    stack = _read_stack({n: (r.shape, r.dtype) for n, r in space.items()}, "minilm")
    stack.prefix, stack.depth, stack.suffixes[:1]      # 'encoder.layer', 6, ['attention.self.query.weight']

Names are read by the IR's structure rules (weightspace.structure); this module
refuses what learngene cannot grow (no stack, two stacks, layers that differ) with
an error naming the model and the tensor.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from weightspace.errors import InputError, SpecError
from weightspace.ir import WeightSpace
from weightspace.structure import parse_layer, structure_of


@dataclass(frozen=True)
class _Stack:
    prefix: str
    depth: int
    suffixes: list[str]
    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, torch.dtype]
    non_layer: list[str]


def _space(x: WeightSpace | str | Path) -> WeightSpace:
    if isinstance(x, WeightSpace):
        return x
    if isinstance(x, (str, Path)):
        from weightspace.sources import load_space

        return load_space(x)
    raise SpecError(f"expected a WeightSpace or a model path, got {type(x).__name__}")


def _where(space: WeightSpace) -> str:
    return str(space.meta.get("location") or space.source)


def _read_stack(names_shapes: Mapping[str, tuple[tuple[int, ...], torch.dtype]], where: str) -> _Stack:
    """The one layer stack of a model: every layer must hold the same floating tensors."""
    st = structure_of(names_shapes)
    if not st.stacks:
        raise InputError(f"{where} has no layer stack the structure rules can read (per-layer tensors "
                         f"named like blocks.0.*, model.layers.0.*, encoder.layer.0.* or h.0.*); "
                         f"learngene needs one")
    if len(st.stacks) > 1:
        listed = ", ".join(f"{p} ({n} layers)" for p, n in st.stacks.items())
        raise InputError(f"{where} has {len(st.stacks)} layer stacks ({listed}); learngene expands a "
                         f"model with one stack of identical layers")
    prefix, depth = next(iter(st.stacks.items()))
    layers: list[dict[str, tuple[tuple[int, ...], torch.dtype]]] = [{} for _ in range(depth)]
    for name, spec in names_shapes.items():
        ln = parse_layer(name)
        if ln is not None:
            layers[ln.index][ln.suffix] = spec
    first = layers[0]
    if not first:
        raise InputError(f"{where}: layer 0 of {prefix} has no tensors (the stack starts at a later index)")
    for suffix, (_, dtype) in first.items():
        if not dtype.is_floating_point:
            raise InputError(f"{where}: per-layer tensor {prefix}.0.{suffix} is "
                             f"{str(dtype).replace('torch.', '')}; learngene fits floating tensors only")
    for i, layer in enumerate(layers[1:], 1):
        for suffix in first:
            if suffix not in layer:
                raise InputError(f"{where}: layer {i} of {prefix} has no tensor {suffix!r}, which layer 0 "
                                 f"has; learngene needs a stack of identical layers")
            if layer[suffix][0] != first[suffix][0]:
                raise InputError(f"{where}: tensor {prefix}.{i}.{suffix} has shape {list(layer[suffix][0])}, "
                                 f"but {list(first[suffix][0])} in layer 0; learngene needs identical layers")
        extra = [s for s in layer if s not in first]
        if extra:
            raise InputError(f"{where}: layer {i} of {prefix} has tensor {extra[0]!r}, which layer 0 does "
                             f"not have; learngene needs a stack of identical layers")
    non_layer = list(st.non_layer)
    clash = [n for n in non_layer if n == "gene" or n.startswith("gene.")]
    if clash:
        raise InputError(f"{where}: tensor {clash[0]!r} clashes with the gene's own tensor names (gene.*)")
    return _Stack(prefix, depth, list(first), {s: v[0] for s, v in first.items()},
                  {s: v[1] for s, v in first.items()}, non_layer)
