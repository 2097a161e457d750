"""The task vectors tau_i = theta_i - theta_0 that aTLAS learns coefficients for.

    tvs = TaskVectors(adapter, base, [ft_a, ft_b], ["a", "b"], partitions=1, seed=0,
                      tv_dtype=None, device=torch.device("cpu"), max_relative_norm=1.0)
    logits = adapter.logits(tvs.params(lam), batch)       # lam (T, B or 1, P), the only leaf

The fine-tunes are checked against the base and against the module the adapter runs, held
once in `tv_dtype` on the device, and composed with coefficients into the parameters of a
forward pass; the backbone is never modified. A task vector from another base is refused
(see MAX_RELATIVE_NORM).

Dtypes: the base is held in the dtype the adapter's module computes in (its parameter's
dtype: bf16 for a bf16 model, float32 for the digits zoo), and where the module's own
parameter already holds the base's values on the device it is used as is (no second copy of
the model). `tv_dtype=None` holds the task vectors in that compute dtype when it is a 16-bit
one (bf16, fp16) and in float16 for a float32 or float64 model (half the bytes; a fine-tune's
differences fit float16, and an overflow is refused). A step's merged parameters are in the
compute dtype too; only the coefficients, their gradient and optimizer state are float32.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from weightspace.binding import Adapter
from weightspace.errors import InputError
from weightspace.ir import WeightSpace
from weightspace.merges.atlas.blocks import ComposeBlock, partition_ids

# ||theta_i - theta_0|| / ||theta_0|| above this: theta_i is not a fine-tune of theta_0
MAX_RELATIVE_NORM = 1.0


class TaskVectors:
    """Task vectors, base and partition ids on the device; builds merged parameters."""

    def __init__(self, adapter: Adapter, base: WeightSpace, finetuned: list[WeightSpace],
                 names: list[str], *, partitions: int, seed: int, tv_dtype: torch.dtype | None,
                 device: torch.device, max_relative_norm: float | None):
        self.adapter = adapter
        self.device = device
        self.passed: list[str] = []
        self.tied: dict[str, str] = {}  # a second name of a tied tensor -> the block it shares
        self.blocks = [n for n, r in base.items() if r.dtype.is_floating_point]
        if not self.blocks:
            raise InputError(f"base {base.source}: no floating-point tensors to learn coefficients for")
        module_tensors = self._check_module(base)
        for i, ft in enumerate(finetuned):
            check_same_tensors(base, ft, self.blocks, f"{i} ({names[i]})")
        self.compute_dtype = compute_dtype(self.adapter.module)
        if tv_dtype is None:
            tv_dtype = default_tv_dtype(self.compute_dtype)
        self.tv_dtype = tv_dtype
        self.base: dict[str, torch.Tensor] = {}
        self.base_shared = 0  # blocks whose base is the module's own tensor (not copied)
        for n in self.blocks:
            self.base[n] = self._base_block(base, n, module_tensors[n])
        base_sq = sum(_square_norm(t) for t in self.base.values())
        self.taus: list[dict[str, torch.Tensor]] = []
        self.relative_norms: list[float] = []
        for i, ft in enumerate(finetuned):
            tau, sq = self._task_vector(ft, f"{i} ({names[i]})", tv_dtype)
            rel = math.sqrt(sq / base_sq) if base_sq > 0 else 0.0
            _check_relative_norm(rel, max_relative_norm, i, names[i], base.source)
            self.relative_norms.append(rel)
            self.taus.append(tau)
        self.partitions = partitions
        self.ids = self._partition_ids(partitions, seed)
        self.active: list[tuple[int, ...]] = [tuple(range(len(finetuned)))] * len(self.blocks)

    def _base_block(self, base: WeightSpace, n: str, have: torch.Tensor) -> torch.Tensor:
        """Block n of the base in the module's dtype on the device: the module's own tensor
        (detached, shared) when it holds exactly these values there, else a loaded copy."""
        t = base[n].load(self.device, have.dtype)
        if have.device == t.device and have.dtype == t.dtype and torch.equal(have.detach(), t):
            self.base_shared += 1
            return have.detach()
        return t

    def _check_module(self, base: WeightSpace) -> dict[str, torch.Tensor]:
        """Check the blocks against the adapter's module; set what each forward passes it.
        Returns the module's tensor of every block."""
        module = self.adapter.module
        have = dict(module.named_parameters(remove_duplicate=False))
        have.update(dict(module.named_buffers(remove_duplicate=False)))
        for n in self.blocks:
            if n not in have:
                raise InputError(f"tensor {n!r} of the base ({base.source}) is not in the model the "
                                 f"adapter runs ({type(module).__name__}); the adapter must run the "
                                 f"base's architecture")
            if tuple(have[n].shape) != tuple(base[n].shape):
                raise InputError(f"tensor {n!r} has shape {list(base[n].shape)} in the base "
                                 f"({base.source}), but {list(have[n].shape)} in the adapter's model")
        # tied tensors (one module tensor under two names) take the first block's values;
        # the module's other tensors come along on the device so that nothing is left behind
        first: dict[int, str] = {}
        for n in self.blocks:
            first.setdefault(id(have[n]), n)
        self.passed = [n for n in self.blocks if first[id(have[n])] == n]
        self.tied = {n: first[id(have[n])] for n in self.blocks if first[id(have[n])] != n}
        seen = set(first)
        canonical = list(module.named_parameters()) + list(module.named_buffers())
        self.extras = {n: t.detach().to(self.device) for n, t in canonical if id(t) not in seen}
        return {n: have[n] for n in self.blocks}

    def _task_vector(self, ft: WeightSpace, name: str, tv_dtype: torch.dtype
                     ) -> tuple[dict[str, torch.Tensor], float]:
        """ft - base per block in `tv_dtype`, and its squared norm (the difference taken in float32,
        or float64 for a float64 model, one block at a time)."""
        tau: dict[str, torch.Tensor] = {}
        sq = 0.0
        for n in self.blocks:
            work = torch.promote_types(torch.float32, self.base[n].dtype)  # float64 stays float64
            d = ft[n].load(self.device, work).sub_(self.base[n].to(work))
            sq += _square_norm(d)
            t = d.to(tv_dtype)
            if not bool(torch.isfinite(t).all()):
                raise InputError(f"task vector {name}: tensor {n!r} overflows "
                                 f"{str(tv_dtype)[6:]}; use tv_dtype=torch.float32 or bfloat16")
            tau[n] = t
            del d
        return tau, sq

    def _partition_ids(self, partitions: int, seed: int) -> dict[str, torch.Tensor | None]:
        if partitions == 1:
            return {n: None for n in self.blocks}
        # int32 ids: index_select/index_add_ take them, at half the bytes of int64
        return {n: partition_ids(n, self.base[n].shape, partitions, seed).reshape(-1).to(
                    device=self.device, dtype=torch.int32) for n in self.blocks}

    def params(self, lam: torch.Tensor) -> dict[str, torch.Tensor]:
        """Merged parameters for coefficients lam (T, B or 1, P) in the compute dtype, plus the
        module's others."""
        out = dict(self.extras)
        for j, n in enumerate(self.blocks):
            if n not in self.passed:
                continue
            lj = lam[:, j if lam.shape[1] > 1 else 0, :]  # one column: shared by every block
            taus = [tau.get(n) for tau in self.taus]
            out[n] = ComposeBlock.apply(lj, self.base[n], self.ids[n], self.active[j], *taus)
        return out

    def drop(self, keep: torch.Tensor) -> None:
        """Keep only the (task, block) task vectors where keep (T, B) is True; free the rest."""
        for i, tau in enumerate(self.taus):
            for j, n in enumerate(self.blocks):
                if not bool(keep[i, j]) and n in tau:
                    del tau[n]
        self.active = [tuple(i for i in range(len(self.taus)) if bool(keep[i, j]))
                       for j in range(len(self.blocks))]

    def memory(self, coefficient_numel: int, state_copies: int) -> dict[str, int]:
        taus = sum(t.numel() * t.element_size() for tau in self.taus for t in tau.values())
        base = sum(t.numel() * t.element_size() for t in self.base.values())
        ids = sum(t.numel() * t.element_size() for t in self.ids.values() if t is not None)
        coeffs = coefficient_numel * 4 * state_copies
        # the base shared with the module's own tensors costs nothing beyond the module
        held = sum(self.base[n].numel() * self.base[n].element_size() for n in self.blocks
                   if not _shares(self.base[n], self.adapter.module))
        return {"task_vectors": taus, "base": base, "base_copied": held, "partition_ids": ids,
                "coefficients": coeffs, "total": taus + base + ids + coeffs,
                "tv_dtype": str(self.tv_dtype).replace("torch.", ""),
                "compute_dtype": str(self.compute_dtype).replace("torch.", ""),
                "per_step_parameters": base}  # the merged parameters of one step (compute dtype)


