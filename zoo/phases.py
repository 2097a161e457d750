"""Phase diagrams of a zoo: metrics over a load-like axis (width) and a temperature-like axis (batch size).

    cells = phase_grid(rows, x="batch_size", y="width")       # averaged over seeds and other axes
    plot_phases(cells, "phases.png")

The taxonomy is Yang et al., "Taxonomizing local versus global structure in
neural network loss landscapes" (NeurIPS 2021), as used by the phase-transition
model-zoo work: whether the models fit the training data (train loss below a
threshold), whether seeds are mode-connected (mc), and how similar their
representations are (CKA):

    phase I     underfit,  poorly connected (mc < -eps)
    phase II    underfit,  connected        (mc >= -eps)
    phase III   fit,       poorly connected (mc < -eps)
    phase IV-A  fit,       connected,  CKA below cka_threshold
    phase IV-B  fit,       connected,  CKA at or above cka_threshold

The thresholds are knobs (`PhaseRules`): the paper's boundaries are not sharp,
and where they sit depends on the dataset; a diagram shows the raw metrics
beside the labels so a reader can judge.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from weightspace.errors import InputError
from weightspace.extras import pyplot

PANELS = (
    ("test_acc", "test accuracy", False),
    ("train_loss", "train loss", True),
    ("hessian_trace", "Hessian trace", True),
    ("hessian_top_eig", "Hessian top eigenvalue", True),
    ("mc_bezier", "mode connectivity mc (Bezier)", False),
    ("cka", "logit CKA between seeds", False),
)


@dataclass(frozen=True)
class PhaseRules:
    fit_loss: float = 0.05          # train loss below this: the models fit the data
    mc_eps: float = 0.05            # |mc| below this (in loss units): mode-connected
    cka_threshold: float = 0.9      # IV-A below, IV-B at or above


def classify(cell: Mapping[str, float | None], rules: PhaseRules = PhaseRules()) -> str | None:
    """The phase of one cell from its averaged train_loss, mc and cka (None if metrics are missing)."""
    loss, mc, cka = cell.get("train_loss"), cell.get("mc_bezier"), cell.get("cka")
    if mc is None:
        mc = cell.get("mc_linear")
    if loss is None or mc is None:
        return None
    fit = loss < rules.fit_loss
    connected = mc >= -rules.mc_eps
    if not fit:
        return "II" if connected else "I"
    if not connected:
        return "III"
    if cka is None:
        return "IV"
    return "IV-B" if cka >= rules.cka_threshold else "IV-A"


def _mean(values: Iterable[Any]) -> float | None:
    vals = [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return sum(vals) / len(vals) if vals else None


def phase_grid(rows: Sequence[Mapping[str, Any]], x: str = "batch_size", y: str = "width",
               rules: PhaseRules = PhaseRules()) -> dict[str, Any]:
    """Average each metric over all rows in a (y, x) cell; label the cell's phase."""
    if not rows:
        raise InputError("the zoo has no rows to plot")
    for axis in (x, y):
        if all(r.get(axis) is None for r in rows):
            raise InputError(f"axis {axis!r} is not a column of this zoo's catalog; "
                             f"choose --x/--y among its varying config columns")
    xs = sorted({r[x] for r in rows})
    ys = sorted({r[y] for r in rows})
    metrics = [m for m, _, _ in PANELS] + ["mc_linear"]
    cells: dict[tuple[Any, Any], dict[str, Any]] = {}
    for yv in ys:
        for xv in xs:
            sel = [r for r in rows if r[x] == xv and r[y] == yv]
            cell = {m: _mean(r.get(m) for r in sel) for m in metrics}
            cell["n"] = len(sel)
            cell["phase"] = classify(cell, rules)
            cells[(yv, xv)] = cell
    return {"x": x, "y": y, "xs": xs, "ys": ys, "cells": cells}


def plot_phases(grid: Mapping[str, Any], path: str | Path, title: str = "") -> Path:
    """Heat maps of the metrics over (y, x) plus the phase labels; saved as an image."""
    plt = pyplot()
    import numpy as np

    xs, ys, cells = grid["xs"], grid["ys"], grid["cells"]
    panels = [p for p in PANELS if any(c.get(p[0]) is not None for c in cells.values())]
    n = len(panels) + 1
    cols = 3
    rows_n = math.ceil(n / cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(4.2 * cols, 3.4 * rows_n), squeeze=False)
    for ax in axes.flat[n:]:
        ax.axis("off")

    def frame(ax: Any, label: str) -> None:
        ax.set_xticks(range(len(xs)), [str(v) for v in xs])
        ax.set_yticks(range(len(ys)), [str(v) for v in ys])
        ax.set_xlabel(f"{grid['x']} (temperature-like)")
        ax.set_ylabel(f"{grid['y']} (load-like)")
        ax.set_title(label, fontsize=10)

    for ax, (key, label, log) in zip(axes.flat, panels):
        z = np.array([[cells[(yv, xv)].get(key) if cells[(yv, xv)].get(key) is not None else np.nan
                       for xv in xs] for yv in ys], dtype=float)
        if log:
            z = np.log10(np.clip(z, 1e-8, None))
            label = f"log10 {label}"
        cmap = "RdBu" if key.startswith("mc") else "viridis"
        kw: dict[str, Any] = {}
        if key.startswith("mc") and np.isfinite(z).any():
            lim = float(np.nanmax(np.abs(z))) or 1.0
            kw = {"vmin": -lim, "vmax": lim}
        im = ax.imshow(z, origin="lower", cmap=cmap, aspect="auto", **kw)
        fig.colorbar(im, ax=ax, shrink=0.85)
        frame(ax, label)
    ax = axes.flat[len(panels)]
    names = ["I", "II", "III", "IV", "IV-A", "IV-B"]
    colors = ["#d7191c", "#fdae61", "#abd9e9", "#2c7bb6", "#1a9641", "#a6d96a"]
    z = np.array([[names.index(cells[(yv, xv)]["phase"]) if cells[(yv, xv)]["phase"] else np.nan
                   for xv in xs] for yv in ys], dtype=float)
    from matplotlib.colors import ListedColormap

    ax.imshow(z, origin="lower", cmap=ListedColormap(colors), vmin=-0.5, vmax=len(names) - 0.5, aspect="auto")
    for i, yv in enumerate(ys):
        for j, xv in enumerate(xs):
            ax.text(j, i, cells[(yv, xv)]["phase"] or "?", ha="center", va="center", fontsize=9)
    frame(ax, "phase (Yang et al. 2021)")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
