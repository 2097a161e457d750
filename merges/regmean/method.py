"""The RegMean merge: per linear layer, the weights that best reproduce every model's outputs
on its own inputs, from the models' Gram files (one layer's Grams loaded at a time).

    W* = (sum_i w_i G~_i)^-1 sum_i w_i G~_i W_i^T      in the (out, in) layout

A GPT-2 Conv1D weight, stored (in, out), is transposed into that layout and back; a
convolution's (out, in, *kernel) is reshaped to (out, in * prod(kernel)) and back. Which
layout a Gram belongs to is the Gram file's `layouts` record (a square Conv1D cannot be told
from a Linear by shapes). Tensors without a Gram (biases, norms, embeddings, tied or unused
layers) are the `weight`-weighted average.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from weightspace.errors import InputError, SpecError
from weightspace.ir import WeightSpace
from weightspace.merges.regmean.files import gram_info
from weightspace.merges.regmean.layers import LAYOUTS, describe_skipped
from weightspace.methods import MergeMethod, Param, TensorParams, register

# eigenvalues of the summed Gram below n_inputs * this times the largest count as 0 (rank-deficient)
RCOND_PER_INPUT = 1e-13
# relative asymmetry |G - G^T|_max / |G|_max a Gram companion may have (float32 rounding)
SYMMETRY_TOL = 1e-4
# float64 elements of one block of output rows in the solve (8M: 64 MiB)
BLOCK_ELEMENTS = 2**23


def shrink_off_diagonal(gram: torch.Tensor, alpha: float) -> torch.Tensor:
    """alpha * G + (1 - alpha) * diag(G): off-diagonal entries scaled by alpha, diagonal kept.

    >>> shrink_off_diagonal(torch.tensor([[4.0, 2.0], [2.0, 1.0]]), 0.5)
    tensor([[4., 1.],
            [1., 1.]])
    """
    out = gram * alpha
    out.diagonal().copy_(gram.diagonal())
    return out


def regmean_solve(
    weights_: list[torch.Tensor], grams: list[torch.Tensor], coeffs: list[float], alpha: float
) -> torch.Tensor:
    """(sum_i c_i G~_i)^-1 sum_i c_i G~_i W_i^T, transposed back to W's (out, in); in float64.

    Solved as a correction to the weighted average W_avg: A D = sum_i c_i G~_i (W_i - W_avg)^T,
    W* = W_avg + D^T. When A is singular (an input direction none of the models' data reaches),
    the least-squares D of least norm keeps W_avg in that direction.

    >>> g = torch.eye(2)
    >>> regmean_solve([torch.ones(1, 2), torch.zeros(1, 2)], [g, g], [1.0, 1.0], 1.0)
    tensor([[0.5000, 0.5000]])
    """
    total = float(sum(coeffs))
    n_out, n_in = weights_[0].shape
    step = max(1, BLOCK_ELEMENTS // max(n_in, 1))  # output rows per block: an lm_head has 32000+

    def avg_rows(r: slice) -> torch.Tensor:
        return sum(c * w[r].double() for c, w in zip(coeffs, weights_)) / total

    a = torch.zeros_like(grams[0], dtype=torch.float64)
    rhs = torch.zeros(n_in, n_out, dtype=torch.float64, device=weights_[0].device)
    for c, g, w in zip(coeffs, grams, weights_):
        # one float64 (in, in) buffer per model at a time, shrunk in place: at 11008 inputs each
        # is ~1 GB, so no copy more than the sum, its factor and this one
        gt = g.to(torch.float64, copy=True)
        diag = gt.diagonal().clone()
        gt.mul_(alpha).diagonal().copy_(diag)
        a.add_(gt, alpha=c)
        for i in range(0, n_out, step):
            r = slice(i, i + step)
            rhs[:, r].addmm_(gt, (w[r].double() - avg_rows(r)).T, alpha=c)
        del gt
    scale = float(a.diagonal().abs().max())
    chol, info = torch.linalg.cholesky_ex(a)
    d = chol.diagonal()
    rcond = a.shape[0] * RCOND_PER_INPUT
    well_posed = scale > 0 and int(info) == 0 and float((d.min() / d.max()) ** 2) > rcond
    if not well_posed and scale > 0:
        # rank-deficient: gelsd (SVD) exists on CPU only. Directions whose eigenvalue is below
        # rcond * the largest are rounding, not data (the same boundary as the Cholesky test
        # above); with lstsq's own rcond (eps * n) a duplicated input's Gram, whose entries
        # differ by the summation order's rounding, came out rank 2 or 1 from run to run.
        rhs = torch.linalg.lstsq(a.cpu(), rhs.cpu(), rcond=rcond, driver="gelsd").solution.to(a.device)
    out = torch.empty_like(weights_[0])
    for i in range(0, n_out, step):
        r = slice(i, i + step)
        if well_posed:
            delta = torch.cholesky_solve(rhs[:, r], chol)
        elif scale == 0:
            delta = torch.zeros_like(rhs[:, r])  # no data reached this layer in any model
        else:
            delta = rhs[:, r]  # solved above
        out[r] = (avg_rows(r) + delta.T).to(out.dtype)
    return out


def _layout(name: str, paths: list[str]) -> str | None:
    """The layout (linear, conv1d, conv) the Gram files record for weight `name`; None when
    none records one (files written before layouts were); an InputError when they disagree."""
    found: dict[str, str] = {}
    for p in paths:
        lay = gram_info(p).get("layouts", {}).get(name)
        if lay is not None:
            if lay not in LAYOUTS:
                raise InputError(f"regmean: {p!r} records layout {lay!r} for tensor {name!r}; "
                                 f"expected one of {', '.join(LAYOUTS)}")
            found[p] = lay
    if len(set(found.values())) > 1:
        (p1, l1), (p2, l2) = list(found.items())[:2]
        raise InputError(f"regmean: tensor {name!r} is a {l1} layer in {p1!r} but a {l2} layer in "
                         f"{p2!r}; are the Grams for the same architecture?")
    return next(iter(found.values()), None)


def _unused(name: str, path: str) -> bool:
    layer = name[:-len(".weight")] if name.endswith(".weight") else name
    return gram_info(path).get("skipped", {}).get(layer) == "unused"


def _check_gram(g: torch.Tensor, name: str, path: str) -> None:
    if not bool(torch.isfinite(g).all()):
        raise InputError(f"regmean: Gram matrix for tensor {name!r} in {path!r} has NaN/Inf values; "
                         f"recompute it")
    scale = float(g.abs().max())
    n, step = g.shape[0], 1024  # in row blocks: no (in, in) temporaries beside the Gram
    asym = max((float((g[i:i + step] - g[:, i:i + step].T).abs().max()) for i in range(0, n, step)),
               default=0.0)
    if scale > 0 and asym > SYMMETRY_TOL * scale:
        raise InputError(f"regmean: Gram matrix for tensor {name!r} in {path!r} is not symmetric, "
                         f"so it is not X^T X; is it a Gram file?")
    if bool((g.diagonal() < 0).any()):
        raise InputError(f"regmean: Gram matrix for tensor {name!r} in {path!r} has negative diagonal "
                         f"entries, so it is not X^T X; is it a Gram file?")


@register
class RegMean(MergeMethod):
    name = "regmean"
    pretty_name = "RegMean"
    paper = "Jin et al. 2023, Dataless Knowledge Fusion by Merging Weights of Language Models"
    reference_url = "https://arxiv.org/abs/2212.09849"
    uses_base = "none"
    companions = ("gram",)
    companion_optional = True
    global_params = (
        Param("alpha", default=0.1, ge=0.0, le=1.0,
              doc="off-diagonal scale of each Gram: alpha*G + (1-alpha)*diag(G); 1 = exact regression, "
                  "0 = per-feature weighted average (default 0.1, the authors' emotion and NER configs; "
                  "their code's default and GLUE configs: 1)"),
    )
    model_params = (
        Param("weight", default=1.0, ge=0.0,
              doc="this model's weight: scales its Grams in the regression and its tensors in the "
                  "average used for tensors without Grams"),
        Param("gram", required=True, kind=str,
              doc="this model's Gram matrices: a .safetensors file or a directory (wsmerge gram)"),
    )

    def __init__(self) -> None:
        # weight name -> layout, read from the Gram files by check_params just before the
        # planner asks companion_shape (which is not told the file); merge reads them itself
        self._layouts: dict[str, str] = {}

    def companion_shape(self, companion: str, name: str, shape: tuple[int, ...]) -> tuple[int, ...] | None:
        # a weight may have an (in, in) Gram; whether it does is the Gram file's say
        if companion != "gram" or not name.endswith("weight") or len(shape) < 2:
            return None
        if len(shape) == 2:
            d = shape[0] if self._layouts.get(name) == "conv1d" else shape[1]
            return (d, d)
        d = math.prod(shape[1:])  # a convolution (out, in, *kernel): Gram of its unfolded patches
        return (d, d)

    def check_params(self, params: TensorParams, where: list[str]) -> None:
        if sum(params.model_values("weight")) == 0:
            raise SpecError("regmean: the weights sum to 0; give at least one model a positive weight")
        name = params.tensor_name
        if name and name.endswith("weight"):
            layout = _layout(name, [str(p) for p in params.model_values("gram") if p is not None])
            if layout is not None:
                self._layouts[name] = layout
            else:
                self._layouts.pop(name, None)  # nothing recorded: never a previous merge's say

    def plan_notes(self, companions: dict[str, WeightSpace]) -> list[str]:
        """Name the layers each Gram file records as skipped (tied, unused, grouped or 3-D
        convolutions): the merge averages their weights."""
        by_skipped: dict[str, list[str]] = {}
        for key, space in companions.items():
            path = Path(space.meta.get("location") or key)
            try:
                info = gram_info(path)
            except InputError:
                continue  # a note only: the merge itself reports a bad file
            skipped = info.get("skipped")
            if isinstance(skipped, dict) and skipped and all(
                    isinstance(k, str) and isinstance(v, str) for k, v in skipped.items()):
                by_skipped.setdefault(json.dumps(skipped, sort_keys=True), []).append(path.name)
        return [f"regmean: {', '.join(files)} hold no Gram for " + "; ".join(describe_skipped(json.loads(k)))
                + "; those weights are the weighted average" for k, files in by_skipped.items()]

    def merge(
        self,
        name: str,
        base: torch.Tensor | None,
        tensors: list[torch.Tensor],
        params: TensorParams,
        companions: dict[str, list[torch.Tensor]],
    ) -> torch.Tensor:
        coeffs = [float(w) for w in params.model_values("weight")]
        for i, c in enumerate(coeffs):
            if c < 0:
                raise SpecError(f"regmean: models[{i}] weight is {c:g}; weights must be >= 0")
        if sum(coeffs) <= 0:
            raise SpecError("regmean: the weights sum to 0; give at least one model a positive weight")
        alpha = float(params["alpha"])
        if not 0.0 <= alpha <= 1.0:
            raise SpecError(f"regmean: alpha must be in [0, 1], got {alpha:g}")
        grams = list(companions.get("gram") or [None] * len(tensors))
        paths = params.model_values("gram")
        for i, p in enumerate(paths):  # a directory's zeros for a layer its forward never reached
            if grams[i] is not None and _unused(name, str(p)):
                grams[i] = None
        have = [g is not None for g in grams]
        if not any(have):
            total = sum(coeffs)
            out = tensors[0] * (coeffs[0] / total)
            for t, c in zip(tensors[1:], coeffs[1:]):
                out.add_(t, alpha=c / total)
            return out
        if not all(have):
            missing = [p for p, h in zip(paths, have) if not h]
            found = [p for p, h in zip(paths, have) if h]
            raise InputError(f"regmean: tensor {name!r} has a Gram matrix in {found[0]!r} but none in "
                             f"{missing[0]!r}; take every model's Grams over the same layers")
        for g, p in zip(grams, paths):
            _check_gram(g, name, p)
        layout = _layout(name, [str(p) for p in paths]) or ("conv" if tensors[0].dim() > 2 else "linear")
        shape = tensors[0].shape
        if layout == "conv1d":  # stored (in, out)
            ws = [t.T for t in tensors]
        else:
            ws = [t.reshape(shape[0], -1) for t in tensors]
        if tuple(grams[0].shape) != (ws[0].shape[1],) * 2:
            raise InputError(f"regmean: Gram matrix for tensor {name!r} in {paths[0]!r} is "
                             f"{list(grams[0].shape)}, but the {layout} weight {list(shape)} has "
                             f"{ws[0].shape[1]} inputs; is it for another model?")
        out = regmean_solve(ws, grams, coeffs, alpha)
        return out.T.contiguous() if layout == "conv1d" else out.reshape(shape)


