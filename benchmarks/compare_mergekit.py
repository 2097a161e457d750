"""wsmerge against mergekit 0.1.5, config by config, on the same tiny checkpoints.

    python benchmarks/compare_mergekit.py --mergekit /tmp/mkvenv/bin/mergekit-yaml
    python benchmarks/compare_mergekit.py --mergekit ... --only gradient --dtypes float16

Each case is one mergekit YAML (the shapes mergekit users write: gradients, conditions,
slices, every shared method with its usual parameters) run by both tools in fp32, fp16 and
bf16; the table gives, per case and dtype, the largest absolute difference over all tensors
and the same in units of the output dtype's precision at the tensor's scale (eps * max|x|).
Deterministic methods should agree to float rounding; DARE and DELLA draw their random masks
differently in the two tools (mergekit uses torch's global generator, we a per-tensor seeded
one), so only their shape, dtype and finiteness are compared. Not part of the test suite:
mergekit lives in its own virtualenv.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from weightspace import load_space  # noqa: E402
from weightspace.zoo.tiny import write_tiny_llama  # noqa: E402

RANDOM = ("dare_ties", "dare_linear", "della", "della_linear")
# cases whose trim keeps the top `density` (and cuts the top `gamma`) of each task vector,
# with constant parameters: (density, gamma) of @A and @B, for the tie analysis below
TRIMMED = {"ties-flat": ((0.5, 0.0), (0.3, 0.0)), "breadcrumbs_ties": ((0.6, 0.05), (0.6, 0.05))}

CASES: dict[str, str] = {
    "linear": """merge_method: linear
models:
  - {model: @A, parameters: {weight: 0.7}}
  - {model: @B, parameters: {weight: 0.3}}
""",
    "linear-unnormalized": """merge_method: linear
models:
  - {model: @A, parameters: {weight: 0.7}}
  - {model: @B, parameters: {weight: 0.6}}
parameters: {normalize: false}
""",
    "linear-with-base": """merge_method: linear
base_model: @BASE
models:
  - {model: @A, parameters: {weight: 0.5}}
  - {model: @B, parameters: {weight: 0.5}}
parameters: {weight: 1.0}
""",
    "gradient": """merge_method: task_arithmetic
base_model: @BASE
models:
  - {model: @A, parameters: {weight: [0.2, 0.8]}}
  - {model: @B, parameters: {weight: 0.5}}
""",
    "conditions": """merge_method: task_arithmetic
base_model: @BASE
models:
  - model: @A
    parameters:
      weight:
        - {filter: self_attn, value: 0.9}
        - {filter: mlp, value: [0.1, 0.5, 0.9]}
        - {value: 0.3}
  - {model: @B, parameters: {weight: 0.5}}
parameters: {lambda: 0.8}
""",
    "ties": """merge_method: ties
base_model: @BASE
models:
  - {model: @A, parameters: {weight: 1.0, density: 0.5}}
  - {model: @B, parameters: {weight: 0.5, density: [0.2, 0.8]}}
parameters: {normalize: true}
""",
    "ties-flat": """merge_method: ties
base_model: @BASE
models:
  - {model: @A, parameters: {weight: 1.0, density: 0.5}}
  - {model: @B, parameters: {weight: 0.5, density: 0.3}}
""",
    "breadcrumbs_ties": """merge_method: breadcrumbs_ties
base_model: @BASE
models:
  - {model: @A, parameters: {weight: 1.0, density: 0.6, gamma: 0.05}}
  - {model: @B, parameters: {weight: 0.5, density: 0.6, gamma: 0.05}}
""",
    "slerp": """merge_method: slerp
base_model: @A
models:
  - {model: @A}
  - {model: @B}
parameters:
  t:
    - {filter: self_attn, value: [0.0, 0.5, 0.3, 0.7, 1.0]}
    - {filter: mlp, value: [1.0, 0.5, 0.7, 0.3, 0.0]}
    - {value: 0.5}
""",
    "nuslerp": """merge_method: nuslerp
models:
  - {model: @A, parameters: {weight: 0.6}}
  - {model: @B, parameters: {weight: 0.4}}
""",
    "model_stock": """merge_method: model_stock
base_model: @BASE
models:
  - {model: @A}
  - {model: @B}
""",
    "passthrough-slices": """merge_method: passthrough
slices:
  - sources: [{model: @A, layer_range: [0, 3]}]
  - sources: [{model: @B, layer_range: [1, 4]}]
""",
    "linear-slices-gradient": """merge_method: linear
slices:
  - sources:
      - {model: @A, layer_range: [0, 2], parameters: {weight: [1.0, 0.0]}}
      - {model: @B, layer_range: [0, 2], parameters: {weight: [0.0, 1.0]}}
  - sources:
      - {model: @A, layer_range: [2, 4], parameters: {weight: [0.0, 1.0]}}
      - {model: @B, layer_range: [2, 4], parameters: {weight: [1.0, 0.0]}}
""",
    "dare_ties": """merge_method: dare_ties
base_model: @BASE
models:
  - {model: @A, parameters: {weight: 1.0, density: 0.5}}
  - {model: @B, parameters: {weight: 0.5, density: 0.5}}
""",
    "della": """merge_method: della
base_model: @BASE
models:
  - {model: @A, parameters: {weight: 1.0, density: 0.5, epsilon: 0.1}}
  - {model: @B, parameters: {weight: 0.5, density: 0.5, epsilon: 0.1}}