def compute_dtype(module: torch.nn.Module) -> torch.dtype:
    """The floating dtype most of the module's parameters have (by entries): what it computes in."""
    count: dict[torch.dtype, int] = {}
    for p in module.parameters():
        if p.dtype.is_floating_point:
            count[p.dtype] = count.get(p.dtype, 0) + p.numel()
    return max(count, key=count.get) if count else torch.float32


def default_tv_dtype(compute: torch.dtype) -> torch.dtype:
    """Task vectors in a 16-bit compute dtype (bf16, fp16) stay in it; float32/64 models hold float16."""
    return compute if compute in (torch.bfloat16, torch.float16) else torch.float16


def _shares(t: torch.Tensor, module: torch.nn.Module) -> bool:
    ptr = t.data_ptr()
    return any(p.data_ptr() == ptr for p in module.parameters())


def _square_norm(t: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(t, dtype=torch.float64)) ** 2


def _check_relative_norm(rel: float, limit: float | None, i: int, name: str, base_source: Any) -> None:
    if limit is not None and rel > limit:
        raise InputError(
            f"task vector {i} ({name}): ||theta_i - theta_0|| is {rel:.2f} x ||theta_0|| "
            f"(base {base_source}); a fine-tune of this base moves far less (at most "
            f"{limit:g} x is accepted). Is {name} fine-tuned from a different "
            f"base? (max_relative_norm=None skips this check)")


