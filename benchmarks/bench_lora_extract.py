"""LoRA extraction benchmark: `wsmerge lora extract` against the I/O floor and mergekit.

Extracts a rank-R adapter from a synthetic Llama-shaped fine-tune (model_1 of
make_checkpoints.py's checkpoints, the base plus seeded noise) against its base
(model_0), each tool in its own child process (wall clock and ``ru_maxrss``
from ``_measure.run_child``, warm page cache, a settle pause before each run),
next to the I/O floor (``io_floor.py --import-torch``: read both models, write
one model's bytes) and, where it runs, ``mergekit-extract-lora``. Both tools
are asked for the same adapter: mergekit stores embeddings, norms and lm_head
whole (modules_to_save) and factors the layers' linear modules, so wsmerge runs
with ``--save-modules all,lm_head``. After the timed runs, every factored
module's relative reconstruction error ||dW - B A||_F / ||dW||_F is computed
from each tool's adapter (B @ A * lora_alpha / r) and the two are compared, with
the Eckart–Young optimum (from torch.linalg.svdvals) for a sample of modules.

Example::

    python benchmarks/bench_lora_extract.py --params 134M --rank 64 \\
        --mergekit /tmp/mkvenv/bin/mergekit-extract-lora --json benchmarks/results/lora_extract_134M.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
from pathlib import Path

from _measure import find_wsmerge, prepare, probe, run_child
from _workload import HERE, make_checkpoints


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--params", default="134M", help="checkpoint size (make_checkpoints.py --params)")
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--n-models", type=int, default=3,
                    help="how many checkpoints the cached set has (3 reuses bench_merge.py's); "
                         "model_0 is the base, model_1 the fine-tune")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", type=Path, default=HERE / "work")
    ap.add_argument("--ckpt-shard-size", default="5G")
    ap.add_argument("--device", default=None, help="wsmerge --device (default: its auto)")
    ap.add_argument("--svd", default="auto", help="wsmerge --svd")
    ap.add_argument("--wsmerge", default=None, help="the wsmerge executable")
    ap.add_argument("--mergekit", default=None, help="mergekit-extract-lora executable (optional)")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--settle", type=float, default=5.0)
    ap.add_argument("--timeout", type=float, default=1800)
    ap.add_argument("--sample-optimum", type=int, default=6,
                    help="modules whose Eckart–Young optimum is computed (full SVD each)")
    ap.add_argument("--omp-threads", type=int, default=None,
                    help="OMP_NUM_THREADS for every child (both tools and the floor); default: "
                         "torch's own choice")
    ap.add_argument("--json", type=Path, default=None)
    return ap


def tool_commands(args, wsmerge: str | None, base: Path, ft: Path, out_root: Path) -> dict:
    cmds = {"floor": ([sys.executable, str(HERE / "io_floor.py"), "--import-torch", "--out",
                       str(out_root / "floor.bin"), str(ft), str(base)], out_root / "floor.bin")}
    if wsmerge:
        out = out_root / "wsmerge"
        cmd = [wsmerge, "lora", "extract", str(ft), "--base", str(base), "--rank", str(args.rank),
               "--save-modules", "all,lm_head", "--svd", args.svd, "-o", str(out), "--overwrite",
               "--no-progress"]
        if args.device:
            cmd += ["--device", args.device]
        cmds["wsmerge"] = (cmd, out)
    if args.mergekit:
        out = out_root / "mergekit"
        cmd = [args.mergekit, "--model", str(ft), "--base-model", str(base), "--out-path", str(out),
               "--max-rank", str(args.rank)]
        if args.device:
            cmd += ["--device", args.device]
        cmds["mergekit"] = (cmd, out)
    return cmds


def errors(adapter: Path, base: Path, ft: Path) -> dict[str, float]:
    """Per factored module: ||dW - B A * alpha / r|| / ||dW||, from the adapter's own config."""
    from safetensors import safe_open

    cfg = json.loads((adapter / "adapter_config.json").read_text())
    out = {}

    def opener(d: Path):
        index = d / "model.safetensors.index.json"
        files = ({v for v in json.loads(index.read_text())["weight_map"].values()} if index.exists()
                 else {"model.safetensors"})
        handles = [safe_open(str(d / f), "pt") for f in sorted(files)]
        keys = {k: h for h in handles for k in h.keys()}
        return lambda k: keys[k].get_tensor(k)

    get_b, get_f = opener(base), opener(ft)
    with safe_open(str(adapter / "adapter_model.safetensors"), "pt") as w:
        for key in w.keys():
            if not key.endswith(".lora_A.weight"):
                continue
            mod = key[len("base_model.model."):-len(".lora_A.weight")]
            a, b = w.get_tensor(key).double(), w.get_tensor(key.replace("lora_A", "lora_B")).double()
            r = cfg.get("rank_pattern", {}).get(mod, cfg["r"])
            alpha = cfg.get("alpha_pattern", {}).get(mod, cfg["lora_alpha"])
            d = get_f(mod + ".weight").double() - get_b(mod + ".weight").double()
            out[mod] = float((d - b @ a * (alpha / r)).norm() / d.norm())
    return out


