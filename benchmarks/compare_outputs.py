"""Compare two merged checkpoints tensor by tensor (streaming, one tensor at a time).

Understands both a single ``model.safetensors`` and sharded checkpoints with a
``model.safetensors.index.json``. Prints one JSON object: tensor count, names
missing on either side, shape/dtype mismatches, and the largest absolute and
relative differences.

Example::

    python benchmarks/compare_outputs.py out/wsmerge-ties out/mergekit-ties --atol 1e-5
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def weight_map(model_dir: Path) -> dict[str, Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        wm = json.loads(index.read_text())["weight_map"]
        return {name: model_dir / fname for name, fname in wm.items()}
    from safetensors import safe_open

    out: dict[str, Path] = {}
    for path in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            out.update({name: path for name in f.keys()})
    return out


def compare(a_dir: Path, b_dir: Path, atol: float) -> dict:
    from safetensors import safe_open

    wa, wb = weight_map(a_dir), weight_map(b_dir)
    common = [n for n in wa if n in wb]
    handles: dict[Path, object] = {}

    def get(path: Path, name: str):
        if path not in handles:
            handles[path] = safe_open(str(path), "pt")
        return handles[path].get_tensor(name)

    max_abs, max_rel, worst = 0.0, 0.0, None
    mismatched: list[str] = []
    over_tol = 0
    elements_over = 0
    for name in common:
        a, b = get(wa[name], name), get(wb[name], name)
        if a.shape != b.shape or a.dtype != b.dtype:
            mismatched.append(f"{name}: {tuple(a.shape)}/{a.dtype} vs {tuple(b.shape)}/{b.dtype}")
            continue
        a, b = a.double(), b.double()
        diff = (a - b).abs().max().item() if a.numel() else 0.0
        scale = max(a.abs().max().item(), 1e-12) if a.numel() else 1.0
        if diff > atol:
            over_tol += 1
            elements_over += int(((a - b).abs() > atol).sum().item())
        if diff > max_abs:
            max_abs, worst = diff, name
        max_rel = max(max_rel, diff / scale)
    return {
        "a": str(a_dir),
        "b": str(b_dir),
        "tensors_compared": len(common),
        "only_in_a": sorted(set(wa) - set(wb)),
        "only_in_b": sorted(set(wb) - set(wa)),
        "shape_or_dtype_mismatch": mismatched,
        "max_abs_diff": max_abs,
        "max_rel_diff": max_rel,
        "worst_tensor": worst,
        "atol": atol,
        "tensors_over_atol": over_tol,
        "elements_over_atol": elements_over,
        "equal_within_atol": not mismatched and over_tol == 0 and set(wa) == set(wb),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Compare two merged checkpoints tensor by tensor.")
    ap.add_argument("a", type=Path)
    ap.add_argument("b", type=Path)
    ap.add_argument("--atol", type=float, default=1e-5, help="absolute tolerance (default 1e-5)")
    args = ap.parse_args(argv)
    result = compare(args.a, args.b, args.atol)
    print(json.dumps(result))
    return 0 if result["equal_within_atol"] else 1


if __name__ == "__main__":
    sys.exit(main())