""",
}

EPS = {"float32": torch.finfo(torch.float32).eps, "float16": torch.finfo(torch.float16).eps,
       "bfloat16": torch.finfo(torch.bfloat16).eps}


def make_models(work: Path) -> dict[str, Path]:
    d = work / "models"
    return {"BASE": write_tiny_llama(d / "base", seed=0, layers=4),
            "A": write_tiny_llama(d / "a", seed=0, delta_seed=1, layers=4, delta_scale=0.02),
            "B": write_tiny_llama(d / "b", seed=0, delta_seed=2, layers=4, delta_scale=0.02)}


def spec_for(text: str, models: dict[str, Path], dtype: str) -> str:
    """A case with its @BASE/@A/@B placeholders replaced by the checkpoint paths."""
    return re.sub(r"@(BASE|A|B)\b", lambda m: str(models[m[1]]), text) + f"dtype: {dtype}\n"


def run(cmd: list[str]) -> tuple[int, str]:
    r = subprocess.run(cmd, capture_output=True, text=True)
    return r.returncode, (r.stderr or r.stdout)[-800:]


def tie_cut(models: dict[str, Path], name: str, dtype: str, trims) -> torch.Tensor:
    """Entries where some task vector has a magnitude tied across one of its trim boundaries
    (the k-th largest, or the gamma cut): there the tools may keep different tied entries."""
    base = load_space(models["BASE"])[name].load().to(getattr(torch, dtype))
    hit = torch.zeros(base.numel(), dtype=torch.bool)
    for key, (density, gamma) in zip(("A", "B"), trims):
        d = (load_space(models[key])[name].load().to(base.dtype) - base).abs().float().reshape(-1)
        n = d.numel()
        keep = max(1, int(density * n)) if density > 0 else 0
        top = int(gamma * n)
        bottom = max(0, n - keep - top)
        ordered = d.sort().values
        for cut in (bottom, n - top) if top else (n - keep,):
            for j in (cut - 1, cut):  # the values on either side of the boundary
                if 0 <= j < n and int((d == ordered[j]).sum()) > 1:
                    hit |= d == ordered[j]
    return hit


def compare(a: Path, b: Path, dtype: str, exact: bool, ties=None) -> dict:
    A, B = load_space(a), load_space(b)
    if set(A) != set(B):
        return {"error": f"tensor names differ: only in wsmerge {sorted(set(A) - set(B))[:3]}, "
                         f"only in mergekit {sorted(set(B) - set(A))[:3]}"}
    worst, worst_units, where = 0.0, 0.0, ""
    differing = at_ties = 0
    for n in A:
        x, y = A[n].load(), B[n].load()
        if x.shape != y.shape or x.dtype != y.dtype:
            return {"error": f"{n}: {list(x.shape)} {x.dtype} vs {list(y.shape)} {y.dtype}"}
        if not exact:
            if not bool(torch.isfinite(x.float()).all()):
                return {"error": f"{n}: non-finite values"}
            continue
        diff = (x.double() - y.double()).abs()
        scale = max(float(y.double().abs().max()), 1e-30)
        if ties is not None and x.dim() > 0:  # set aside entries a tied trim explains
            far = (diff > EPS[dtype] * scale).reshape(-1)
            tied = ties(n) & far
            differing += int(far.sum())
            at_ties += int(tied.sum())
            diff = diff.reshape(-1).masked_fill(tied, 0)
        d = float(diff.max())
        units = d / (EPS[dtype] * scale)
        if d > worst:
            worst, worst_units, where = d, units, n
    if not exact:
        return {"checked": "names, shapes, dtypes, finite"}
    out = {"max_abs_diff": worst, "eps_units": worst_units, "tensor": where}
    if ties is not None:
        out.update({"entries_beyond_1eps": differing, "of_them_at_trim_ties": at_ties})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mergekit", required=True, help="path of mergekit-yaml (mergekit 0.1.5's venv)")
    ap.add_argument("--wsmerge", default=shutil.which("wsmerge") or "wsmerge")
    ap.add_argument("--dtypes", nargs="+", default=["float32", "float16", "bfloat16"])
    ap.add_argument("--only", nargs="+", default=None, help="case names (default: all)")
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="wsmk-"))
    models = make_models(work)
    rows = []
    for name, text in CASES.items():
        if args.only and name not in args.only:
            continue
        for dtype in args.dtypes:
            spec = work / f"{name}-{dtype}.yaml"
            spec.write_text(spec_for(text, models, dtype))
            ours, theirs = work / f"ws-{name}-{dtype}", work / f"mk-{name}-{dtype}"
            for p in (ours, theirs):
                shutil.rmtree(p, ignore_errors=True)
            row = {"case": name, "dtype": dtype}
            code, err = run([args.wsmerge, "run", str(spec), str(ours), "--no-progress"])
            if code:
                row["error"] = f"wsmerge exit {code}: {err.strip().splitlines()[-1]}"
            code2, err2 = run([args.mergekit, str(spec), str(theirs), "--random-seed", "0",
                               "--no-copy-tokenizer", "--quiet"])
            if code2:
                row["error"] = row.get("error", "") + f" mergekit exit {code2}: {err2.strip().splitlines()[-1]}"
            if "error" not in row:
                ties = None
                if name in TRIMMED and dtype != "float32":
                    ties = lambda t, d=dtype, tr=TRIMMED[name]: tie_cut(models, t, d, tr)  # noqa: E731
                row.update(compare(ours, theirs, dtype, exact=name not in RANDOM, ties=ties))
            rows.append(row)
            shown = row.get("error") or (f"max |diff| {row['max_abs_diff']:.3g} = {row['eps_units']:.2f} eps "
                                         f"({row['tensor']})" if "max_abs_diff" in row else "shape/dtype/finite ok")
            if "of_them_at_trim_ties" in row:
                shown += (f"; {row['entries_beyond_1eps']} entries beyond 1 eps, {row['of_them_at_trim_ties']} "
                          f"of them tied at a trim boundary (set aside)")
            print(f"{name:24} {dtype:9} {shown}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
