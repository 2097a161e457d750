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

from typing import ClassVar

import torch

from merges._sparsify import Consensus, Sparsification, majority_sign, sparsify
from weightspace.methods import MergeMethod, Param, TensorParams


def task_vector_params(*, normalize: bool, rescale: bool) -> tuple[Param, ...]:
    """The global parameters every task-vector method takes, with its defaults."""
    return (
        Param("lambda", default=1.0, doc="scale of the merged task vector added to the base"),
        Param(
            "normalize",
            default=normalize,
            kind=bool,
            doc="divide the summed task vectors by the sum of the weights that contributed",
        ),
        Param(
            "rescale",
            default=rescale,
            kind=bool,
            doc="after sparsifying, rescale each task vector to its original L1 norm",
        ),
        Param(
            "int8_mask",
            default=False,
            kind=bool,
            doc="accepted for mergekit compatibility; sign masks are boolean here",
        ),
    )


WEIGHT = Param("weight", required=True, doc="weight of this model's task vector")
DENSITY = Param("density", default=1.0, doc="fraction of the task vector's entries to keep")
GAMMA = Param("gamma", default=0.01, doc="fraction of largest-magnitude entries cut as outliers")
EPSILON = Param(
    "epsilon", default=0.15, doc="spread of keep probabilities around density, by magnitude rank"
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
    weighted = []
    for i, x in enumerate(tensors):
        delta = x - base
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
        weighted.append(delta * weights[i])

    if consensus is not None:
        elected = majority_sign(weighted, consensus)
        mixed = torch.zeros_like(base)
        divisor = torch.zeros_like(base)
        for i in range(n):
            agrees = weighted[i].sign() == elected  # zero entries never agree
            mixed.addcmul_(weighted[i], agrees)
            divisor.add_(agrees, alpha=weights[i])
        divisor[divisor == 0] = 1
    else:
        mixed = weighted[0].clone()
        for delta in weighted[1:]:
            mixed += delta
        total = sum(weights)
        divisor = total if abs(total) >= 1e-8 else 1.0
    if normalize:
        mixed /= divisor
    if lambda_ != 1:
        mixed *= lambda_
    return base + mixed


class TaskVectorMerge(MergeMethod):
    """Base class for the task-vector methods (not registered itself)."""

    uses_base = "required"
    sparsification: ClassVar[Sparsification | None] = None
    consensus: ClassVar[Consensus | None] = None

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
            rescale=params["rescale"],
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
