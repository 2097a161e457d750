"""Describe a weight space and compare two, streaming one tensor at a time."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import torch

from weightspace.ir import WeightSpace
from weightspace.safetensors_io import TAGS


def summarize(space: WeightSpace) -> dict[str, Any]:
    """Parameter count, dtypes, files and layer structure (headers only)."""
    dtypes = Counter()
    for r in space.values():
        dtypes[TAGS.get(r.dtype, str(r.dtype))] += r.numel
    files: dict[str, int] = {}
    for r in space.values():
        p = getattr(r, "path", None)
        if p is not None and str(p) not in files:
            files[str(p)] = Path(p).stat().st_size
    st = space.structure()
    cfg = space.meta.get("config") or {}
    return {
        "source": space.source,
        "format": space.meta.get("format"),
        "model_type": cfg.get("model_type"),
        "tensors": len(space),
        "parameters": space.num_params,
        "bytes": space.nbytes,
        "dtypes": dict(dtypes),
        "files": [{"name": Path(k).name, "bytes": v} for k, v in files.items()],
        "layer_stacks": st.stacks,
        "num_layers": st.num_layers,
        "non_layer_tensors": list(st.non_layer),
        "carried_files": sorted(space.meta.get("files") or {}),
    }


def compare(a: WeightSpace, b: WeightSpace, device: str = "cpu") -> dict[str, Any]:
    """Per-tensor cosine similarity and relative difference ||a-b|| / ||a||."""
    rows = []
    only_a = [n for n in a if n not in b]
    only_b = [n for n in b if n not in a]
    mismatched = []
    tot_diff = tot_a = 0.0
    for n, ra in a.items():
        if n not in b:
            continue
        rb = b[n]
        if ra.shape != rb.shape:
            mismatched.append({"name": n, "shape_a": list(ra.shape), "shape_b": list(rb.shape)})
            continue
        x = ra.load(device, torch.float64).reshape(-1)
        y = rb.load(device, torch.float64).reshape(-1)
        na, nb = float(x.norm()), float(y.norm())
        diff = float((x - y).norm())
        cos = float(torch.dot(x, y) / (na * nb)) if na > 0 and nb > 0 else (1.0 if na == nb else 0.0)
        rel = diff / na if na > 0 else (0.0 if diff == 0 else float("inf"))
        tot_diff += diff**2
        tot_a += na**2
        rows.append({"name": n, "cosine": cos, "rel_diff": rel, "max_abs_diff": float((x - y).abs().max()) if x.numel() else 0.0})
    return {
        "a": a.source,
        "b": b.source,
        "tensors": rows,
        "only_in_a": only_a,
        "only_in_b": only_b,
        "shape_mismatch": mismatched,
        "overall_rel_diff": (tot_diff**0.5 / tot_a**0.5) if tot_a > 0 else 0.0,
        "min_cosine": min((r["cosine"] for r in rows), default=None),
    }
