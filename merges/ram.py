"""RAM: merge sparse task vectors by keeping each entry that only one model
changed and averaging the entries that several models changed; RAM+ (tensor
local) also scales up a model's unique entries by how much it overlaps the others.

    merge_method: ramplus_tl          # or ram
    base_model: ./base
    models: [{model: ./agent_a}, {model: ./agent_b}, {model: ./agent_c}]
    parameters: {epsilon: 1.0e-5, r: 0.1, alpha: 0.2}

Per tensor, with task vectors d_i = x_i - base (mergekit 0.1.5's `ram`, `ramplus_tl`):

    changed_ij  |d_ij| > epsilon;   c_j = number of models that changed entry j
    ram         out_j = base_j + sum_i changed_ij d_ij / c_j      (0 where c_j = 0)
    ramplus_tl  model i's unique entries (c_j = 1) are scaled by
                lambda_i = 1 + r * clamp(rho_i, 0, alpha), rho_i = S_i / max(U_i, epsilon),
                with S_i, U_i how many entries of the tensor model i shares (c_j > 1) or
                has alone (c_j = 1); shared entries are averaged as in ram

`ram` is elementwise, so large tensors stream in row blocks; `ramplus_tl`
needs S_i and U_i over the whole tensor first, so large tensors (above the
executor's threshold) stream in two passes: the counts, then the row blocks.
Smaller ones are taken whole: the n task vectors and two masks.

Precision: the arithmetic is mergekit's, in the compute dtype (nothing here
divides by less than 1, so float16 and bfloat16 are safe); lambda_i is
float32, as in mergekit. `ramplus_tl` needs epsilon > 0: it also floors U_i.
Yuan et al. 2026, "Behavior Knowledge Merge in Reinforced Agentic Models" (arXiv:2601.13572).
"""

from __future__ import annotations

import torch

from weightspace.methods import Blocked, MergeMethod, Param, TensorParams, register


def _task_vectors(base: torch.Tensor, tensors: list[torch.Tensor], epsilon: float):
    """(task vectors flat (n, m), changed (n, m), counts (1, m)) for one tensor or row block."""
    flat = torch.stack([x - base for x in tensors], dim=0).view(len(tensors), -1)
    changed = flat.abs() > epsilon
    return flat, changed, changed.sum(dim=0, keepdim=True)


def ram(base: torch.Tensor, tensors: list[torch.Tensor], epsilon: float = 1e-5) -> torch.Tensor:
    """Unique changes kept, shared changes averaged (see the module docstring).

    >>> ram(torch.zeros(3), [torch.tensor([2.0, 1.0, 0.0]), torch.tensor([0.0, 3.0, 0.0])])
    tensor([2., 2., 0.])
    """
    return _combine(base, tensors, epsilon, None)


def unique_scales(shared: torch.Tensor, unique: torch.Tensor, r: float, alpha: float,
                  epsilon: float) -> torch.Tensor:
    """lambda_i = 1 + r * clamp(S_i / max(U_i, epsilon), 0, alpha), float32."""
    rho = shared / unique.clamp(min=epsilon)
    return 1 + r * rho.clamp(min=0, max=alpha)


def overlap_counts(base: torch.Tensor, tensors: list[torch.Tensor], epsilon: float
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(S_i, U_i): per model, how many changed entries it shares with another model / has alone."""
    _, changed, counts = _task_vectors(base, tensors, epsilon)
    return (changed & (counts > 1)).sum(dim=1), (changed & (counts == 1)).sum(dim=1)


def _combine(base: torch.Tensor, tensors: list[torch.Tensor], epsilon: float,
             scales: torch.Tensor | None) -> torch.Tensor:
    flat, changed, counts = _task_vectors(base, tensors, epsilon)
    kept = flat * changed
    unique = kept * (counts == 1)
    if scales is not None:
        unique = unique * scales.to(unique.device).unsqueeze(-1)
    merged = (unique + kept * (counts > 1) / counts.clamp(min=1)).sum(dim=0, keepdim=True)
    return (base + merged.reshape_as(base)).to(base.dtype)


def ramplus_tl(base: torch.Tensor, tensors: list[torch.Tensor], r: float = 0.1, alpha: float = 0.2,
               epsilon: float = 1e-5) -> torch.Tensor:
    """ram with each model's unique entries scaled by lambda_i (see the module docstring).

    >>> ramplus_tl(torch.zeros(3), [torch.tensor([2.0, 1.0, 0.0]), torch.tensor([0.0, 3.0, 0.0])])
    tensor([2.0400, 2.0000, 0.0000])
    """
    shared, unique = overlap_counts(base, tensors, epsilon)
    return _combine(base, tensors, epsilon, unique_scales(shared, unique, r, alpha, epsilon))


EPSILON_DOC = "a task-vector entry counts as changed when its magnitude exceeds this"


@register
class Ram(MergeMethod):
    elementwise = True
    name = "ram"
    pretty_name = "Reinforced Agent Merging"
    paper = "Yuan et al. 2026, Behavior Knowledge Merge in Reinforced Agentic Models"
    reference_url = "https://arxiv.org/abs/2601.13572"
    uses_base = "required"
    global_params = (Param("epsilon", default=1e-5, ge=0.0, doc=EPSILON_DOC),)
    min_models = 1

    def merge(
        self,
        name: str,
        base: torch.Tensor | None,
        tensors: list[torch.Tensor],
        params: TensorParams,
        companions: dict[str, list[torch.Tensor]],
    ) -> torch.Tensor:
        assert base is not None, "the planner supplies the base for uses_base='required'"
        return ram(base, tensors, params["epsilon"])


@register
class RamPlusTensorLocal(MergeMethod):
    name = "ramplus_tl"
    pretty_name = "Reinforced Agent Merging Plus (Tensor-Local)"
    paper = "Yuan et al. 2026, Behavior Knowledge Merge in Reinforced Agentic Models"
    reference_url = "https://arxiv.org/abs/2601.13572"
    uses_base = "required"
    global_params = (
        Param("r", default=0.1, ge=0.0, doc="how much a unique entry is scaled up per unit of rho"),
        Param("alpha", default=0.2, ge=0.0, doc="rho is capped at this"),
        Param("epsilon", default=1e-5, gt=0.0,
              doc=EPSILON_DOC + "; also the floor of the unique count rho divides by"),
    )
    min_models = 1

    def blocked(self, name: str, params: TensorParams, n_models: int) -> Blocked | None:
        """Two passes over a large tensor: S_i and U_i over all its blocks, then the blocks."""
        r, alpha, epsilon = params["r"], params["alpha"], params["epsilon"]

        def prepare(numel: int, sample, blocks) -> torch.Tensor:
            shared = unique = 0
            for b, xs in blocks():
                s, u = overlap_counts(b, xs, epsilon)
                shared, unique = shared + s, unique + u
            return unique_scales(shared, unique, r, alpha, epsilon)

        def merge_block(scales: torch.Tensor, base: torch.Tensor, xs: list[torch.Tensor]) -> torch.Tensor:
            return _combine(base, xs, epsilon, scales)

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
        return ramplus_tl(base, tensors, params["r"], params["alpha"], params["epsilon"])
