"""Classify where two TIES / breadcrumbs outputs differ: is every differing entry an exact
magnitude tie at a trim boundary (broken by position here, arbitrarily by mergekit's unstable
argsort), or something else?

    python benchmarks/classify_ties.py --method ties --density 0.5 \\
        --ours runs/ws --theirs runs/mk --base BASE FT1 FT2

For each differing entry it checks whether some model's |x_i - base| equals one of that
model's trim boundary values: the k-th largest magnitude (TIES, k = int(density * n)), or the
two edges of breadcrumbs' rank window (gamma's outliers cut first). Prints the counts; exit
status 1 if any differing entry is not at a tie.
"""

from __future__ import annotations

import argparse
import glob
import sys
from pathlib import Path

import torch
from safetensors import safe_open


def opener(folder: str):
    handles = [safe_open(f, "pt") for f in sorted(glob.glob(str(Path(folder) / "*.safetensors")))]
    where = {k: h for h in handles for k in h.keys()}
    return (lambda k: where[k].get_tensor(k)), list(where)


def boundaries(mag: torch.Tensor, method: str, density: float, gamma: float) -> list[torch.Tensor]:
    """The magnitudes at the edges of what the trim keeps, from a full sort (ascending)."""
    n = mag.numel()
    s = mag.reshape(-1).sort().values
    if method == "ties":
        k = int(density * n)
        return [s[n - k]] if 0 < k <= n else []
    keep_n, n_top = int(density * n), int(gamma * n)
    n_bottom = n - keep_n - n_top
    if n_bottom < 0:
        n_top, n_bottom = n_top + n_bottom, 0
    return [s[n_bottom], s[n - n_top - 1]]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--method", choices=["ties", "breadcrumbs"], required=True)
    ap.add_argument("--density", type=float, required=True)
    ap.add_argument("--gamma", type=float, default=0.01, help="breadcrumbs' outlier share")
    ap.add_argument("--ours", required=True)
    ap.add_argument("--theirs", required=True)
    ap.add_argument("--base", nargs="+", required=True, metavar="MODEL",
                    help="the base model's folder, then each fine-tune's")
    args = ap.parse_args()
    ours, names = opener(args.ours)
    theirs, _ = opener(args.theirs)
    base_get, _ = opener(args.base[0])
    fts = [opener(m)[0] for m in args.base[1:]]
    total = at_tie = 0
    other: list[tuple[str, int]] = []
    for name in names:
        a, b = ours(name), theirs(name)
        diff = a != b
        n = int(diff.sum())
        if not n:
            continue
        base = base_get(name)
        tie = torch.zeros_like(diff)
        for get in fts:
            mag = (get(name) - base).abs()
            for v in boundaries(mag, args.method, args.density, args.gamma):
                tie |= mag == v
        t = int((diff & tie).sum())
        total, at_tie = total + n, at_tie + t
        if t < n:
            other.append((name, n - t))
    print(f"{args.method}: {total} entries differ, {at_tie} at an exact tie at a trim boundary, "
          f"{total - at_tie} elsewhere" + (f": {other[:10]}" if other else ""))
    return 1 if other else 0


if __name__ == "__main__":
    sys.exit(main())
