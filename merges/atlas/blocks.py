"""How a block (one floating-point parameter tensor) takes its aTLAS coefficients.

    ids = partition_ids("layers.0.weight", (32, 64), 10, seed=0)    # each entry's group in [0, 10)
    merged = compose(base, [ft_a, ft_b], [0.7, 0.2])                 # base + sum_i lambda_i tau_i

Without partitions a block has one coefficient per task vector; with P partitions its
entries fall into P seeded groups, each with its own coefficient. `compose` is the merge's
arithmetic; `ComposeBlock` is the same sum while learning, with the gradient to the
coefficients only.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

import torch

from weightspace.errors import SpecError

# partition ids are drawn per chunk of this many entries, so a row block can be streamed
PARTITION_CHUNK = 1 << 20


def _chunk_generator(name: str, seed: int, chunk: int) -> torch.Generator:
    digest = hashlib.blake2b(f"atlas\x00{seed}\x00{name}\x00{chunk}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") & ((1 << 63) - 1))


def partition_ids_range(name: str, numel: int, partitions: int, seed: int, start: int, stop: int,
                        device: str | torch.device = "cpu") -> torch.Tensor:
    """Entries [start, stop) of `partition_ids(name, ...)` flattened, without drawing the rest.

    Each chunk of PARTITION_CHUNK entries is a seeded permutation of its positions taken
    modulo P, so every group gets an equal share (+-1) of each chunk.
    """
    if not 0 <= start <= stop <= numel:
        raise ValueError(f"partition range {start}:{stop} is outside 0..{numel}")
    parts = []
    for k in range(start // PARTITION_CHUNK, (stop - 1) // PARTITION_CHUNK + 1 if stop > start else 0):
        c0 = k * PARTITION_CHUNK
        n = min(PARTITION_CHUNK, numel - c0)
        ids = torch.randperm(n, generator=_chunk_generator(name, seed, k)).remainder_(partitions)
        parts.append(ids[max(start, c0) - c0 : min(stop, c0 + n) - c0])
    out = torch.cat(parts) if parts else torch.empty(0, dtype=torch.int64)
    return out.to(device)


def partition_ids(name: str, shape: Sequence[int], partitions: int, seed: int,
                  device: str | torch.device = "cpu") -> torch.Tensor:
    """The partition group in [0, P) of every entry of tensor `name`: int64 of `shape`.

        ids = partition_ids("layers.0.weight", (32, 64), 10, seed=0)
        (ids == 3).sum()                         # 204 or 205: groups are balanced

    Deterministic for (seed, name, shape): drawn on the CPU with generators seeded from
    them, so any device gets the same groups. Every group is used when the tensor has at
    least P entries (1-D, 2-D or n-D alike).
    """
    if not isinstance(partitions, int) or partitions < 1:
        raise SpecError(f"partitions must be a positive integer, got {partitions!r}")
    shape = tuple(int(s) for s in shape)
    numel = math.prod(shape)
    return partition_ids_range(name, numel, partitions, seed, 0, numel, device).view(shape)


def compose(base: torch.Tensor, tensors: list[torch.Tensor], lambdas: list[torch.Tensor | float],
            ids: torch.Tensor | None = None) -> torch.Tensor:
    """base + sum_i lambda_i * (tensors[i] - base), in float32 at least.

    A lambda is a number, or with partition `ids` (base's shape) a (P,) tensor indexed by
    them. A lambda of exactly 0 adds nothing, so all-zero coefficients give the base.

    >>> compose(torch.tensor([1.0]), [torch.tensor([3.0])], [0.5])
    tensor([2.])
    """
    work = torch.promote_types(base.dtype, torch.float32)
    b = base.to(work)
    out = b.clone()
    for t, lam in zip(tensors, lambdas):
        if ids is None:
            c = float(lam)
            if c != 0.0:
                out.add_(t.to(work) - b, alpha=c)
        else:
            lam = torch.as_tensor(lam, dtype=work, device=base.device)
            if bool((lam != 0).any()):
                out.addcmul_(t.to(work) - b, lam[ids])
    return out.to(base.dtype)


# the backward pass reads a block's gradient and task vector in float32 chunks of this many
# entries: exact float32 products without a float32 copy of the whole block
GRAD_CHUNK = 1 << 20


class ComposeBlock(torch.autograd.Function):
    """base + sum_i lam_i * tau_i for one block, lam (T, P) indexed by partition ids.

        merged = ComposeBlock.apply(lam, base, ids, active, *taus)   # ids None: P = 1

    The merged block has the base's dtype (the model's compute dtype: bf16 for a bf16
    model). Backward gives d/dlam_(i,p) = sum over the entries of group p of grad * tau_i,
    accumulated in the coefficients' dtype (float32) from float32 (float64 for a float64
    model) chunks of grad and tau_i, GRAD_CHUNK entries at a time. The task vectors are
    read where they are, in their own dtype: autograd keeps no per-task copies, and no
    float32 copy of a whole block is made.
    """

    @staticmethod
    def forward(ctx, lam, base, ids, active, *taus):
        out = base.clone()
        for i in active:
            if ids is None:
                out.addcmul_(taus[i], lam[i, 0])
            else:
                out.addcmul_(taus[i], lam[i].index_select(0, ids).view(out.shape))
        ctx.ids, ctx.active, ctx.taus, ctx.lam_shape, ctx.lam_dtype = ids, active, taus, lam.shape, lam.dtype
        return out

    @staticmethod
    def backward(ctx, grad):
        g = torch.zeros(ctx.lam_shape, dtype=ctx.lam_dtype, device=grad.device)
        flat = grad.reshape(-1)
        for i in ctx.active:
            tau = ctx.taus[i].reshape(-1)
            work = torch.promote_types(torch.promote_types(torch.float32, grad.dtype), tau.dtype)
            for s in range(0, flat.numel(), GRAD_CHUNK):
                prod = flat[s:s + GRAD_CHUNK].to(work) * tau[s:s + GRAD_CHUNK].to(work)
                if ctx.ids is None:
                    g[i, 0] += prod.sum()
                else:
                    g[i].index_add_(0, ctx.ids[s:s + GRAD_CHUNK], prod)
        return (g, None, None, None, *([None] * len(ctx.taus)))