def check_same_tensors(base: WeightSpace, ft: WeightSpace, blocks: list[str], name: str) -> None:
    """Refuse a fine-tune that lacks a block of the base, has another shape, or has extra tensors."""
    for n in blocks:
        if n not in ft:
            raise InputError(f"task vector {name}: tensor {n!r} of the base ({base.source}) is missing "
                             f"from {ft.source}; is it a fine-tune of this base?")
        if tuple(ft[n].shape) != tuple(base[n].shape):
            raise InputError(f"task vector {name}: tensor {n!r} has shape {list(ft[n].shape)} in "
                             f"{ft.source}, but {list(base[n].shape)} in the base ({base.source})")
    floating = set(blocks)
    extra = [n for n, r in ft.items() if r.dtype.is_floating_point and n not in floating]
    if extra:
        raise InputError(f"task vector {name}: tensor {extra[0]!r} of {ft.source} is not in the base "
                         f"({base.source}); is it a fine-tune of this base?")


def as_space(x: Any, what: str) -> WeightSpace:
    """`x` as a WeightSpace: itself, or a dict of tensors wrapped (source `what`, in memory)."""
    if isinstance(x, WeightSpace):
        return x
    if isinstance(x, Mapping):
        return WeightSpace.from_tensors(dict(x), {"source": what, "format": "memory"})
    raise InputError(f"{what}: expected a WeightSpace or a dict of tensors, got {type(x).__name__}")


def task_name(ws: WeightSpace, i: int) -> str:
    """A fine-tune's path (how `wsmerge atlas show` and specs name it), else task<i>."""
    if ws.meta.get("location"):
        return str(ws.meta["location"])
    if ws.meta.get("format") != "memory" and ws.meta.get("source"):
        return str(ws.meta["source"])
    return f"task{i}"
