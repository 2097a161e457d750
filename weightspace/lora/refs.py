"""The lazy tensors of a base model with a LoRA adapter applied: W + scale * B @ A, when loaded.

    ref = LoraRef(name, base_ref, [(b, Factor(a, transpose=False), scale, False)], [module])
    ref.load()                      # reads W, A and B; the sum in float32, cast to W's dtype

A term is (row factor, column factor, scale, round first): the row factor is a TensorRef whose
rows line up with W's (B, or A^T as `Transposed` for embeddings and Conv1D), so rows of the sum
read only those rows of W and of it; the column factor is read whole.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from weightspace.ir import ExprRef, TensorRef


class Factor:
    """The column factor of a LoRA product (r x n, small), read whole inside the op. It is not a
    TensorRef on purpose: slicing a LoraRef's rows (ir.RowSliceRef) slices W and the row factor
    and leaves this one whole, which is what rows of W + L @ R need."""

    __slots__ = ("ref", "transpose")

    def __init__(self, ref: TensorRef, transpose: bool):
        self.ref, self.transpose = ref, transpose

    def load(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        t = self.ref.load("cpu", dtype)
        t = t.t() if self.transpose else t
        return t if device.type == "cpu" else t.to(device)


class Transposed(TensorRef):
    """A small factor's transpose (A^T, n x r) as a ref, so it can be the row factor."""

    __slots__ = ("ref",)

    def __init__(self, ref: TensorRef):
        super().__init__(ref.name, tuple(reversed(ref.shape)), ref.dtype)
        self.ref = ref

    def _load_cpu(self) -> torch.Tensor:
        return self.ref.load("cpu").t().contiguous()


def _lora_sum(out_dtype: torch.dtype, w: torch.Tensor, *terms: Any) -> torch.Tensor:
    """w + scale * (left @ right) for each term, in float32 (float64 for a float64 base), cast to
    `out_dtype`. `terms` are flat quadruples (left, right, scale, round_first): `right` None adds
    scale * left (a bias); `round_first` rounds the delta to `out_dtype` before adding it, as
    peft merges an embedding. Several terms on one tensor (a tied embedding) are added one by one,
    rounded to `out_dtype` in between, as peft's module-by-module merges are.

    Works in place on `w`, which the ref that loaded it made for this call (a `load` always returns
    a fresh tensor), so at most two float32 copies of the tensor are alive.
    """
    work = torch.float64 if out_dtype == torch.float64 else torch.float32
    acc = w.to(work)
    for i in range(0, len(terms), 4):
        left, right, scale, round_first = terms[i:i + 4]
        if i:
            acc = acc.to(out_dtype).to(work)
        left = left.to(work)
        delta = left * scale if right is None else (left @ right.load(left.device, work)).mul_(scale)
        if round_first:
            delta = delta.to(out_dtype).to(work)
        acc.add_(delta)
        del delta
    return acc.to(out_dtype)


class LoraRef(ExprRef):
    """A base tensor with LoRA deltas added: W + sum of scale * L @ R, computed when loaded.

    Row-aligned by construction: row i of the result reads row i of W and of each row factor
    L (B, or A^T for embeddings and Conv1D); the column factors R are `Factor`s read whole.
    So the generic row slicing of an ExprRef (ir.RowSliceRef) is exact for it, and a large
    tensor streamed in row blocks reads only those rows of W.
    """

    __slots__ = ("modules",)

    def __init__(self, name: str, base: TensorRef, terms: list[tuple], modules: list[str]):
        operands: list[Any] = [base]
        for t in terms:
            operands.extend(t)
        super().__init__(name, functools.partial(_lora_sum, base.dtype), operands, base.shape, base.dtype)
        self.modules = modules

    def load(self, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> torch.Tensor:
        # W, A and B in float32 whatever the caller's dtype: the sum is peft's, then cast
        work = torch.float64 if self.dtype == torch.float64 else torch.float32
        args = [o.load(device, work) if isinstance(o, TensorRef) else o for o in self.operands]
        out = self.op(*args)
        return out if dtype is None or dtype == out.dtype else out.to(dtype)


def _same(t: torch.Tensor) -> torch.Tensor:
    return t


def replacement(name: str, ref: TensorRef, dtype: torch.dtype) -> TensorRef:
    """A tensor the adapter stores whole, under the base's name, in the base's dtype (peft loads it
    into the base module's parameter)."""
    return ExprRef(name, _same, [ref], ref.shape, dtype)
