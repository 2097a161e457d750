"""The Fisher-weighted average and the `fisher` merge method."""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch

from weightspace.errors import InputError, SpecError
from weightspace.merges.fisher.files import _check_values, fisher_norms
from weightspace.methods import MergeMethod, Param, TensorParams, register
from weightspace.paths import expand_user
from weightspace.sources import load_space

FLOOR_MODES = ("max", "add")


def fisher_weighted_average(tensors: list[torch.Tensor], fishers: list[torch.Tensor],
                            coefficients: list[float], floor: float = 1e-6,
                            favor_target: bool = True, floor_mode: str = "max") -> torch.Tensor:
    """sum_i c_i F~_i x_i / sum_i c_i F~_i, in float32 at least.

    F~_i is max(F_i, floor) (`floor_mode="max"`, the authors' `tf.maximum`) or F_i + floor
    (`"add"`), for the first model (the target) only under `favor_target` (the other models
    keep F_i as it is), else for every model. With `favor_target`, an entry no other
    Fisher weighs keeps the target's value. An entry where sum_i c_i F~_i is 0 (the target's
    weight is 0 and no donor's Fisher reaches it, or floor 0) is sum_i c_i x_i / sum_i c_i.

    >>> fisher_weighted_average([torch.tensor([0.0]), torch.tensor([4.0])],
    ...                         [torch.tensor([1.0]), torch.tensor([3.0])], [1.0, 1.0], floor=0.0)
    tensor([3.])
    """
    if floor_mode not in FLOOR_MODES:
        raise SpecError(f"floor_mode: unknown {floor_mode!r}; use {' or '.join(FLOOR_MODES)}")
    work = torch.promote_types(tensors[0].dtype, torch.float32)
    num = torch.zeros(tensors[0].shape, dtype=work, device=tensors[0].device)
    den = torch.zeros_like(num)
    for i, (x, f, c) in enumerate(zip(tensors, fishers, coefficients)):
        w = f.to(work)
        if i == 0 or not favor_target:
            w = w.clamp(min=floor) if floor_mode == "max" else w + floor
        w = w * c
        num.addcmul_(w, x.to(work))
        den.add_(w)
    zero = den == 0
    if not bool(zero.any()):
        return (num / den).to(tensors[0].dtype)
    # No model with a positive weight has a Fisher there (a zero-weight target under
    # favor_target, the grid end the authors' search tries, or fisher_floor 0): the authors'
    # code divides 0 by 0; we take the weighted average, which at target weight 0 is the donors'.
    total = float(sum(coefficients))
    if total <= 0:
        raise InputError(f"the weighted Fishers sum to 0 at {int(zero.sum())} entries and the "
                         f"weights sum to {total:g}; give a model a positive weight")
    avg = sum(c * x.to(work) for c, x in zip(coefficients, tensors)) / total
    return torch.where(zero, avg, num / den.masked_fill(zero, 1.0)).to(tensors[0].dtype)


UNCOVERED = ("average", "first")


