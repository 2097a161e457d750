"""Fitting a gene to a trained network, training-free, and the report of how well it fits.

    gene = fit_gene(load_space("minilm"))                          # TLEG, x_l = l/6
    gene = fit_gene(load_space("minilm"), mode="sws", stages=[2, 2, 2])
    gene.meta["report"]["relative_residual"]                       # ||theta - fit|| / ||theta||

TLEG fits A, B per tensor entry by least squares over depth (closed form, float64);
SWS takes the mean of each stage's layers. Streamed one suffix at a time in two
passes over its L tensors (sums, then residuals): memory is a few tensors of one
suffix, never the stack.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from weightspace.errors import InputError, SpecError
from weightspace.ir import MemoryRef, TensorRef, WeightSpace
from weightspace.merges.learngene.config_depth import DEPTH_KEYS, find_depth_key
from weightspace.merges.learngene.gene import Gene, _gene_dtype, _gene_meta, gene_name
from weightspace.merges.learngene.layout import (
    _check_denominator,
    _check_mode,
    _source_stages,
    layer_position,
    layer_stages,
)
from weightspace.merges.learngene.stack import _read_stack, _space, _Stack, _where
from weightspace.structure import LayerName

# one layer's tensor of the suffix being fitted, by layer index
_Load = Callable[[int], torch.Tensor]


def fit_line(xs: Sequence[float], load: Callable[[int], torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Least squares over depth of theta_l ~ A + x_l B, per entry, in float64: (A, B).

    `load(l)` returns layer l's tensor; it is called once per layer, so only the sums
    are held. With xbar the mean of x and S = sum_l (x_l - xbar)^2::

        B = sum_l (x_l - xbar) theta_l / S,     A = mean_l theta_l - xbar B

    (the 2x2 normal equations solved in closed form, for every entry at once).
    """
    n = len(xs)
    if n < 2:
        raise InputError("a linear fit over depth needs at least two layers")
    xbar = sum(xs) / n
    sxx = sum((x - xbar) ** 2 for x in xs)
    total: torch.Tensor | None = None
    cross: torch.Tensor | None = None
    for i, x in enumerate(xs):
        t = load(i).to(torch.float64)
        if total is None:
            total, cross = t.clone(), t * (x - xbar)
        else:
            total.add_(t)
            cross.add_(t, alpha=x - xbar)
        del t
    assert total is not None and cross is not None
    b = cross.div_(sxx)
    a = total.div_(n).sub_(b, alpha=xbar)
    return a, b


def _norm(t: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(t.to(torch.float64)))


def _ratio(a: float, b: float) -> float | None:
    if b > 0:
        return a / b
    return 0.0 if a == 0 else None


def fit_gene(model: WeightSpace | str | Path, *, mode: str = "tleg", denominator: str = "L",
             stages: int | Sequence[int] | None = None) -> Gene:
    """Fit a gene to a trained network without training; the residuals are in `meta["report"]`.

        gene = fit_gene(load_space("minilm"))                          # TLEG, x_l = l/6
        gene = fit_gene(load_space("minilm"), mode="sws", stages=[2, 2, 2])
        gene.meta["report"]["relative_residual"]                       # ||theta - fit|| / ||theta||

    TLEG: A, B per suffix from `fit_line` with x_l = l/L (or l/(L-1)); needs L >= 2.
    SWS: stage s's tensor is the mean of the layers assigned to it (`stages`: a count,
    split evenly, or a list adding up to L, every stage with a layer; default min(3, L)
    stages).

    The report: `relative_residual` sqrt(sum_l ||theta_l - fit_l||^2 / sum_l ||theta_l||^2)
    over all layer tensors, `per_layer` the same per layer, and per suffix (`suffixes`,
    a list in layer order) its shape, relative_residual, per_layer residuals, and the
    per-layer norms of the layers (`norms`) and of their fits (`fit_norms`).
    """
    space = _space(model)
    mode = _check_mode(mode)
    where = _where(space)
    stack = _read_stack({n: (r.shape, r.dtype) for n, r in space.items()}, where)
    den, xs, sizes = _fit_form(mode, denominator, stages, stack, where)
    config = space.meta.get("config")
    depth_key = find_depth_key(config, stack.depth)
    if isinstance(config, Mapping) and depth_key is None:
        warnings.warn(f"{where}: config.json has no depth key ({', '.join(DEPTH_KEYS)} or zoo arch.depth) "
                      f"equal to its {stack.depth} layers; expansions will copy it unchanged", stacklevel=2)

    refs: dict[str, TensorRef] = {}
    rows: list[dict[str, Any]] = []
    measured: list[tuple[list[float], list[float]]] = []
    for suffix in stack.suffixes:
        parts, row, norms_and_residuals = _fit_suffix(space, stack, suffix, mode, xs, sizes)
        for n, t in parts.items():
            refs[n] = MemoryRef(n, t)
        rows.append(row)
        measured.append(norms_and_residuals)
    for n in stack.non_layer:
        refs[n] = space[n]
    meta = _gene_meta(
        mode=mode, stack=stack, denominator=den, stages=sizes, config=config, depth_key=depth_key,
        provenance={"method": "fit", "source": where, "created": time.strftime("%Y-%m-%dT%H:%M:%S")},
        report=_fit_report(rows, measured, stack.depth),
    )
    files = dict(space.meta.get("files") or {})
    gspace = WeightSpace(refs, {"source": f"{mode} gene of {where}", "format": "memory", "files": files})
    return Gene(gspace, meta)


