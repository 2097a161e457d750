"""SCE: select the positions where the task vectors vary most across models,
calculate one weight per model from its task vector's mean square, erase the
entries that disagree with the elected sign, then average what is left.

    merge_method: sce
    base_model: ./base
    models: [{model: ./ft_a}, {model: ./ft_b}, {model: ./ft_c}]
    parameters: {select_topk: 0.5}

Per tensor, with task vectors d_i = x_i - base (mergekit 0.1.5's `sce`):

    select     if select_topk < 1: keep, in every d_i, the k = int(nonzero * select_topk)
               positions of largest variance v_j = mean_i (d_ij - mean_i d_ij)^2, where
               nonzero counts the positions with v_j != 0 (torch.topk picks among ties,
               as in mergekit); zero elsewhere
    calculate  w_i = s_i / sum_i s_i with s_i = mean_j d_ij^2; uniform 1/n when
               sum_i s_i < 1e-6 (an absolute floor: n task vectors with an RMS below
               1e-3 / sqrt(n), typical of LLM fine-tunes, get equal weights)
    erase      m_ij = [sign(d_ij) == elected_j], elected_j = +1 where sum_i d_ij >= 0, else -1
    out        base + sum_i w_i m_ij d_ij / max(sum_i w_i m_ij, 1e-6)

There are no per-model weights or densities: mergekit's `sce` takes none.
`int8_mask` is accepted as in mergekit and changes nothing (a mask's dtype).

Memory: a tensor up to the executor's threshold (128 MiB per input) is taken
whole: the task vectors stacked (n copies) plus about two more of that size.
A larger one streams: a pass for the variance of every position (with
select_topk < 1; one float32 per entry, then one bool per entry for the kept
set), a pass for the models' mean squares, then the row blocks.

Precision: in float16 and bfloat16 everything is computed in float32 and
rounded once at the end. mergekit works in float16 there: its rounded task
vectors flip the elected sign where the models' changes nearly cancel (the
entry then jumps from one side's mean to the other's), entries below ~1.7e-4
square to 0 and variances below 3e-8 round to 0 (which lowers nonzero, so k).
Wan et al. 2024, "FuseChat: Knowledge Fusion of Chat Models" (arXiv:2408.07990).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from weightspace.merges._precision import working_dtype
from weightspace.methods import Blocked, MergeMethod, Param, TensorParams, register

WEIGHT_SUM_FLOOR = 1e-6  # below it the models are weighted equally (mergekit's value)
DIVISOR_FLOOR = 1e-6  # smallest divisor of the weighted sum (mergekit's value)


def task_vectors(base: torch.Tensor, tensors: list[torch.Tensor]) -> torch.Tensor:
    """d_i = x_i - base, stacked along a new dim 0, in the working dtype."""
    b = base.to(working_dtype(base.dtype))
    return torch.stack([x.to(b.dtype) - b for x in tensors], dim=0)


def kept_positions(variance: torch.Tensor, select_topk: float) -> torch.Tensor:
    """1 at the `int(nonzero * select_topk)` positions of largest variance, 0 elsewhere.

    >>> kept_positions(torch.tensor([1.0, 0.25, 0.0]), 0.5)  # k = int(2 * 0.5)
    tensor([1., 0., 0.])
    """
    if select_topk <= 0:
        return torch.zeros_like(variance)
    if select_topk >= 1:
        return torch.ones_like(variance)
    # k as mergekit computes it: a float32 product of the count and the fraction
    k = int(torch.count_nonzero(variance) * select_topk)
    mask = torch.zeros_like(variance)
    if k == 0:
        return mask
    _, indices = torch.topk(variance.abs().reshape(-1), k=k, largest=True)
    mask.view(-1)[indices] = 1
    return mask


def variance_mask(task_vectors: torch.Tensor, select_topk: float) -> torch.Tensor:
    """`kept_positions` of the task vectors' population variance across models (dim 0)."""
    if not 0 < select_topk < 1:
        return kept_positions(task_vectors[0], select_topk)
    return kept_positions(torch.var(task_vectors, dim=0, correction=0), select_topk)


def weights_from_mean_squares(mean_squares: torch.Tensor) -> torch.Tensor:
    """w_i = s_i / sum_i s_i, or 1/n each when that sum is below 1e-6."""
    total = torch.sum(mean_squares).item()
    if abs(total) < WEIGHT_SUM_FLOOR:
        return torch.ones_like(mean_squares) / mean_squares.shape[0]
    return mean_squares / total


