"""Arcee Fusion: take the other model's value only where its change from the
base is an outlier in importance, and keep the base's everywhere else.

    merge_method: arcee_fusion
    base_model: ./base
    models: [{model: ./base}, {model: ./ft_a}]

Per tensor, with a the base and b the other model (mergekit 0.1.5's `arcee_fusion`):

    p, q  = softmax(b) + 1e-8, softmax(a) + 1e-8       over the last dim (a vector: all of it)
    kl    = sum(p log(p / q)) over the last dim          one value per row
    I     = |b - a| * kl                                 importance of each entry
    out   = a + (b - a) [I >= median(I) + 1.5 (Q3(I) - Q1(I))]

The quartiles are order statistics: sorted(I)[floor(q (n - 1))] for q = 0.25,
0.5, 0.75, exactly as mergekit takes them for tensors of up to 10^6 entries.
For larger tensors mergekit estimates them from 10^6 entries drawn at random
(with the global torch generator, so its output changes from run to run);
here they are always exact, found by selection rather than a sort.

Memory: the whole tensor; the importance, two softmaxes and one scratch copy
for the selection (four tensors, float32 for float16/bfloat16 inputs).
Precision: in float16 and bfloat16 the importance is computed in float32
(mergekit's 1e-8 is 0 in float16, so a softmax entry that underflows gives
0 * log 0 = NaN there); the result is a or b, entry by entry.
Arcee AI 2025, "MergeKit v0.1: Arcee Fusion" (release blog post,
https://www.arcee.ai/blog/meet-mergekit-v0-1-arcee-fusion-expanded-model-support-multi-gpu-acceleration).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from weightspace.merges._precision import working_dtype
from weightspace.methods import MergeMethod, TensorParams, register

SOFTMAX_EPS = 1e-8  # added to both distributions before the log ratio (mergekit's value)
QUARTILES = (0.25, 0.5, 0.75)
IQR_FACTOR = 1.5  # Tukey's fence: median + 1.5 IQR


def importance(base: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """|other - base| times the KL divergence of softmax(other) from softmax(base), per row."""
    diff = (other - base).abs()
    p = F.softmax(other, dim=-1) + SOFTMAX_EPS
    q = F.softmax(base, dim=-1) + SOFTMAX_EPS
    kl = torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)
    return diff * kl


def order_statistics(values: torch.Tensor, fractions: tuple[float, ...]) -> list[torch.Tensor]:
    """sorted(values.flatten())[floor(f * (n - 1))] for each f, without sorting.

    >>> [float(v) for v in order_statistics(torch.tensor([4.0, 1.0, 3.0, 2.0, 5.0]), (0.25, 0.5))]
    [2.0, 3.0]
    """
    flat = values.reshape(-1)
    positions = [int(f * (flat.numel() - 1)) for f in fractions]
    if flat.device.type == "cpu" and flat.dtype in (torch.float32, torch.float64):
        scratch = flat.clone().numpy()
        scratch.partition(sorted(set(positions)))  # numpy introselect: every listed position lands
        return [torch.tensor(scratch[i], dtype=flat.dtype) for i in positions]
    return [torch.kthvalue(flat, i + 1).values for i in positions]


def fusion_mask(scores: torch.Tensor) -> torch.Tensor:
    """1.0 where the score reaches median + 1.5 * (Q3 - Q1), 0.0 elsewhere."""
    q1, median, q3 = order_statistics(scores, QUARTILES)
    threshold = median + IQR_FACTOR * (q3 - q1)
    return (scores >= threshold.to(scores.device)).to(scores.dtype)


def arcee_fusion(base: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """`other` where its importance is an outlier, `base` elsewhere; in base's dtype."""
    wd = working_dtype(base.dtype)
    a, b = base.to(wd), other.to(wd)
    mask = fusion_mask(importance(a, b))
    return (a + (b - a) * mask).to(base.dtype)


@register
class ArceeFusion(MergeMethod):
    name = "arcee_fusion"
    pretty_name = "Arcee Fusion"
    paper = "Arcee AI 2025, MergeKit v0.1: Arcee Fusion (release blog post)"
    reference_url = "https://arcee.ai"  # mergekit's; the post: arcee.ai/blog/meet-mergekit-v0-1-...
    uses_base = "required"
    min_models = 1
    max_models = 1

    def merge(
        self,
        name: str,
        base: torch.Tensor | None,
        tensors: list[torch.Tensor],
        params: TensorParams,
        companions: dict[str, list[torch.Tensor]],
    ) -> torch.Tensor:
        assert base is not None, "the planner supplies the base for uses_base='required'"
        return arcee_fusion(base, tensors[0])
