"""Shared math for task-vector methods: sparsification and sign consensus.

    >>> magnitude(torch.tensor([3.0, 1.0, 0.5, -4.0]), density=0.5)
    tensor([ 3.,  0.,  0., -4.])

Pure functions on one tensor at a time, imported by the method modules (which
never import each other). Semantics follow mergekit's `sparsify.py` and the
sign election of its generalized task arithmetic; the selection itself avoids
full sorts where a k-th value is enough, and counts bit patterns instead of
comparing values, so that ties cost nothing (`select_magnitude`).

Ties in magnitude are broken by position (lower flat index first), which is the
set a *stable* argsort would pick; mergekit's unstable argsort picks an
arbitrary member of a tie, so the two agree whenever there are no ties at the
threshold.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Literal

import torch

from weightspace.errors import SpecError

Sparsification = Literal["magnitude", "random", "magnitude_outliers", "della_magprune"]
Consensus = Literal["sum", "count"]

# mergekit's tolerance below which a norm counts as zero when rescaling.
RESCALE_EPS = 1e-7


def rescale_l1(tensor: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
    """Scale `masked` so its L1 norm equals that of `tensor` (mergekit's `rescale`).

    Args:
        tensor: the tensor before masking.
        masked: `tensor` with some entries zeroed.
    Returns:
        `masked * |tensor|_1 / |masked|_1`, or `masked` unchanged when either
        norm is below 1e-7.
    """
    before = float(tensor.abs().sum())
    after = float(masked.abs().sum())
    if before < RESCALE_EPS or after < RESCALE_EPS:
        return masked
    return masked * (before / after)


# ---------------------------------------------------------------- exact selection by counting

# The bit pattern of a non-negative float, read as an integer, orders like the float (+0 < the
# subnormals < ... < +inf < NaN). So the r-th smallest magnitude is found by counting: a histogram
# of the pattern's high 16 bits picks the bin the r-th value falls in, and a histogram of the low
# 16 bits of that bin's entries picks the value. Two linear passes whatever the data: a comparison
# select (numpy's introselect, torch.kthvalue) slows down tenfold when many entries are equal, which
# is what a half-zero task vector (a partly frozen or sparsified fine-tune) or bfloat16 weights
# (at most 32,768 magnitudes) look like. The same code runs on CPU and GPU.
_PATTERN = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}


def _count_to(counts: torch.Tensor, r: int) -> tuple[int, int]:
    """The bin holding the r-th smallest (1-based) entry of a histogram, and how many entries
    the bins below it hold."""
    cum = counts.cumsum(0)
    b = int(torch.searchsorted(cum, torch.tensor(r, dtype=cum.dtype, device=cum.device)))
    return b, int(cum[b - 1]) if b > 0 else 0


def select_magnitude(mag: torch.Tensor, r: int) -> tuple[torch.Tensor, int, int]:
    """The r-th smallest (1-based, as `torch.kthvalue`) of the non-negative values `mag`, with how
    many entries are smaller than it and how many equal it.

    `mag` holds magnitudes (|x|: no negative values, no -0.0). float32, bfloat16 and float16 are
    selected by counting their bit patterns (see above): on 16.8M float32 magnitudes half of
    which are zero, 0.085-0.089 s against numpy's introselect's 0.48 s where k falls in the
    zeros, and 0.073-0.079 s against 0.070-0.089 s on distinct values (2-core machine, `python
    benchmarks/bench_select.py`). Other dtypes use `torch.kthvalue`.
    """
    flat = mag.reshape(-1)
    if flat.dtype not in _PATTERN:
        n = flat.numel()
        if not 1 <= r <= n:
            raise ValueError(f"select_magnitude: r={r} outside 1..{n}")
        v = torch.kthvalue(flat, r).values
        return v, int(torch.count_nonzero(flat < v)), int(torch.count_nonzero(flat == v))
    return select_magnitude_streamed(lambda: (flat,), r)  # one block: the whole tensor


def select_magnitude_streamed(blocks: Callable[[], Iterable[torch.Tensor]], r: int
                              ) -> tuple[torch.Tensor, int, int]:
    """`select_magnitude` of the concatenation of the magnitude blocks that `blocks()` yields,
    without holding them together: the histograms of the bit patterns add up block by block, so
    two passes over the blocks (one for bfloat16/float16) give the exact r-th smallest, with how
    many entries are smaller and how many equal it. `blocks()` must yield the same blocks each
    time (float32, bfloat16 or float16, one dtype); a block may reuse the previous one's memory,
    as each is counted before the next is asked for.

    The second pass counts every entry of a block, not only those in the chosen bin: the
    pattern minus the bin's first, clamped to [-1, 2^16] (one bin each for "below" and "above"),
    is one histogram, which costs less than gathering the bin's entries (no boolean mask)."""
    counts = None
    n = 0
    pattern = None
    scratch: torch.Tensor | None = None

    def scratch_for(bits: torch.Tensor) -> torch.Tensor:
        nonlocal scratch
        if scratch is None or scratch.numel() < bits.numel() or scratch.device != bits.device:
            scratch = torch.empty(bits.numel(), dtype=torch.int32, device=bits.device)
        return scratch[: bits.numel()]

    for m in blocks():
        pattern = _PATTERN.get(m.dtype)
        if pattern is None:
            raise TypeError(f"select_magnitude_streamed: {m.dtype} blocks; use select_magnitude")
        bits = m.reshape(-1).contiguous().view(pattern)
        hi = scratch_for(bits)
        if pattern is torch.int16:
            hi.copy_(bits)
        else:
            torch.bitwise_right_shift(bits, 16, out=hi)
        c = torch.bincount(hi, minlength=1 << 15)
        counts = c if counts is None else counts.add_(c)
        n += bits.numel()
        dtype, device = m.dtype, m.device
    if counts is None or not 1 <= r <= n:
        raise ValueError(f"select_magnitude: r={r} outside 1..{n}")
    b, below = _count_to(counts, r)
    if pattern is torch.int16:
        value = torch.tensor(b, dtype=torch.int16, device=device).view(dtype)
        return value, below, int(counts[b])
    low = torch.zeros((1 << 16) + 2, dtype=torch.int64, device=device)
    for m in blocks():
        bits = m.reshape(-1).contiguous().view(torch.int32)
        offset = torch.sub(bits, b << 16, out=scratch_for(bits)).clamp_(-1, 1 << 16).add_(1)
        low.add_(torch.bincount(offset, minlength=(1 << 16) + 2))
    low = low[1:-1]
    lo, below_in = _count_to(low, r - below)
    value = torch.tensor((b << 16) | lo, dtype=torch.int32, device=device).view(torch.float32)
    return value, below + below_in, int(low[lo])


def kth_and_count_above(values: torch.Tensor, k: int) -> tuple[torch.Tensor, int]:
    """The k-th smallest (1-based) of a 1-D tensor of magnitudes and how many entries are
    strictly greater than it (`select_magnitude`; `values` is left as it is)."""
    v, below, equal = select_magnitude(values, k)
    return v, values.numel() - below - equal


def _ties_in_rank(eq: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """Mask of the entries of the boolean `eq` whose rank among the True ones, in flat order
    (0 = the lowest index), lies in [lo, hi)."""
    rank = eq.cumsum(0, dtype=torch.int32 if eq.numel() < 2**31 else torch.int64)  # 1-based at ties
    return eq & (rank > lo) & (rank <= hi)


def _rank_window(mag: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """Boolean mask of the entries of the magnitudes `mag` whose position in a stable ascending
    sort lies in [start, end): entries equal to a boundary value sit in that order by flat index,
    so exactly `end - start` entries are kept. At most two selections by counting (O(n) each,
    whatever the ties) instead of a sort."""
    flat = mag.reshape(-1)
    n = flat.numel()
    start, end = max(start, 0), min(end, n)
    if start >= end:
        return torch.zeros(mag.shape, dtype=torch.bool, device=mag.device)
    keep = torch.ones(n, dtype=torch.bool, device=mag.device)
    boundaries = []
    if start > 0:
        v, below, _ = select_magnitude(flat, start + 1)  # the value at sorted position `start`
        keep &= flat > v
        boundaries.append((v, below))
    if end < n:
        v, below, _ = select_magnitude(flat, end)  # the value at sorted position `end - 1`
        keep &= flat < v
        if not boundaries or bool(v != boundaries[0][0]):
            boundaries.append((v, below))
    # entries equal to a boundary value were all dropped above; put back those whose stable
    # position falls inside the window
    for v, first in boundaries:
        keep |= _ties_in_rank(flat == v, start - first, end - first)
    return keep.view(mag.shape)


def topk_mask(tensor: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of the `k` entries of largest magnitude (ties: lower index first).

    The threshold is the k-th largest magnitude (`select_magnitude`, linear whatever the ties);
    every entry above it is kept, and of the entries equal to it the first ones by index, as a
    stable descending sort would order them. mergekit's full argsort picks an arbitrary member
    of a tie; the two agree whenever there is no tie at the threshold.
    """
    if k <= 0:
        return torch.zeros(tensor.shape, dtype=torch.bool, device=tensor.device)
    mag = tensor.abs().reshape(-1)
    n = mag.numel()
    if k >= n:
        return torch.ones(tensor.shape, dtype=torch.bool, device=tensor.device)
    v, below, equal = select_magnitude(mag, n - k + 1)
    above = n - below - equal
    keep = mag > v
    keep |= _ties_in_rank(mag == v, 0, k - above)
    return keep.view(tensor.shape)


def keep_count(density: float, numel: int) -> int:
    """How many entries magnitude trimming keeps: int(density * numel), but at least one for
    any positive density in a nonempty tensor (mergekit 0.1.5's `magnitude`)."""
    if density <= 0 or numel == 0:
        return 0
    return max(1, int(density * numel))


def magnitude(tensor: torch.Tensor, density: float, rescale: bool = False) -> torch.Tensor:
    """Keep the `int(density * numel)` entries of largest magnitude (TIES "trim").

    Args:
        tensor: a task vector.
        density: fraction to keep; >= 1 returns `tensor` untouched, <= 0 returns zeros, and
            any positive density keeps at least one entry (as mergekit 0.1.5).
        rescale: match the L1 norm of the input afterwards.
    """
    if density >= 1:
        return tensor
    mask = topk_mask(tensor, keep_count(density, tensor.numel()))
    masked = tensor * mask
    return rescale_l1(tensor, masked) if rescale else masked


def magnitude_outliers(
    tensor: torch.Tensor, density: float, gamma: float = 0.01, rescale: bool = False
) -> torch.Tensor:
    """Drop the `gamma` fraction of largest magnitudes, then the smallest ones,
    keeping `int(density * numel)` entries (Model Breadcrumbs).

    If the two cuts together would remove too much, fewer outliers are cut so the
    density is still met.
    """
    if density >= 1:
        return tensor
    n = tensor.numel()
    keep_n = int(density * n)
    n_top = int(gamma * n)
    n_bottom = n - keep_n - n_top
    if n_bottom < 0:
        n_top += n_bottom
        n_bottom = 0
    mask = _rank_window(tensor.abs(), n_bottom, n - n_top)
    masked = tensor * mask
    return rescale_l1(tensor, masked) if rescale else masked


def random_drop(
    tensor: torch.Tensor,
    density: float,
    generator: torch.Generator,
    rescale: bool = True,
) -> torch.Tensor:
    """Keep each entry independently with probability `density` (DARE).

    With `rescale`, the kept entries are scaled so the L1 norm is unchanged; that
    factor is |x|_1 / |kept|_1, whose expectation-matching value is 1/density.
    """
    if density >= 1:
        return tensor
    if density <= 0:
        return torch.zeros_like(tensor)
    mask = torch.rand(tensor.shape, generator=generator, device=tensor.device) < density
    masked = tensor * mask
    return rescale_l1(tensor, masked) if rescale else masked


def rank_sampling(
    tensor: torch.Tensor,
    density: float,
    epsilon: float,
    generator: torch.Generator,
    rescale: bool = True,
) -> torch.Tensor:
    """Drop entries at random with keep probability rising with magnitude rank (DELLA MagPrune).

    Within each row (dim 1; a vector is one row), the entry of rank r among n
    (0 = smallest magnitude) is kept with probability
    `density - epsilon + 2 * epsilon * r / (n - 1)`.
    """
    if density >= 1:
        return tensor
    if density <= 0:
        return torch.zeros_like(tensor)
    if density + epsilon >= 1 or density - epsilon <= 0:
        raise SpecError(
            f"della: density +/- epsilon must lie in (0, 1), got density={density}, "
            f"epsilon={epsilon}; lower epsilon"
        )
    rows = tensor.reshape(1, -1) if tensor.dim() < 2 else tensor
    n = rows.shape[1]
    # Ranking needs a sort; ties are ranked by position (stable).
    order = torch.argsort(rows.abs(), dim=1, stable=True)
    positions = torch.arange(n, device=tensor.device).expand_as(order)
    ranks = torch.empty_like(order).scatter_(1, order, positions)
    if n > 1:
        rank_norm = ranks.to(torch.float32) / (n - 1)
    else:  # a single entry per row has no rank spread; use the middle
        rank_norm = torch.full(ranks.shape, 0.5, device=tensor.device)
    probs = (density - epsilon) + rank_norm * (2 * epsilon)
    mask = torch.rand(probs.shape, generator=generator, device=tensor.device) < probs
    masked = tensor * mask.view(tensor.shape)
    return rescale_l1(tensor, masked) if rescale else masked


def sparsify(
    tensor: torch.Tensor,
    method: Sparsification,
    density: float,
    *,
    rescale: bool = False,
    gamma: float = 0.01,
    epsilon: float = 0.15,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Dispatch to one of the sparsifiers above by mergekit's name for it."""
    if method == "magnitude":
        return magnitude(tensor, density, rescale=rescale)
    if method == "magnitude_outliers":
        return magnitude_outliers(tensor, density, gamma=gamma, rescale=rescale)
    if method in ("random", "della_magprune"):
        if generator is None:
            raise ValueError(f"sparsification {method!r} needs a generator")
        if method == "random":
            return random_drop(tensor, density, generator, rescale=rescale)
        return rank_sampling(tensor, density, epsilon, generator, rescale=rescale)
    raise ValueError(f"unknown sparsification method {method!r}")


def majority_sign(weighted: list[torch.Tensor], method: Consensus = "sum") -> torch.Tensor:
    """Elected sign per entry (TIES "elect"): +1 or -1, zero counting as +1.

    Args:
        weighted: weighted task vectors, one per model.
        method: "sum" takes the sign of the summed values (the TIES paper);
            "count" the sign that most models have.
    """
    if method not in ("sum", "count"):
        raise ValueError(f"unknown consensus method {method!r}")
    # Accumulate rather than stack: one extra tensor, not one per model.
    total = torch.zeros_like(weighted[0])
    for delta in weighted:
        total += delta if method == "sum" else delta.sign()
    return torch.where(total >= 0, 1.0, -1.0).to(weighted[0].dtype)


__all__ = [
    "kth_and_count_above",
    "magnitude",
    "magnitude_outliers",
    "majority_sign",
    "random_drop",
    "rank_sampling",
    "rescale_l1",
    "select_magnitude",
    "select_magnitude_streamed",
    "sparsify",
    "topk_mask",
]