def elected_agreement(task_vectors: torch.Tensor) -> torch.Tensor:
    """m_ij: True where d_ij has the sign of sum_i d_ij (a zero sum elects +; a zero entry
    agrees with neither)."""
    majority = (task_vectors.sum(dim=0) >= 0).to(task_vectors.dtype) * 2 - 1
    return task_vectors.sign() == majority


def combine(base: torch.Tensor, task_vectors: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """base + sum_i w_i m_ij d_ij / max(sum_i w_i m_ij, 1e-6), in base's dtype."""
    agree = elected_agreement(task_vectors)
    erased = weights.reshape(-1, *([1] * (task_vectors.dim() - 1))) * agree
    merged = (task_vectors * erased).sum(dim=0)
    out = base.to(task_vectors.dtype) + merged / torch.sum(erased, dim=0).clamp(min=DIVISOR_FLOOR)
    return out.to(base.dtype)


def sce(base: torch.Tensor, tensors: list[torch.Tensor], select_topk: float = 1.0) -> torch.Tensor:
    """SCE-merge `tensors` onto `base` (see the module docstring); returns base's dtype.

    >>> base = torch.zeros(3)
    >>> sce(base, [torch.tensor([1.0, 2.0, -1.0]), torch.tensor([3.0, -2.0, -1.0])])
    tensor([ 2.4000,  2.0000, -1.0000])
    """
    tvs = task_vectors(base, tensors)
    if select_topk < 1:
        tvs = tvs * variance_mask(tvs, select_topk).unsqueeze(0)
    mean_squares = tvs.square().reshape(tvs.shape[0], -1).mean(dim=1)
    return combine(base, tvs, weights_from_mean_squares(mean_squares))


@dataclass
class _Streamed:
    """What the row blocks of one large tensor need: the kept positions (flat, or None for
    all), the model weights, and how far into the tensor the blocks have got."""

    kept: torch.Tensor | None
    weights: torch.Tensor
    offset: int = 0


def sce_blocked(n_models: int, select_topk: float) -> Blocked:
    """SCE over row blocks: the variance of every position (one float32 per entry, held
    until the tensor is done) and the kept set, the models' mean squares, then the blocks."""

    def prepare(numel: int, sample, blocks) -> _Streamed:
        kept = None
        if select_topk < 1:
            variance = torch.cat([torch.var(task_vectors(b, xs), dim=0, correction=0).reshape(-1)
                                  for b, xs in blocks()])
            kept = kept_positions(variance, select_topk).to(torch.bool)
            del variance
        squares = torch.zeros(n_models, dtype=torch.float64)
        offset = 0
        for b, xs in blocks():
            tvs = task_vectors(b, xs).reshape(n_models, -1)
            if kept is not None:
                tvs = tvs * kept[offset : offset + tvs.shape[1]]
            offset += tvs.shape[1]
            squares += tvs.square().sum(dim=1, dtype=torch.float64)
        wd = working_dtype(b.dtype)
        return _Streamed(kept, weights_from_mean_squares((squares / numel).to(wd)))

    def merge_block(st: _Streamed, base: torch.Tensor, xs: list[torch.Tensor]) -> torch.Tensor:
        tvs = task_vectors(base, xs)
        if st.kept is not None:
            rows = st.kept[st.offset : st.offset + base.numel()].to(tvs.device, tvs.dtype)
            tvs = tvs * rows.view(base.shape).unsqueeze(0)
        st.offset += base.numel()
        return combine(base, tvs, st.weights.to(tvs.device))

    return Blocked(prepare, merge_block)


@register
class Sce(MergeMethod):
    name = "sce"
    pretty_name = "SCE"
    paper = "Wan et al. 2024, FuseChat: Knowledge Fusion of Chat Models"
    reference_url = "https://arxiv.org/abs/2408.07990"
    uses_base = "required"
    global_params = (
        Param("select_topk", default=1.0, ge=0.0, le=1.0,
              doc="fraction of positions kept, those whose task-vector variance across models is "
                  "largest (1: keep all)"),
        Param("int8_mask", default=False, kind=bool,
              doc="accepted for mergekit compatibility; changes nothing"),
    )
    min_models = 1

    def blocked(self, name: str, params: TensorParams, n_models: int) -> Blocked | None:
        return sce_blocked(n_models, params["select_topk"])

    def merge(
        self,
        name: str,
        base: torch.Tensor | None,
        tensors: list[torch.Tensor],
        params: TensorParams,
        companions: dict[str, list[torch.Tensor]],
    ) -> torch.Tensor:
        assert base is not None, "the planner supplies the base for uses_base='required'"
        return sce(base, tensors, params["select_topk"])