def _fit_form(mode: str, denominator: str, stages: int | Sequence[int] | None, stack: _Stack,
              where: str) -> tuple[str | None, list[float] | None, list[int] | None]:
    """(denominator, x_l per layer) for TLEG, or the stage list for SWS, checked against the stack."""
    L = stack.depth
    den = _check_denominator(denominator) if mode == "tleg" else None
    if mode != "tleg":
        return den, None, _source_stages(L, stages)
    if stages is not None:
        raise SpecError("stages apply to sws genes; a tleg gene has none")
    if L < 2:
        raise InputError(f"{where} has {L} layer in {stack.prefix}; TLEG fits theta_l = A + x_l B "
                         f"and needs at least two layers")
    return den, [layer_position(i, L, den) for i in range(L)], None


def _fit_suffix(space: WeightSpace, stack: _Stack, suffix: str, mode: str, xs: list[float] | None,
                sizes: list[int] | None
                ) -> tuple[dict[str, torch.Tensor], dict[str, Any], tuple[list[float], list[float]]]:
    """One per-layer suffix: its gene tensors (in the gene dtype), its report row, and the
    per-layer (norms, residual norms) that the whole-model residual adds up."""
    names = [LayerName(stack.prefix, i, suffix).with_index(i) for i in range(stack.depth)]

    def load(i: int) -> torch.Tensor:
        return space[names[i]].load("cpu", torch.float64)

    if mode == "tleg":
        assert xs is not None
        parts, fitted = _fit_line_of(suffix, xs, load)
    else:
        assert sizes is not None
        parts, fitted = _stage_means(suffix, sizes, load)
    norms, fit_norms, res = _residuals(stack.depth, load, fitted)
    row = {
        "suffix": suffix, "shape": list(stack.shapes[suffix]),
        "relative_residual": _ratio(math.sqrt(sum(r * r for r in res)), math.sqrt(sum(x * x for x in norms))),
        "per_layer": [_ratio(r, x) for r, x in zip(res, norms)],
        "norms": norms, "fit_norms": fit_norms,
    }
    gdt = _gene_dtype(stack.dtypes[suffix])
    return {n: t.to(gdt) for n, t in parts.items()}, row, (norms, res)


def _fit_line_of(suffix: str, xs: list[float], load: _Load) -> tuple[dict[str, torch.Tensor], _Load]:
    """TLEG: (A, B) by least squares, and the fitted layer l, A + x_l B."""
    a, b = fit_line(xs, load)

    def fitted(i: int) -> torch.Tensor:
        return a + xs[i] * b

    return {gene_name("A", suffix): a, gene_name("B", suffix): b}, fitted


def _stage_means(suffix: str, sizes: list[int], load: _Load) -> tuple[dict[str, torch.Tensor], _Load]:
    """SWS: the mean of each stage's layers, and the fitted layer l, its stage's mean."""
    owner = layer_stages(sizes)
    means: list[torch.Tensor | None] = [None] * len(sizes)
    for i in range(len(owner)):
        t = load(i)
        s = owner[i]
        means[s] = t if means[s] is None else means[s].add_(t)
    parts: dict[str, torch.Tensor] = {}
    for s, n in enumerate(sizes):
        m = means[s]
        assert m is not None  # _source_stages: every stage has a layer
        parts[gene_name(s, suffix)] = m.div_(n)

    def fitted(i: int) -> torch.Tensor:
        return parts[gene_name(owner[i], suffix)]

    return parts, fitted


def _residuals(depth: int, load: _Load, fitted: _Load) -> tuple[list[float], list[float], list[float]]:
    """The second pass over the layers: per layer ||theta_l||, ||fit_l|| and ||theta_l - fit_l||."""
    norms, fit_norms, res = [], [], []
    for i in range(depth):
        t = load(i)
        f = fitted(i)
        norms.append(_norm(t))
        fit_norms.append(_norm(f))
        res.append(_norm(t - f))
        del t
    return norms, fit_norms, res


def _fit_report(rows: list[dict[str, Any]], measured: list[tuple[list[float], list[float]]],
                depth: int) -> dict[str, Any]:
    """The whole-model residual, overall and per layer, summed over suffixes in layer order."""
    sq_layer = [0.0] * depth
    sq_res_layer = [0.0] * depth
    for norms, res in measured:
        for i in range(depth):
            sq_layer[i] += norms[i] * norms[i]
            sq_res_layer[i] += res[i] * res[i]
    return {
        "kind": "fit",
        "relative_residual": _ratio(math.sqrt(sum(sq_res_layer)), math.sqrt(sum(sq_layer))),
        "per_layer": [_ratio(math.sqrt(r), math.sqrt(x)) for r, x in zip(sq_res_layer, sq_layer)],
        "suffixes": rows,
    }
