"""The weight-space IR: lazy tensor references and named sets of them.

    base = load_space("./base"); ft = load_space("./ft")
    tv = ft - base                  # a task vector; nothing is read yet
    halfway = base + tv * 0.5       # still lazy, per tensor
    halfway["model.layers.0.mlp.up_proj.weight"].load()   # reads two tensors

A checkpoint, a task vector, a Fisher diagonal or a signature are all a
`WeightSpace`: an ordered mapping name -> `TensorRef` plus `meta`.
"""

from __future__ import annotations

import fnmatch
import operator
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from weightspace.errors import InputError, WeightspaceError
from weightspace.safetensors_io import Entry, nbytes_of, read_tensor
from weightspace.structure import Structure, structure_of


class TensorRef:
    """A tensor that is not loaded yet: name, shape, dtype, and how to load it."""

    __slots__ = ("name", "shape", "dtype")

    def __init__(self, name: str, shape: tuple[int, ...], dtype: torch.dtype):
        self.name = name
        self.shape = tuple(int(s) for s in shape)
        self.dtype = dtype

    @property
    def nbytes(self) -> int:
        return nbytes_of(self.shape, self.dtype)

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    def leaves(self) -> list[TensorRef]:
        """The stored tensors this one reads (itself, for a stored tensor)."""
        return [self]

    def _load_cpu(self) -> torch.Tensor:
        raise NotImplementedError

    def load(self, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> torch.Tensor:
        """Read the tensor and return it on `device`, cast to `dtype` if given."""
        t = self._load_cpu()
        if dtype is not None and dtype != t.dtype and str(device) == "cpu":
            t = t.to(dtype)
        if str(device) != "cpu":
            t = t.to(device, non_blocking=False)
            if dtype is not None:
                t = t.to(dtype)
        return t

    def __repr__(self) -> str:
        dt = str(self.dtype).replace("torch.", "")
        return f"{type(self).__name__}({self.name!r}, {list(self.shape)}, {dt})"


class SafetensorsRef(TensorRef):
    """A tensor stored in a safetensors file, read with positioned reads."""

    __slots__ = ("path", "entry")

    def __init__(self, path: Path, entry: Entry):
        super().__init__(entry.name, entry.shape, entry.dtype)
        self.path = path
        self.entry = entry

    def _load_cpu(self) -> torch.Tensor:
        return read_tensor(self.path, self.entry)


class MemoryRef(TensorRef):
    """A tensor already in memory (tests, small generated spaces, torch.load results)."""

    __slots__ = ("tensor",)

    def __init__(self, name: str, tensor: torch.Tensor):
        super().__init__(name, tuple(tensor.shape), tensor.dtype)
        self.tensor = tensor

    def _load_cpu(self) -> torch.Tensor:
        return self.tensor.detach().to("cpu").clone()


class ExprRef(TensorRef):
    """A lazy elementwise expression over other refs and scalars."""

    __slots__ = ("op", "operands")

    def __init__(self, name: str, op: Callable[..., torch.Tensor], operands: list[Any],
                 shape: tuple[int, ...], dtype: torch.dtype):
        super().__init__(name, shape, dtype)
        self.op = op
        self.operands = operands

    def leaves(self) -> list[TensorRef]:
        out: list[TensorRef] = []
        for o in self.operands:
            if isinstance(o, TensorRef):
                out.extend(o.leaves())
        return out

    def _load_cpu(self) -> torch.Tensor:
        return self.load("cpu")

    def load(self, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> torch.Tensor:
        # Arithmetic runs in at least float32 so `ft - base` in bf16 does not lose the delta.
        work = dtype or (self.dtype if self.dtype == torch.float64 else torch.float32)
        args = [o.load(device, work) if isinstance(o, TensorRef) else o for o in self.operands]
        out = self.op(*args)
        return out.to(dtype or self.dtype)


class RowSliceRef(TensorRef):
    """Rows [r0, r1) of another ref (dim 0). For a safetensors tensor only those
    bytes are read: rows are contiguous on disk."""

    __slots__ = ("ref", "r0", "r1")

    def __init__(self, ref: TensorRef, r0: int, r1: int):
        super().__init__(ref.name, (r1 - r0, *ref.shape[1:]), ref.dtype)
        self.ref, self.r0, self.r1 = ref, r0, r1

    def load(self, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> torch.Tensor:
        r = self.ref
        if isinstance(r, SafetensorsRef):
            row = r.entry.nbytes // r.shape[0] if r.shape[0] else 0
            e = Entry(r.name, r.dtype, self.shape, r.entry.start + self.r0 * row, (self.r1 - self.r0) * row)
            return _place(read_tensor(r.path, e), device, dtype)
        if isinstance(r, ExprRef):
            sliced = ExprRef(r.name, r.op, [slice_rows(o, self.r0, self.r1) if isinstance(o, TensorRef) else o
                                            for o in r.operands], self.shape, r.dtype)
            return sliced.load(device, dtype)
        return r.load(device, dtype)[self.r0 : self.r1].clone()

    def leaves(self) -> list[TensorRef]:
        return [self] if not isinstance(self.ref, ExprRef) else [
            slice_rows(leaf, self.r0, self.r1) for leaf in self.ref.leaves()]


def slice_rows(ref: TensorRef, r0: int, r1: int) -> TensorRef:
    """Rows [r0, r1) of `ref` along dim 0, lazily."""
    if not ref.shape or not (0 <= r0 < r1 <= ref.shape[0]):
        raise WeightspaceError(f"internal: bad row slice {r0}:{r1} of {ref!r}")
    return RowSliceRef(ref, r0, r1)


def _place(t: torch.Tensor, device: str | torch.device, dtype: torch.dtype | None) -> torch.Tensor:
    if str(device) != "cpu":
        t = t.to(device)
    return t.to(dtype) if dtype is not None and dtype != t.dtype else t


def _result_dtype(*dtypes: torch.dtype) -> torch.dtype:
    floats = [d for d in dtypes if d.is_floating_point]
    if not floats:
        return torch.float32
    return max(floats, key=lambda d: torch.finfo(d).bits)


class WeightSpace(Mapping[str, TensorRef]):
    """An ordered mapping name -> TensorRef, plus `meta`.

    `meta` keys used across the project: `source` (where it came from),
    `config` (parsed config.json or None), `files` (name -> Path of extra files
    to carry, such as tokenizer files), `format` (safetensors, torch, memory).
    """

    def __init__(self, refs: Mapping[str, TensorRef] | Iterable[TensorRef], meta: dict | None = None):
        if isinstance(refs, Mapping):
            self._refs = dict(refs)
        else:
            self._refs = {r.name: r for r in refs}
        self.meta: dict[str, Any] = dict(meta or {})

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, torch.Tensor], meta: dict | None = None) -> WeightSpace:
        return cls({k: MemoryRef(k, v) for k, v in tensors.items()}, meta or {"source": "memory"})

    # Mapping
    def __getitem__(self, name: str) -> TensorRef:
        try:
            return self._refs[name]
        except KeyError:
            src = self.meta.get("source", "weight space")
            raise InputError(f"tensor {name!r} is not in {src}") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._refs)

    def __len__(self) -> int:
        return len(self._refs)

    def __contains__(self, name: object) -> bool:
        return name in self._refs

    def __repr__(self) -> str:
        return f"WeightSpace({self.meta.get('source', '?')!r}, {len(self)} tensors, {self.num_params:,} params)"

    @property
    def source(self) -> str:
        return str(self.meta.get("source", "weight space"))

    @property
    def num_params(self) -> int:
        return sum(r.numel for r in self._refs.values())

    @property
    def nbytes(self) -> int:
        return sum(r.nbytes for r in self._refs.values())

    def structure(self) -> Structure:
        return structure_of(self._refs)

    def select(self, pattern: str | re.Pattern[str]) -> WeightSpace:
        """Tensors whose names match a glob (`*.mlp.*`) or a compiled regex (searched)."""
        if isinstance(pattern, re.Pattern):
            keep = {k: v for k, v in self._refs.items() if pattern.search(k)}
        else:
            keep = {k: v for k, v in self._refs.items() if fnmatch.fnmatchcase(k, pattern)}
        return WeightSpace(keep, self.meta)

    def materialize(self, device: str = "cpu", dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """Load every tensor (small spaces only: this holds the whole space in memory)."""
        return {k: r.load(device, dtype) for k, r in self._refs.items()}

    # lazy arithmetic
    def _binary(self, other: Any, op: Callable, sym: str) -> WeightSpace:
        if isinstance(other, WeightSpace):
            missing = [n for n in self._refs if n not in other._refs]
            extra = [n for n in other._refs if n not in self._refs]
            if missing or extra:
                which = (f"{missing[0]!r} is in {self.source} but not in {other.source}" if missing
                         else f"{extra[0]!r} is in {other.source} but not in {self.source}")
                raise InputError(f"cannot compute ({self.source}) {sym} ({other.source}): tensor {which}")
            refs = {}
            for n, a in self._refs.items():
                b = other._refs[n]
                if a.shape != b.shape:
                    raise InputError(
                        f"cannot compute {sym} on tensor {n!r}: shape {list(a.shape)} in {self.source} "
                        f"vs {list(b.shape)} in {other.source}"
                    )
                refs[n] = ExprRef(n, op, [a, b], a.shape, _result_dtype(a.dtype, b.dtype))
            src = f"({self.source} {sym} {other.source})"
        elif isinstance(other, (int, float)) and not isinstance(other, bool):
            refs = {n: ExprRef(n, op, [a, float(other)], a.shape, _result_dtype(a.dtype))
                    for n, a in self._refs.items()}
            src = f"({self.source} {sym} {other})"
        else:
            return NotImplemented
        return WeightSpace(refs, {**self.meta, "source": src})

    def __add__(self, other: Any) -> WeightSpace:
        return self._binary(other, operator.add, "+")

    def __radd__(self, other: Any) -> WeightSpace:
        return self._binary(other, operator.add, "+")

    def __sub__(self, other: Any) -> WeightSpace:
        return self._binary(other, operator.sub, "-")

    def __mul__(self, other: Any) -> WeightSpace:
        if isinstance(other, WeightSpace):
            return self._binary(other, operator.mul, "*")
        return self._binary(other, operator.mul, "*")

    def __rmul__(self, other: Any) -> WeightSpace:
        return self.__mul__(other)

    def __truediv__(self, other: Any) -> WeightSpace:
        return self._binary(other, operator.truediv, "/")

    def __neg__(self) -> WeightSpace:
        return self * -1.0

    def save(self, path: str | Path, **kwargs: Any) -> Path:
        """Stream this space to a checkpoint directory (see `weightspace.sink.save_space`)."""
        from weightspace.sink import save_space

        return save_space(self, path, **kwargs)


def task_vector(finetuned: WeightSpace, base: WeightSpace) -> WeightSpace:
    """`finetuned - base`, lazily: the task vector of Ilharco et al. 2023."""
    if not isinstance(finetuned, WeightSpace) or not isinstance(base, WeightSpace):
        raise WeightspaceError("task_vector takes two WeightSpaces")
    return finetuned - base
