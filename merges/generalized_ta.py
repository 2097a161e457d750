"""Generalized task arithmetic: the shared core of the task-vector methods.

    task_arithmetic, ties, dare_ties, dare_linear, breadcrumbs,
    breadcrumbs_ties, della, della_linear

each differ only in how a task vector (model - base) is sparsified and whether
a sign is elected per entry before the weighted vectors are summed. This module
registers nothing; the method modules subclass `TaskVectorMerge` and set
`sparsification`, `consensus` and their defaults, as mergekit's registry does.

Per tensor, with deltas d_i = x_i - base and weights w_i:

    d_i   <- sparsify(d_i, density_i)                 (if the method sparsifies)
    m_i   =  sign(w_i d_i) == elected sign            (if the method elects; else 1)
    delta =  sum_i m_i w_i d_i
    delta /= sum_i m_i w_i                            (if normalize; a zero sum counts as 1)
    out   =  base + lambda * delta
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import ClassVar

import torch

from weightspace.buffers import empty_like
from weightspace.errors import SpecError
from weightspace.merges._sparsify import (
    Consensus,
    Sparsification,
    keep_count,
    kth_and_count_above,
    select_magnitude_streamed,
    sparsify,
)
from weightspace.methods import Blocked, MergeMethod, Param, TensorParams


def task_vector_params(*, normalize: bool, rescale: bool | None) -> tuple[Param, ...]:
    """The global parameters every task-vector method takes, with its defaults
    (`rescale=None`: a method that sparsifies nothing, so it has no `rescale`)."""
    rescaling = () if rescale is None else (Param(
        "rescale",
        default=rescale,
        kind=bool,
        doc="after sparsifying, rescale each task vector to its original L1 norm",
    ),)
    return (
        Param("lambda", default=1.0, doc="scale of the merged task vector added to the base"),
        Param(
            "normalize",
            default=normalize,
            kind=bool,
            doc="divide the summed task vectors by the sum of the weights that contributed",
        ),
        *rescaling,
        Param(
            "int8_mask",
            default=False,
            kind=bool,
            doc="accepted for mergekit compatibility; sign masks are boolean here",
        ),
    )


WEIGHT = Param("weight", required=True, doc="weight of this model's task vector")
DENSITY = Param("density", default=1.0, ge=0.0, le=1.0,
                doc="fraction of the task vector's entries to keep")
GAMMA = Param("gamma", default=0.01, ge=0.0, le=1.0,
              doc="fraction of largest-magnitude entries cut as outliers")
EPSILON = Param(
    "epsilon", default=0.15, ge=0.0, lt=0.5,
    doc="spread of keep probabilities around density, by magnitude rank; density +/- epsilon "
        "must stay inside (0, 1)",
)


def merge_task_vectors(
    base: torch.Tensor,
    tensors: list[torch.Tensor],
    weights: list[float],
    *,
    densities: list[float] | None = None,
    sparsification: Sparsification | None = None,
    consensus: Consensus | None = None,
    normalize: bool = False,
    rescale: bool = False,
    lambda_: float = 1.0,
    gammas: list[float] | None = None,
    epsilons: list[float] | None = None,
    generators: list[torch.Generator] | None = None,
) -> torch.Tensor:
    """Merge models as base + lambda * (combined task vectors); see the module docstring.

    >>> base = torch.zeros(4)
    >>> merge_task_vectors(base, [torch.tensor([3.0, -1.0, 0.5, -4.0])], [1.0],
    ...                    densities=[0.5], sparsification="magnitude", consensus="sum")
    tensor([ 3.,  0.,  0., -4.])
    """
    n = len(tensors)
    if sparsification in (None, "magnitude") and not (rescale and sparsification):
        return _merge_chunked(base, tensors, weights, densities if sparsification else None,
                              consensus, normalize, lambda_)

    def sparse_delta(i: int) -> torch.Tensor:
        delta = tensors[i] - base
        if sparsification is not None:
            delta = sparsify(
                delta,
                sparsification,
                densities[i] if densities is not None else 1.0,
                rescale=rescale,
                gamma=gammas[i] if gammas is not None else 0.01,
                epsilon=epsilons[i] if epsilons is not None else 0.15,
                generator=generators[i] if generators is not None else None,
            )
        return delta

    # The sparsified deltas go through the same block-wise weighting, sign
    # election and sum as the magnitude path, over a zero "base" (d - 0 = d).
    deltas = [sparse_delta(i).reshape(-1) for i in range(n)]
    out = empty_like(base)
    _merge_block(TrimState.empty(n), torch.zeros_like(deltas[0]), deltas, weights, consensus,
                 normalize, lambda_, out.view(-1))
    return out.add_(base)


CHUNK = 1 << 18  # elements per block in the chunked path: 1 MiB of float32, cache-resident
SELECT_BLOCK = 1 << 18  # elements per block when counting |delta| for a trim threshold


@dataclass
class TrimState:
    """Per-model trim thresholds for one tensor, carried across its blocks.

    `thresholds[i]` is the k-th largest |x_i - base| (None: keep everything),
    `tied_to_keep[i]` how many entries equal to it are still to be kept (they go
    to the lowest flat indices, as in a stable sort), `keep_none[i]` marks a
    density that keeps no entry.
    """

    thresholds: list[torch.Tensor | None]
    tied_to_keep: list[int]
    keep_none: list[bool]

    @classmethod
    def empty(cls, n: int) -> TrimState:
        return cls([None] * n, [0] * n, [False] * n)


def _keep_counts(numel: int, densities: list[float] | None, n: int) -> tuple[TrimState, dict[int, int]]:
    """An empty state with `keep_none` set, and k (entries to keep) for each model that trims."""
    st = TrimState.empty(n)
    ks: dict[int, int] = {}
    for i in range(n):
        density = densities[i] if densities is not None else 1.0
        if density >= 1:
            continue
        k = keep_count(density, numel)
        if k <= 0:
            st.keep_none[i] = True
        else:
            ks[i] = k
    return st, ks


def _trim_whole(base: torch.Tensor, tensors: list[torch.Tensor], densities: list[float] | None) -> TrimState:
    """Each trimming model's exact threshold (its k-th largest |delta|) and how many entries tied
    with it are kept, counted over cache-sized blocks of |delta| computed into one reused buffer
    (select_magnitude_streamed): no task-vector-sized scratch, and no fresh memory to fault in
    per block. Against one whole |delta| buffer, 0.14 s against 0.19 s of CPU time for two
    16.8M-entry float32 task vectors, and 0.04 s against 0.08 s for 4.2M (one thread)."""
    numel = base.numel()
    st, ks = _keep_counts(numel, densities, len(tensors))
    flat_b = base.reshape(-1)
    buf = None
    for i, k in ks.items():
        flat_x = tensors[i].reshape(-1)
        if flat_x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            thr, above = kth_and_count_above(torch.sub(flat_x, flat_b).abs_(), numel - k + 1)
        else:
            if buf is None:
                buf = torch.empty(min(SELECT_BLOCK, numel), dtype=flat_x.dtype, device=flat_x.device)

            def blocks(x=flat_x, buf=buf):
                for s in range(0, numel, SELECT_BLOCK):
                    e = min(numel, s + SELECT_BLOCK)
                    yield torch.sub(x[s:e], flat_b[s:e], out=buf[: e - s]).abs_()

            # the k-th largest is the (numel - k + 1)-th smallest
            thr, below, equal = select_magnitude_streamed(blocks, numel - k + 1)
            above = numel - below - equal
        st.thresholds[i], st.tied_to_keep[i] = thr, k - above
    return st


def trim_blocked(
    numel: int,
    densities: list[float] | None,
    n: int,
    sample: Callable[[], Iterator[tuple[torch.Tensor, list[torch.Tensor]]]],
    blocks: Callable[[], Iterator[tuple[torch.Tensor, list[torch.Tensor]]]],
) -> TrimState:
    """Exact trim thresholds without holding a whole task vector.

    `sample()` yields a few (base rows, [model rows]) spread over the tensor;
    their |delta| quantiles bracket each threshold. `blocks()` then yields every
    row block once: entries above the bracket are counted, entries inside it
    kept, and the exact k-th largest is selected among those. A bracket that
    missed (unlucky sample) is widened to everything, which stays exact.
    """
    st, ks = _keep_counts(numel, densities, n)
    if not ks:
        return st
    picked: dict[int, list[torch.Tensor]] = {i: [] for i in ks}
    for b, xs in sample():
        for i in ks:
            picked[i].append(torch.sub(xs[i], b).abs_().reshape(-1))
    bounds = {}
    for i, k in ks.items():
        vals = torch.cat(picked[i]).sort().values
        m = vals.numel()
        q = (numel - k) / numel  # fraction of entries below the threshold
        eps = 4.0 / m**0.5 + 1e-3
        lo_i, hi_i = int((q - eps) * m), int((q + eps) * m) + 1
        lo = vals[lo_i] if 0 <= lo_i < m else None
        hi = vals[hi_i] if 0 <= hi_i < m else None
        bounds[i] = (lo, hi)
    del picked
    for _attempt in range(2):
        above = dict.fromkeys(ks, 0)
        cands: dict[int, list[torch.Tensor]] = {i: [] for i in ks}
        for b, xs in blocks():
            for i in ks:
                ad = torch.sub(xs[i], b).abs_().reshape(-1)
                lo, hi = bounds[i]
                inside = torch.ones_like(ad, dtype=torch.bool)
                if hi is not None:
                    above[i] += int(torch.count_nonzero(ad > hi))
                    inside &= ad <= hi
                if lo is not None:
                    inside &= ad >= lo
                cands[i].append(ad[inside])
        missed = []
        for i, k in ks.items():
            cand = torch.cat(cands[i])
            need = k - above[i]
            if not 1 <= need <= cand.numel():
                missed.append(i)
                continue
            thr, over_in = kth_and_count_above(cand, cand.numel() - need + 1)
            over = above[i] + over_in
            st.thresholds[i], st.tied_to_keep[i] = thr, k - over
        if not missed:
            return st
        ks = {i: ks[i] for i in missed}
        bounds = {i: (None, None) for i in missed}  # exact fallback: every entry is a candidate
    raise RuntimeError("internal: trim threshold not found")


# The block loop works on bit patterns: with the sign bit cleared, a float's pattern orders like
# its magnitude, and an arithmetic right shift by width - 1 turns a sign bit into an all-ones
# mask. On CPU torch.where and boolean masks cost 20-25x an add per entry (0.48 ms against
# 0.02 ms on 256K float32 entries, torch 2.13), and a fresh tensor per operation costs page
# faults and cache misses, so the fast path selects with integer and/xor into scratch buffers
# allocated once per tensor: the same choice, bit for bit, as `_merge_block_generic`.
_BITS = {torch.float32: (torch.int32, 31), torch.bfloat16: (torch.int16, 15),
         torch.float16: (torch.int16, 15), torch.float64: (torch.int64, 63)}


def _merge_block(
    st: TrimState,
    flat_b: torch.Tensor,
    flat_x: list[torch.Tensor],
    weights: list[float],
    consensus: Consensus | None,
    normalize: bool,
    lambda_: float,
    flat_o: torch.Tensor,
) -> None:
    """Trim, elect and sum one stretch of the tensor (flat, in order) into `flat_o`.

    Per block of CHUNK entries: d_i = (x_i - b), trimmed to |d_i| > threshold_i plus the ties it
    keeps (by position), times w_i; pos and neg sum the positive and negative parts; the elected
    sign is that of pos + neg (`count`: of the summed signs of d_i), a tie electing +; the result
    is b + lambda * (pos or neg) / (the sum of the weights of the models that agree, 0 counting
    as 1). Without consensus it is b + lambda * sum_i d_i (/ sum_i w_i with normalize)."""
    bits = _BITS.get(flat_b.dtype)
    if bits is None or consensus is None or not all(t is None or bool(torch.isfinite(t))
                                                    for t in st.thresholds):
        return _merge_block_generic(st, flat_b, flat_x, weights, consensus, normalize, lambda_, flat_o)
    itype, shift = bits
    dtype, device = flat_b.dtype, flat_b.device
    n, numel = len(flat_x), flat_b.numel()
    size = min(CHUNK, numel)
    # a divisor of positive weights is 0 only where no model agrees (and the sum there is 0),
    # else at least the smallest weight: clamping it to `tiny` is mergekit's "0 counts as 1"
    tiny = torch.finfo(dtype).tiny
    clamp_divisor = all(w >= tiny for w in weights)
    thr_bits = [None if t is None else int(t.view(itype)) for t in st.thresholds]
    abs_mask = ~(-1 << shift)  # every bit but the sign bit
    wts = [torch.tensor(w, dtype=dtype) for w in weights]  # rounded to dtype, as mergekit does
    # the product of a {0, 1} tensor and a Python weight is that weight rounded to dtype
    w_round = [float(torch.tensor(w, dtype=dtype)) for w in weights]
    f = lambda: torch.empty(size, dtype=dtype, device=device)  # noqa: E731
    i_ = lambda: torch.empty(size, dtype=itype, device=device)  # noqa: E731
    d_, p_, pos_, neg_, sg_, w_, posw_, negw_ = (f() for _ in range(8))
    votes_ = f() if consensus == "count" else d_
    ad_, keep_ = i_(), i_()
    for s in range(0, numel, CHUNK):
        e = min(numel, s + CHUNK)
        m = e - s
        b = flat_b[s:e]
        d, p, pos, neg, sg, w, pos_w, neg_w, votes = (
            t[:m] for t in (d_, p_, pos_, neg_, sg_, w_, posw_, negw_, votes_))
        ad, keep = ad_[:m], keep_[:m]
        first = True
        for i in range(n):
            if st.keep_none[i]:
                continue
            torch.sub(flat_x[i][s:e], b, out=d)
            db = d.view(itype)
            if thr_bits[i] is not None:
                # keep |d| > thr: all ones where thr's pattern minus |d|'s is negative (both are
                # below 2^(width-1): the difference cannot overflow); dropped entries become +0.0
                torch.bitwise_and(db, abs_mask, out=ad)
                torch.sub(thr_bits[i], ad, out=keep).bitwise_right_shift_(shift)
                if st.tied_to_keep[i] > 0:
                    tied = torch.nonzero(ad == thr_bits[i]).squeeze(1)[: st.tied_to_keep[i]]
                    keep[tied] = -1
                    st.tied_to_keep[i] -= tied.numel()
                db.bitwise_and_(keep)
            d.mul_(wts[i])
            if first:
                torch.clamp(d, min=0, out=pos)
                torch.clamp(d, max=0, out=neg)
            else:
                pos.add_(torch.clamp(d, min=0, out=p))
                neg.add_(torch.clamp(d, max=0, out=p))
            if consensus == "count" or normalize:
                torch.sign(d, out=sg)
                if normalize:  # w_i where d_i > 0 (pos_w), where d_i < 0 (neg_w): sign is 1, 0 or -1
                    if first:
                        torch.clamp(sg, min=0, out=pos_w).mul_(weights[i])
                        torch.clamp(sg, max=0, out=neg_w).mul_(-weights[i])
                    else:  # alpha * {0, 1} is exact: the same sums as a product, then an add
                        pos_w.add_(torch.clamp(sg, min=0, out=w), alpha=w_round[i])
                        neg_w.add_(torch.clamp(sg, max=0, out=w), alpha=-w_round[i])
                if consensus == "count":
                    if first:
                        votes.copy_(sg)
                    else:
                        votes.add_(sg)
            first = False
        o = flat_o[s:e]
        if first:  # every model keeps nothing
            o.copy_(b)
            continue
        # the elected sign is - where the score's sign bit is set. A score of -0.0 (>= 0, so +)
        # is the sum of -0.0s, where pos and neg are both -0.0: taking neg there changes no bit
        if consensus == "count":
            down_mask = votes.view(itype) >> shift
        else:
            down_mask = torch.add(pos, neg, out=d).view(itype).bitwise_right_shift_(shift)
        pb, nb = pos.view(itype), neg.view(itype)
        nb.bitwise_xor_(pb).bitwise_and_(down_mask).bitwise_xor_(pb)  # neg now holds the result
        mixed = neg
        if normalize:
            pwb, nwb = pos_w.view(itype), neg_w.view(itype)
            nwb.bitwise_xor_(pwb).bitwise_and_(down_mask).bitwise_xor_(pwb)
            divisor = neg_w
            # exactly zero, as mergekit: a 1e-8 threshold is 0 in float16, so a zero divisor
            # would survive it and give 0/0 = NaN
            if clamp_divisor:
                divisor.clamp_(min=tiny)
            else:
                divisor[divisor == 0] = 1
            mixed.div_(divisor)
        if lambda_ != 1:
            mixed.mul_(lambda_)
        torch.add(b, mixed, out=o)


def _merge_block_generic(
    st: TrimState,
    flat_b: torch.Tensor,
    flat_x: list[torch.Tensor],
    weights: list[float],
    consensus: Consensus | None,
    normalize: bool,
    lambda_: float,
    flat_o: torch.Tensor,
) -> None:
    """`_merge_block` in plain tensor operations: for the dtypes and thresholds the fast path does
    not take, and its reference in the tests."""
    n, numel = len(flat_x), flat_b.numel()
    total_w = sum(weights)
    for s in range(0, numel, CHUNK):
        e = min(numel, s + CHUNK)
        b = flat_b[s:e]
        pos = neg = votes = pos_w = neg_w = mixed = None
        for i in range(n):
            if st.keep_none[i]:
                continue
            d = flat_x[i][s:e] - b
            thr = st.thresholds[i]
            if thr is not None:
                ad = d.abs()
                keep = ad > thr
                if st.tied_to_keep[i] > 0:
                    tied = torch.nonzero(ad == thr).squeeze(1)[: st.tied_to_keep[i]]
                    keep[tied] = True
                    st.tied_to_keep[i] -= tied.numel()
                d.mul_(keep)
            # the weight rounded to the compute dtype first, as mergekit holds weights in a tensor
            # of the deltas' dtype (0.6 is 0.6015625 in bfloat16)
            d.mul_(torch.tensor(weights[i], dtype=d.dtype))
            if consensus is None:
                mixed = d if mixed is None else mixed.add_(d)
                continue
            p, m = d.clamp(min=0), d.clamp(max=0)
            pos = p if pos is None else pos.add_(p)
            neg = m if neg is None else neg.add_(m)
            if consensus == "count":
                sg = d.sign()
                votes = sg if votes is None else votes.add_(sg)
            if normalize:
                up, down = (d > 0).to(d.dtype).mul_(weights[i]), (d < 0).to(d.dtype).mul_(weights[i])
                pos_w = up if pos_w is None else pos_w.add_(up)
                neg_w = down if neg_w is None else neg_w.add_(down)
        o = flat_o[s:e]
        if consensus is None:
            if mixed is None:
                o.copy_(b)
                continue
            if normalize:
                mixed /= total_w if abs(total_w) >= 1e-8 else 1.0
        else:
            if pos is None:
                o.copy_(b)
                continue
            elect_up = ((pos + neg) if votes is None else votes) >= 0
            mixed = torch.where(elect_up, pos, neg)
            if normalize:
                divisor = torch.where(elect_up, pos_w, neg_w)
                # exactly zero, as mergekit: a 1e-8 threshold is 0 in float16, so a zero divisor
                # would survive it and give 0/0 = NaN
                divisor[divisor == 0] = 1
                mixed /= divisor
        if lambda_ != 1:
            mixed *= lambda_
        torch.add(b, mixed, out=o)


def _merge_chunked(
    base: torch.Tensor,
    tensors: list[torch.Tensor],
    weights: list[float],
    densities: list[float] | None,
    consensus: Consensus | None,
    normalize: bool,
    lambda_: float,
) -> torch.Tensor:
    """The general path's result for magnitude trimming (or none), in two phases
    so temporaries never reach the tensor's size: per-model thresholds (one
    scratch buffer, partitioned in place), then trim, elect and sum block by
    block straight into the output."""
    st = _trim_whole(base, tensors, densities)
    out = empty_like(base)
    _merge_block(st, base.reshape(-1), [t.reshape(-1) for t in tensors], weights, consensus,
                 normalize, lambda_, out.view(-1))
    return out


class TaskVectorMerge(MergeMethod):
    """Base class for the task-vector methods (not registered itself)."""

    uses_base = "required"
    sparsification: ClassVar[Sparsification | None] = None
    consensus: ClassVar[Consensus | None] = None

    def check_params(self, params: TensorParams, where: list[str]) -> None:
        if self.sparsification != "della_magprune":
            return
        for pm, at in zip(params.per_model, where):
            d, e = pm["density"], pm["epsilon"]
            if 0 < d < 1 and not (0 < d - e and d + e < 1):  # as mergekit's della_magprune
                raise SpecError(f"{at}: density +/- epsilon must lie inside (0, 1), got density "
                                f"{d:g} and epsilon {e:g}; lower epsilon")

    def blocked(self, name: str, params: TensorParams, n_models: int) -> Blocked | None:
        """Magnitude trimming (TIES) streams in blocks: thresholds first, then blocks."""
        if self.sparsification != "magnitude" or params.get("rescale", False):
            return None
        weights = params.model_values("weight")
        densities = [p.get("density", 1.0) for p in params.per_model]

        def prepare(numel: int, sample, blocks) -> TrimState:
            return trim_blocked(numel, densities, n_models, sample, blocks)

        def merge_block(st: TrimState, base: torch.Tensor, xs: list[torch.Tensor]) -> torch.Tensor:
            out = empty_like(base)
            _merge_block(st, base.reshape(-1), [x.reshape(-1) for x in xs], weights, self.consensus,
                         params["normalize"], params["lambda"], out.view(-1))
            return out

        return Blocked(prepare, merge_block)

    def merge(
        self,
        name: str,
        base: torch.Tensor | None,
        tensors: list[torch.Tensor],
        params: TensorParams,
        companions: dict[str, list[torch.Tensor]],
    ) -> torch.Tensor:
        assert base is not None, "the planner supplies the base for uses_base='required'"
        per_model = params.per_model
        generators = None
        if self.randomized:
            generators = [params.generator(i, device=t.device) for i, t in enumerate(tensors)]
        return merge_task_vectors(
            base,
            tensors,
            params.model_values("weight"),
            densities=[p.get("density", 1.0) for p in per_model],
            sparsification=self.sparsification,
            consensus=self.consensus,
            normalize=params["normalize"],
            rescale=params.get("rescale", False),
            lambda_=params["lambda"],
            gammas=[p.get("gamma", 0.01) for p in per_model],
            epsilons=[p.get("epsilon", 0.15) for p in per_model],
            generators=generators,
        )


__all__ = [
    "DENSITY",
    "EPSILON",
    "GAMMA",
    "WEIGHT",
    "TaskVectorMerge",
    "merge_task_vectors",
    "task_vector_params",
]
