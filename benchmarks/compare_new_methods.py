"""Side by side with mergekit: sce, multislerp, karcher, nearswap, arcee_fusion, ram
and ramplus_tl, in float32, float16 and bfloat16, tensor by tensor.

    python benchmarks/compare_new_methods.py --mergekit /tmp/mkvenv/bin/mergekit-yaml \\
        --json benchmarks/results/new_methods_vs_mergekit.json

Builds tiny Llama checkpoints (a base, three dense fine-tunes, three sparse
ones for RAM, three that leave some tensors untouched), writes one mergekit-schema spec per case and dtype, runs
`mergekit-yaml SPEC OUT` and `wsmerge run SPEC OUT` on it, and prints, per case
and dtype, the largest absolute difference and the largest distance in units
in the last place (ULP, of the spec's dtype) between the two outputs.

For float16 and bfloat16 it also runs mergekit in float32 on inputs already
rounded to that dtype, and rounds its result once: the exactly rounded answer
to the same question. `ours vs exact` and `mk vs exact` then say which of the
two low-precision runs is off, and by how much.

Not part of CI: it needs mergekit (in its own virtualenv; never a dependency of
this project). Work files go under benchmarks/work/new-methods/ (git-ignored).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from weightspace.ir import WeightSpace
from weightspace.zoo.tiny import write_tiny_llama

HERE = Path(__file__).resolve().parent
DTYPES = ("float32", "float16", "bfloat16")
SHAPE = {"hidden": 64, "intermediate": 128, "vocab": 128, "layers": 2, "heads": 4, "kv_heads": 2}

DENSE = ["ft_a", "ft_b", "ft_c"]
SPARSE = ["sp_a", "sp_b", "sp_c"]
FROZEN = ["fz_a", "fz_b", "fz_c"]  # the dense ones with embeddings and norms left as the base's

# case -> (merge_method, base_model or None, [(model, parameters)], global parameters)
CASES: dict[str, tuple[str, str | None, list[tuple[str, dict]], dict]] = {
    "sce": ("sce", "base", [(m, {}) for m in DENSE], {}),
    "sce_topk": ("sce", "base", [(m, {}) for m in DENSE], {"select_topk": 0.5}),
    "multislerp": ("multislerp", "base", list(zip(DENSE, [{"weight": w} for w in (0.5, 0.3, 0.2)])), {}),
    "multislerp_nobase": ("multislerp", None, list(zip(DENSE, [{"weight": w} for w in (1.0, 2.0, 1.0)])), {}),
    "karcher": ("karcher", None, [(m, {}) for m in DENSE], {}),
    "karcher_base": ("karcher", "base", [(m, {}) for m in DENSE[:2]], {"max_iter": 50, "tol": 1e-7}),
    # the base listed first: mergekit keeps that order, we put the base last (rounding only)
    "karcher_base_listed": ("karcher", "base", [("base", {}), *((m, {}) for m in DENSE[:2])], {}),
    "nearswap": ("nearswap", "base", [("base", {}), ("ft_a", {})], {"t": 0.005}),
    "arcee_fusion": ("arcee_fusion", "base", [("base", {}), ("ft_a", {})], {}),
    "ram": ("ram", "base", [(m, {}) for m in SPARSE], {}),
    "ramplus_tl": ("ramplus_tl", "base", [(m, {}) for m in SPARSE], {"r": 0.5, "alpha": 0.5}),
    # tensors no fine-tune changed: zero task vectors, |a - b| = 0
    "multislerp_frozen": ("multislerp", "base", [(m, {"weight": 0.5}) for m in FROZEN[:2]], {}),
    "multislerp_frozen3": ("multislerp", "base", [(m, {"weight": 1.0}) for m in FROZEN], {}),
    "nearswap_t0": ("nearswap", "base", [("base", {}), ("fz_a", {})], {"t": 0.0}),
}

MANTISSA = {torch.float32: 23, torch.float16: 10, torch.bfloat16: 7}


def build_models(root: Path) -> None:
    """base, three dense fine-tunes (base + N(0, 0.01) everywhere), three sparse ones (the
    same kind of delta on a random 30% of the entries, as RL fine-tunes look) and three
    "frozen" ones (the dense ones with the embeddings and norms left as the base's)."""
    shape = dict(hidden=SHAPE["hidden"], intermediate=SHAPE["intermediate"], vocab=SHAPE["vocab"],
                 layers=SHAPE["layers"], heads=SHAPE["heads"], kv_heads=SHAPE["kv_heads"])
    base = write_tiny_llama(root / "base", seed=0, **shape)
    for k, name in enumerate(DENSE, start=1):
        write_tiny_llama(root / name, seed=0, delta_seed=k, **shape)
    tensors = load_file(str(base / "model.safetensors"))
    config = json.loads((base / "config.json").read_text())
    for k, name in enumerate(SPARSE, start=1):
        g = torch.Generator().manual_seed(20_000 + k)
        sparse = {n: t + torch.randn(t.shape, generator=g) * 0.01 * (torch.rand(t.shape, generator=g) < 0.3)
                  for n, t in tensors.items()}
        WeightSpace.from_tensors(sparse, {"source": name}).save(root / name, overwrite=True, config=config)
    for dense, name in zip(DENSE, FROZEN):
        ft = load_file(str(root / dense / "model.safetensors"))
        frozen = {n: tensors[n] if ("norm" in n or "embed" in n) else v for n, v in ft.items()}
        WeightSpace.from_tensors(frozen, {"source": name}).save(root / name, overwrite=True, config=config)


def rounded_copy(src: Path, dst: Path, dtype: torch.dtype) -> None:
    """The models of `src` with every tensor rounded to `dtype` and stored as float32 again."""
    for model in sorted(p for p in src.iterdir() if (p / "config.json").exists()):
        t = load_file(str(model / "model.safetensors"))
        t = {n: v.to(dtype).to(torch.float32) for n, v in t.items()}
        config = json.loads((model / "config.json").read_text())
        WeightSpace.from_tensors(t, {"source": model.name}).save(dst / model.name, overwrite=True,
                                                                 config=config)


def spec_text(case: str, models_dir: Path, dtype: str) -> str:
    import yaml

    method, base, models, params = CASES[case]
    spec: dict = {"merge_method": method}
    if base:
        spec["base_model"] = str(models_dir / base)
    spec["models"] = [{"model": str(models_dir / m), **({"parameters": p} if p else {})} for m, p in models]
    if params:
        spec["parameters"] = params
    spec["dtype"] = dtype
    return yaml.safe_dump(spec, sort_keys=False)


def run_logged(cmd: list[str], log: Path) -> tuple[bool, float]:
    t0 = time.perf_counter()
    with log.open("w") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode
    with log.open("a") as f:
        f.write(f"\nexit {rc}\n")
    return rc == 0, time.perf_counter() - t0


def merged(out: Path) -> dict[str, torch.Tensor]:
    result: dict[str, torch.Tensor] = {}
    for f in sorted(out.glob("*.safetensors")):
        result.update(load_file(str(f)))
    return result


def ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The spacing of `dtype` at |x| (float64), subnormals included."""
    x = x.double().abs().clamp(min=torch.finfo(dtype).tiny)
    return torch.pow(2.0, torch.floor(torch.log2(x)) - MANTISSA[dtype])


def distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], dtype: torch.dtype,
             inputs: list[dict[str, torch.Tensor]]) -> dict:
    """How far `a` is from `b`, both read as `dtype` (as a loader would see them), over their
    common tensors: max |a - b|, and the largest difference in ULPs of `dtype` taken at the
    magnitude of the numbers merged at that entry (the largest |value| of the inputs and of
    a and b there). A result near zero from inputs that nearly cancel is only as precise as
    those inputs; measured at the result itself, one rounding there reads as 100s of ULPs."""
    worst_abs, worst_ulp, worst_tensor, over, total = 0.0, 0.0, None, 0, 0
    nonfinite_a = nonfinite_b = 0
    for name in sorted(set(a) & set(b)):
        x, y = a[name].to(dtype).double(), b[name].to(dtype).double()
        finite = torch.isfinite(x) & torch.isfinite(y)  # NaN/Inf are counted, not measured
        nonfinite_a += int((~torch.isfinite(x)).sum())
        nonfinite_b += int((~torch.isfinite(y)).sum())
        scale = torch.stack([x.abs(), y.abs(), *(m[name].to(dtype).double().abs() for m in inputs)]).amax(0)
        d = torch.where(finite, (x - y).abs(), 0.0)
        u = d / ulp(scale.nan_to_num(), dtype)
        total += d.numel()
        over += int((u > 1).sum())
        if float(d.max()) > worst_abs:
            worst_abs, worst_tensor = float(d.max()), name
        worst_ulp = max(worst_ulp, float(u.max()))
    return {"max_abs": worst_abs, "max_ulp": worst_ulp, "over_1_ulp": over, "elements": total,
            "worst_tensor": worst_tensor, "nonfinite_a": nonfinite_a, "nonfinite_b": nonfinite_b,
            "dtypes": sorted({str(v.dtype).replace("torch.", "") for v in a.values()})}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mergekit", default="/tmp/mkvenv/bin/mergekit-yaml", help="mergekit-yaml to run")
    ap.add_argument("--wsmerge", default=str(Path(sys.executable).parent / "wsmerge"), help="wsmerge to run")
    ap.add_argument("--work", type=Path, default=HERE / "work" / "new-methods")
    ap.add_argument("--cases", default=",".join(CASES), help="comma-separated subset of: " + ", ".join(CASES))
    ap.add_argument("--dtypes", default=",".join(DTYPES))
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--rescore", action="store_true",
                    help="score the outputs already under --work again; run nothing")
    args = ap.parse_args(argv)
    if not Path(args.mergekit).exists():
        print(f"mergekit-yaml not found at {args.mergekit}; pass --mergekit", file=sys.stderr)
        return 2
    cases, dtypes = args.cases.split(","), args.dtypes.split(",")
    work = args.work.resolve()
    models = work / "models"
    if not args.rescore:
        shutil.rmtree(work, ignore_errors=True)
        build_models(models)
        for dt in dtypes:
            if dt != "float32":
                rounded_copy(models, work / f"models-{dt}", getattr(torch, dt))

    def run(cmd: list[str], log: Path) -> tuple[bool, float]:
        if args.rescore:  # as the run went (run_logged appends its exit code to the log)
            return log.exists() and log.read_text().endswith("\nexit 0\n"), 0.0
        return run_logged(cmd, log)

    mk_cmd = [args.mergekit, "--no-copy-tokenizer", "--quiet", "--device", "cpu"]
    ws_cmd = [args.wsmerge, "run", "--device", "cpu"]
    rows = []
    print(f"{'case':18} {'dtype':9} {'ours vs mk: max abs':>20} {'max ULP':>8} {'>1 ULP':>8}"
          f" {'ours vs exact':>14} {'mk vs exact':>12}  notes")
    for case in cases:
        for dt in dtypes:
            d = work / case / dt
            d.mkdir(parents=True, exist_ok=args.rescore)
            spec = d / "spec.yml"
            spec.write_text(spec_text(case, models, dt))
            ok_mk, t_mk = run([*mk_cmd, str(spec), str(d / "mk")], d / "mk.log")
            ok_ws, t_ws = run([*ws_cmd, str(spec), str(d / "ws")], d / "ws.log")
            row: dict = {"case": case, "method": CASES[case][0], "dtype": dt, "mergekit_ok": ok_mk,
                         "wsmerge_ok": ok_ws, "mergekit_s": round(t_mk, 2), "wsmerge_s": round(t_ws, 2)}
            torch_dt = getattr(torch, dt)
            method, base, members, _ = CASES[case]
            inputs = [merged(models / m) for m in {*(m for m, _ in members), *([base] if base else [])}]
            if ok_mk and ok_ws:
                mk, ws = merged(d / "mk"), merged(d / "ws")
                row["ours_vs_mk"] = distance(ws, mk, torch_dt, inputs)
                row["mk_dtypes"] = sorted({str(v.dtype).replace("torch.", "") for v in mk.values()})
            if dt != "float32":
                ref_spec = d / "exact.yml"
                ref_spec.write_text(spec_text(case, work / f"models-{dt}", "float32"))
                if run([*mk_cmd, str(ref_spec), str(d / "exact")], d / "exact.log")[0]:
                    exact = {n: v.to(torch_dt) for n, v in merged(d / "exact").items()}
                    if ok_ws:
                        row["ours_vs_exact"] = distance(merged(d / "ws"), exact, torch_dt, inputs)
                    if ok_mk:
                        row["mk_vs_exact"] = distance(merged(d / "mk"), exact, torch_dt, inputs)
            rows.append(row)
            print(_line(row, d), flush=True)
    if args.json:
        args.json.write_text(json.dumps({"shape": SHAPE, "torch": torch.__version__, "rows": rows},
                                        indent=1) + "\n")
    return 0


def _line(row: dict, d: Path) -> str:
    def ulps(key: str) -> str:
        return f"{row[key]['max_ulp']:.2f}" if key in row else "-"

    notes = []
    if not row["mergekit_ok"]:
        notes.append(f"mergekit failed ({d / 'mk.log'})")
    if not row["wsmerge_ok"]:
        notes.append(f"wsmerge failed ({d / 'ws.log'})")
    vs = row.get("ours_vs_mk")
    if vs and vs["nonfinite_b"]:
        notes.append(f"mergekit wrote {vs['nonfinite_b']} NaN/Inf (not measured)")
    if row.get("mk_dtypes") and row["mk_dtypes"] != [row["dtype"]]:
        notes.append(f"mergekit wrote {'/'.join(row['mk_dtypes'])}")
    if vs:
        cells = f"{vs['max_abs']:20.3g} {vs['max_ulp']:8.2f} {vs['over_1_ulp']:8d}"
    else:
        cells = f"{'-':>20} {'-':>8} {'-':>8}"
    return (f"{row['case']:18} {row['dtype']:9} {cells} {ulps('ours_vs_exact'):>14} {ulps('mk_vs_exact'):>12}"
            f"  {'; '.join(notes)}")


if __name__ == "__main__":
    sys.exit(main())
