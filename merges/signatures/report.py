"""Where a robust fine-tune moved: per-tensor rows (`layer_report`) and per-layer sums
(`layer_summary`), three tensors in memory at a time.

    for row in layer_summary(layer_report(pre, clean, robust)):
        print(row["label"], row["rel_change_robust"], row["rws_fraction"])
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from weightspace.ir import WeightSpace
from weightspace.merges.signatures.formula import robust_weight_signature
from weightspace.merges.signatures.inputs import _check_compatible, _space
from weightspace.structure import depth_t, is_pre_stack, parse_layer, structure_of

# ---------------------------------------------------------------------------------------------
# where a tensor sits in depth


def _layout(names: Sequence[str]) -> dict[str, dict[str, Any]]:
    """name -> {layer, stack, depth, position}. `position` counts in layers of the main
    stack: -1 before the stack, i for layer i, num_layers after it (head, final norm);
    a layer of another stack is placed at the same relative depth."""
    st = structure_of(names)
    n, main = st.num_layers, st.main_prefix
    out: dict[str, dict[str, Any]] = {}
    for name in names:
        ln = parse_layer(name)
        if ln is None:
            pre = is_pre_stack(name)
            out[name] = {"layer": None, "stack": None, "depth": 0.0 if pre else 1.0,
                         "position": -1.0 if pre else float(n)}
            continue
        m = st.stacks[ln.prefix]
        if ln.prefix == main:
            pos = float(ln.index)
        else:
            pos = ln.index * (n - 1) / (m - 1) if m > 1 else 0.0
        out[name] = {"layer": ln.index, "stack": ln.prefix, "depth": depth_t(name, st),
                     "position": pos}
    return out


def _unit_label(position: float, num_layers: int) -> str:
    if position < 0:
        return "pre"
    if position >= num_layers:
        return "post"
    return f"layer {position:g}"


# ---------------------------------------------------------------------------------------------
# the report


def _num(x: float) -> float | None:
    """A JSON-safe number: None where the quantity is undefined (0/0) or infinite."""
    return float(x) if math.isfinite(x) else None


def _ratio(a: float, b: float) -> float | None:
    return _num(a / b) if b > 0 else (0.0 if a == 0 else None)


def layer_report(pretrained: WeightSpace | str | Path, clean: WeightSpace | str | Path,
                 robust: WeightSpace | str | Path) -> list[dict[str, Any]]:
    """Where the robust fine-tune moved, one floating tensor at a time (three tensors in memory).

        for row in layer_report(pre, clean, robust):
            print(row["name"], row["rel_change_robust"], row["rws_share"])

    Each row: name, layer (index in its stack; None for non-layer tensors), stack, depth
    (0 before the stack .. 1 after it), position (in layers of the main stack: -1 before
    it, num_layers after it), numel, pre_norm = ||theta_pre||, robust_norm = ||d_c||,
    clean_norm = ||d_s||, rws_norm = ||RWS_c||, rel_change_robust = ||d_c|| / ||theta_pre||,
    rel_change_clean = ||d_s|| / ||theta_pre||, cos_robust_clean = cos(d_c, d_s), and
    rws_share = ||RWS_c|| / ||d_c|| (the share of the robust change orthogonal to the clean
    change). Undefined ratios (a zero norm below the line) are None.
    """
    pre, std, rob = _space(pretrained), _space(clean), _space(robust)
    _check_compatible({"pretrained": pre, "clean": std, "robust": rob})
    names = [n for n, r in pre.items() if r.dtype.is_floating_point]
    layout = _layout(list(pre))
    return [_tensor_row(name, pre, std, rob, layout[name]) for name in names]


def _tensor_row(name: str, pre: WeightSpace, std: WeightSpace, rob: WeightSpace,
                layout: Mapping[str, Any]) -> dict[str, Any]:
    """One `layer_report` row, computed in float64."""
    p = pre[name].load("cpu", torch.float64)
    dc = rob[name].load("cpu", torch.float64) - p
    ds = std[name].load("cpu", torch.float64) - p
    rws = robust_weight_signature(dc, ds).to(torch.float64)
    pn, cn, sn, rn = (float(torch.linalg.vector_norm(t)) for t in (p, dc, ds, rws))
    dot = float(torch.dot(dc.reshape(-1), ds.reshape(-1)))
    del p, dc, ds, rws
    return {
        "name": name, **layout, "numel": pre[name].numel,
        "pre_norm": pn, "robust_norm": cn, "clean_norm": sn, "rws_norm": rn,
        "rel_change_robust": _ratio(cn, pn), "rel_change_clean": _ratio(sn, pn),
        "cos_robust_clean": _num(dot / (cn * sn)) if cn > 0 and sn > 0 else None,
        "rws_share": _ratio(rn, cn),
    }


def layer_summary(report: Sequence[Mapping[str, Any]], kept: Sequence[str] = ()) -> list[dict[str, Any]]:
    """`layer_report` rows aggregated per layer (tensors at the same depth position), shallow first.

    Each: label ("pre", "layer 0", ..., "post"), position, tensors, numel, rel_change_robust,
    rel_change_clean, cos_robust_clean, rws_norm, rws_share (||RWS|| / ||d_c|| over the
    layer), rws_fraction (the layer's share of the total squared RWS norm), kept ("all",
    "some" or "none" of its tensors in `kept`).
    """
    keep = set(kept)
    num_layers = max((int(r["position"]) for r in report if r.get("layer") is not None), default=-1) + 1
    units: dict[float, list[Mapping[str, Any]]] = {}
    for r in report:
        units.setdefault(float(r["position"]), []).append(r)
    total = sum(r["rws_norm"] ** 2 for r in report)
    return [_layer_row(pos, units[pos], num_layers, total, keep) for pos in sorted(units)]


def _layer_row(pos: float, rows: Sequence[Mapping[str, Any]], num_layers: int, total: float,
               keep: set[str]) -> dict[str, Any]:
    """One `layer_summary` row from the report rows at depth position `pos`."""
    pre2 = sum(r["pre_norm"] ** 2 for r in rows)
    rob2 = sum(r["robust_norm"] ** 2 for r in rows)
    cln2 = sum(r["clean_norm"] ** 2 for r in rows)
    rws2 = sum(r["rws_norm"] ** 2 for r in rows)
    dot = sum((r["cos_robust_clean"] or 0.0) * r["robust_norm"] * r["clean_norm"] for r in rows)
    n_kept = sum(r["name"] in keep for r in rows)
    return {
        "label": _unit_label(pos, num_layers), "position": pos, "tensors": len(rows),
        "numel": sum(r["numel"] for r in rows),
        "rel_change_robust": _ratio(math.sqrt(rob2), math.sqrt(pre2)),
        "rel_change_clean": _ratio(math.sqrt(cln2), math.sqrt(pre2)),
        "cos_robust_clean": _num(dot / math.sqrt(rob2 * cln2)) if rob2 > 0 and cln2 > 0 else None,
        "rws_norm": math.sqrt(rws2), "rws_share": _ratio(math.sqrt(rws2), math.sqrt(rob2)),
        "rws_fraction": _ratio(rws2, total),
        "kept": "all" if n_kept == len(rows) else ("some" if n_kept else "none"),
    }