@register
class Fisher(MergeMethod):
    elementwise = True
    name = "fisher"
    pretty_name = "Fisher merging"
    paper = "Matena & Raffel 2022, Merging Models with Fisher-Weighted Averaging"
    reference_url = "https://arxiv.org/abs/2111.09832"
    uses_base = "none"
    companions = ("fisher",)
    companion_optional = True  # a Fisher may leave tensors out (a new head): see `uncovered`
    # defaults: the authors' (model_merging/merging.py and scripts/merge_and_evaluate.py)
    global_params = (
        Param("fisher_floor", default=1e-6, ge=0.0, doc="the least weight a Fisher entry gets (the first "
              "model's only under favor_target), so no entry has zero total weight (authors: 1e-6)"),
        Param("floor_mode", default="max", kind=str, choices=FLOOR_MODES,
              doc="'max': max(F, fisher_floor), as the authors' code; 'add': F + fisher_floor"),
        Param("normalize_fishers", default=True, kind=bool,
              doc="divide each weight by the L2 norm of that model's whole Fisher (authors: on)"),
        Param("favor_target", default=True, kind=bool,
              doc="the first model is the target: only its Fisher gets the floor, so entries no "
                  "other Fisher weighs keep its value (the authors' favor_target_model, on)"),
        Param("uncovered", default="average", kind=str, choices=UNCOVERED,
              doc="tensors no Fisher covers: 'average' (weighted average) or 'first' (first model's)"),
    )
    model_params = (
        Param("weight", default=1.0, ge=0.0, doc="lambda_i, this model's weight"),
        Param("fisher", required=True, kind=str, doc="path to this model's Fisher diagonal "
              "(a safetensors file or a sharded directory with the model's tensor names; see "
              "wsmerge fisher)"),
        Param("fisher_norm", default=None, gt=0.0, doc="the norm normalize_fishers divides by; computed "
              "from the file when absent (weightspace.merges.fisher.fisher_norms)"),
    )

    def check_params(self, params: TensorParams, where: list[str]) -> None:
        if sum(params.model_values("weight")) == 0:
            raise SpecError("fisher: the weights sum to 0; give at least one model a positive weight")

    def merge(
        self,
        name: str,
        base: torch.Tensor | None,
        tensors: list[torch.Tensor],
        params: TensorParams,
        companions: dict[str, list[torch.Tensor]],
    ) -> torch.Tensor:
        fishers = companions.get("fisher") or [None] * len(tensors)
        files = [pm.get("fisher") for pm in params.per_model]
        weights = params.model_values("weight")
        floor = params["fisher_floor"]
        if floor < 0 or not math.isfinite(floor):
            raise SpecError(f"parameters.fisher_floor: expected a finite number >= 0, got {floor}")
        if params["uncovered"] not in UNCOVERED:
            raise SpecError(f"parameters.uncovered: unknown {params['uncovered']!r}; "
                            f"use {' or '.join(UNCOVERED)}")
        for i, w in enumerate(weights):
            if w < 0 or not math.isfinite(w):
                raise SpecError(f"fisher: the weight of model {i} is {w}; Fisher merging needs "
                                f"weights >= 0")
        if sum(weights) == 0:
            raise SpecError("fisher: the weights sum to 0; give at least one model a positive weight")
        coefficients = list(weights)
        if params["normalize_fishers"]:
            coefficients = [w / self._norm(i, params) for i, w in enumerate(weights)]
        covered = [f is not None for f in fishers]
        if not any(covered):
            if params["uncovered"] == "first":
                return tensors[0]
            work = torch.promote_types(tensors[0].dtype, torch.float32)
            out = sum(c * x.to(work) for c, x in zip(coefficients, tensors)) / sum(coefficients)
            return out.to(tensors[0].dtype)
        if not all(covered):
            i = covered.index(False)
            j = covered.index(True)
            raise InputError(f"Fisher file {files[i]!r} (model {i}) has no tensor {name!r}, but "
                             f"{files[j]!r} (model {j}) does; compute every model's Fisher over the "
                             f"same tensors")
        for f, file in zip(fishers, files):
            _check_values(f, name, f"Fisher file {file!r}")
            # an all-zero file would silently drop its model (only the floor would weigh it);
            # its norm is read once per file and process (cached)
            if file and Path(file).exists() and fisher_norms([file])[0] == 0:
                raise InputError(f"Fisher file {file!r} is zero everywhere (no gradient reached the "
                                 f"model's parameters); recompute it on data the model sees")
        try:
            return fisher_weighted_average(tensors, fishers, coefficients, floor,
                                           params["favor_target"], params["floor_mode"])
        except InputError as e:
            raise InputError(f"tensor {name!r}: {e}") from None

    @staticmethod
    def _norm(i: int, params: TensorParams) -> float:
        """Model i's whole-Fisher L2 norm: given in the spec, or read once from its file."""
        pm = params.per_model[i]
        norm = pm.get("fisher_norm")
        if norm is None:
            path = expand_user(pm["fisher"])
            if not path.exists():
                raise SpecError(
                    f"normalize_fishers: Fisher file {pm['fisher']!r} (model {i}) is not found from "
                    f"the working directory {os.getcwd()}, so its norm cannot be computed; give an "
                    f"absolute path, or set fisher_norm in that model's parameters "
                    f"(python -c 'from weightspace.merges.fisher import fisher_norms; print(fisher_norms([...]))')")
            norm = fisher_norms([path])[0]
            if not math.isfinite(norm):  # name the tensor, as the per-tensor check would
                for tname, ref in load_space(path).items():
                    _check_values(ref.load("cpu"), tname, f"Fisher file {pm['fisher']!r}")
                raise InputError(f"normalize_fishers: Fisher file {pm['fisher']!r} (model {i}) has "
                                 f"no finite norm; recompute it")
            if norm == 0:
                raise InputError(f"Fisher file {pm['fisher']!r} is zero everywhere (no gradient reached "
                                 f"the model's parameters), so normalize_fishers cannot divide by its "
                                 f"norm; recompute it on data the model sees")
        if not (norm > 0 and math.isfinite(norm)):
            raise SpecError(f"fisher_norm of model {i}: expected a positive number, got {norm}")
        return norm