def optimum(mods: list[str], rank: int, base: Path, ft: Path) -> dict[str, float]:
    import torch
    from safetensors import safe_open

    res = {}
    with safe_open(str(next(base.glob("*.safetensors"))), "pt") as fb, \
            safe_open(str(next(ft.glob("*.safetensors"))), "pt") as ff:
        for mod in mods:
            d = ff.get_tensor(mod + ".weight").double() - fb.get_tensor(mod + ".weight").double()
            s = torch.linalg.svdvals(d)
            res[mod] = float(s[rank:].pow(2).sum().sqrt() / d.norm())
    return res


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.omp_threads:
        os.environ["OMP_NUM_THREADS"] = str(args.omp_threads)  # child_env() passes it on
    ckpt = make_checkpoints(args.params, argparse.Namespace(
        dtype=args.dtype, n_models=args.n_models, seed=args.seed, workdir=args.workdir,
        ckpt_shard_size=args.ckpt_shard_size, hidden_size=None, layers=None))
    base, ft = ckpt.models[0], ckpt.models[1]
    inputs = sorted(base.glob("*.safetensors")) + sorted(ft.glob("*.safetensors"))
    out_root = args.workdir.resolve() / "out" / f"lora-extract-{ckpt.tag}-r{args.rank}"
    log_root = args.workdir.resolve() / "logs" / f"lora-extract-{ckpt.tag}-r{args.rank}"
    out_root.mkdir(parents=True, exist_ok=True)
    notes = []
    wsmerge, msg = find_wsmerge(args.wsmerge)
    notes.append(msg)
    if args.mergekit:
        why = probe([args.mergekit, "--help"])
        if why:
            notes.append(f"mergekit not run: {why}")
            args.mergekit = None
    cmds = tool_commands(args, wsmerge, base, ft, out_root)
    result = {"params": args.params, "tag": ckpt.tag, "num_params": ckpt.settings["num_params"],
              "shape": ckpt.settings["shape"], "dtype": args.dtype, "rank": args.rank,
              "model_bytes": ckpt.model_bytes, "cpus": os.cpu_count(), "notes": notes,
              "omp_threads": args.omp_threads, "svd": args.svd,
              "load_start": [round(x, 2) for x in os.getloadavg()], "runs": {}}
    for rep in range(args.repeat):
        for name, (cmd, out) in cmds.items():
            prepare("warm", inputs, [out], args.settle)
            run = run_child(cmd, log_root / f"{name}-r{rep}.log", args.timeout)
            result["runs"].setdefault(name, []).append(run)
            print(f"{name:9s} {run['wall_s']:7.2f} s {run['maxrss_kib'] / 1024:7.0f} MiB  "
                  f"load {run['load_before'][0]:.2f}  rc {run['rc']}", flush=True)
    result["load_end"] = [round(x, 2) for x in os.getloadavg()]
    summary = {}
    for name, runs in result["runs"].items():
        ok = [r for r in runs if r["rc"] == 0]
        if ok:
            summary[name] = {"wall_s": statistics.median(r["wall_s"] for r in ok),
                             "maxrss_mib": statistics.median(r["maxrss_kib"] for r in ok) / 1024,
                             "load_1min": [r["load_before"][0] for r in ok]}
    if "floor" in summary:
        for name in ("wsmerge", "mergekit"):
            if name in summary:
                summary[name]["x_floor"] = summary[name]["wall_s"] / summary["floor"]["wall_s"]
    result["summary"] = summary
    errs = {}
    for name in ("wsmerge", "mergekit"):
        if name in summary:
            errs[name] = errors(cmds[name][1], base, ft)
    if errs:
        common = sorted(set.intersection(*(set(e) for e in errs.values())))
        result["errors"] = {n: {"mean": statistics.mean(e[m] for m in common),
                                "max": max(e[m] for m in common), "modules": len(common)}
                            for n, e in errs.items()}
        if len(errs) == 2:
            diffs = [errs["wsmerge"][m] - errs["mergekit"][m] for m in common]
            result["errors"]["wsmerge_minus_mergekit"] = {"mean": statistics.mean(diffs),
                                                         "max": max(diffs), "min": min(diffs)}
        sample = common[:: max(1, len(common) // max(1, args.sample_optimum))][: args.sample_optimum]
        opt = optimum(sample, args.rank, base, ft)
        result["errors"]["eckart_young_sample"] = {
            m: {"optimum": opt[m], **{n: e[m] for n, e in errs.items()}} for m in sample}
        for n in errs:
            result["errors"][n]["adapter_bytes"] = sum(p.stat().st_size for p in cmds[n][1].iterdir())
    for name in ("wsmerge", "mergekit"):
        if name in cmds:
            shutil.rmtree(cmds[name][1], ignore_errors=True)
    (out_root / "floor.bin").unlink(missing_ok=True)
    text = json.dumps(result, indent=2)
    print(json.dumps({"summary": summary, "errors": result.get("errors")}, indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
