"""Merge benchmark: wall time, peak RSS and throughput of `wsmerge run` (and mergekit).

For each model size this script

1. writes (or reuses, cached under ``benchmarks/work/``) N synthetic Llama-shaped
   checkpoints with ``make_checkpoints.py``: model 0 is the base, the others are
   the base plus seeded noise;
2. writes one YAML spec per method, in the schema both tools read:
   ``linear`` (every model, weight 1/N), ``task_arithmetic`` (base = model 0,
   the others with weight 0.5, lambda 1) and ``ties`` (base = model 0, the
   others with density 0.5 and weight 0.5);
3. runs ``wsmerge run SPEC OUT --overwrite --device cpu`` and, with
   ``--mergekit``, ``mergekit-yaml SPEC OUT --no-copy-tokenizer --device cpu``,
   each as its own child process, timing wall clock and reading the child's
   peak RSS (``ru_maxrss``) from ``os.wait4``;
4. runs the I/O floor (``io_floor.py``: read every input byte, write one output
   of the model's size), once plain and once with ``--fsync`` (wsmerge fsyncs
   its shards, mergekit does not), and ``python -c "import torch, safetensors"``
   (the start-up every Python merge tool pays), each as a child process timed
   the same way; "x floor" is relative to the plain floor;
5. prints a Markdown table per size (median over ``--repeat`` runs) and, with
   ``--json``, writes every individual run to a file.

The page cache is handled the same way before every timed run: ``--cache warm``
(default) reads all inputs once so every run starts with them cached;
``--cache cold`` syncs and writes 3 to /proc/sys/vm/drop_caches (root only; if
refused the script says so and falls back to warm). Each run is then preceded
by ``--settle`` idle seconds (default 5) so that every run starts from the same
memory state (see the README's machine notes).

This process never imports torch: on Linux a child's ``ru_maxrss`` includes the
resident size of the parent at fork time, so the launcher is kept small (about
15 MB, which every RSS figure includes).

The work is split by job: ``_workload.py`` (checkpoints, specs, the job list),
``_measure.py`` (child processes, timing, RSS, page cache) and ``_report.py``
(summaries, tables, machine info); this file parses the options and runs them.

Example::

    python benchmarks/bench_merge.py --params 134M --methods linear,task_arithmetic,ties \\
        --mergekit /tmp/mkvenv/bin/mergekit-yaml --repeat 3 --json benchmarks/results/134M.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from _measure import Tool, find_wsmerge, prepare, probe, run_child, try_drop_caches
from _report import (
    compare_line,
    failed_runs,
    machine_info,
    matrix_table,
    size_header,
    size_table,
    summarize,
)
from _workload import CASES, HERE, METHODS, RANDOMIZED, Job, job_list, make_checkpoints, write_specs

DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


# --------------------------------------------------------------------------- one size


def bench_size(
    params: str, args: argparse.Namespace, tools: list[Tool], methods: list[str], cache: str
) -> dict:
    """Every job of one model size, --repeat times; the runs, their summaries and --compare."""
    ckpt = make_checkpoints(params, args)
    work = args.workdir.resolve()
    specs = write_specs(work / "specs" / ckpt.tag, ckpt.models, args.dtype, methods)
    out_root = work / "out" / ckpt.tag
    log_root = work / "logs" / ckpt.tag
    shutil.rmtree(log_root, ignore_errors=True)
    out_root.mkdir(parents=True, exist_ok=True)
    jobs = job_list(args, tools, methods, ckpt.models, specs, out_root)

    size: dict = {
        "tag": ckpt.tag,
        "case": getattr(args, "case", args.dtype),
        "zero_fraction": getattr(args, "zero_fraction", 0.0),
        "params_arg": params,
        "num_params": ckpt.settings["num_params"],
        "shape": ckpt.settings["shape"],
        "n_models": args.n_models,
        "dtype": args.dtype,
        "model_bytes": ckpt.model_bytes,
        "input_bytes": ckpt.input_bytes,
        "cache": cache,
        "specs": {m: str(p) for m, p in specs.items()},
        "load_start": [round(x, 2) for x in os.getloadavg()],
        "results": {
            f"{m}/{t}": {"method": m, "tool": t, "cmd": c, "runs": []} for m, t, c, _ in jobs
        },
    }
    run_jobs(jobs, size, args, cache, ckpt.inputs, log_root)
    (out_root / "floor.bin").unlink(missing_ok=True)
    size["load_end"] = [round(x, 2) for x in os.getloadavg()]
    for res in size["results"].values():
        res["summary"] = summarize(res["runs"])
    if args.compare:
        size["compare"] = compare_outputs(tools, methods, out_root, args.atol)
    if not args.keep_outputs:
        for method in methods:
            for tool in tools:
                shutil.rmtree(out_root / f"{tool.name}-{method}", ignore_errors=True)
    return size


def run_jobs(
    jobs: list[Job], size: dict, args: argparse.Namespace, cache: str, inputs: list[Path],
    log_root: Path,
) -> None:
    """Run every job --repeat times, each from the same cache state; a line per run."""
    total = args.repeat * len(jobs)
    done = 0
    for rep in range(args.repeat):
        for method, tool_name, cmd, out in jobs:
            prepare(cache, inputs, [out], args.settle)
            slug = re.sub(r"[^A-Za-z0-9_.]+", "_", f"{tool_name}-{method}").strip("_")
            log = log_root / f"{slug}-r{rep}.log"
            run = run_child(cmd, log, args.timeout)
            done += 1
            status = "ok" if run["rc"] == 0 else f"FAILED rc={run['rc']} (log: {log})"
            pk = run["sampled_peak_kib"]
            print(
                f"[{done}/{total}] {method:16s} {tool_name:20s} {run['wall_s']:7.2f} s "
                f"{run['maxrss_kib'] / 1024:8.0f} MiB (sampled anon {pk['RssAnon'] / 1024:.0f}, "
                f"file {pk['RssFile'] / 1024:.0f})  load {run['load_before'][0]:.2f}  {status}",
                flush=True,
            )
            size["results"][f"{method}/{tool_name}"]["runs"].append(run)


def compare_outputs(tools: list[Tool], methods: list[str], out_root: Path, atol: float) -> dict:
    """compare_outputs.py on wsmerge's and mergekit's output of every method (both must run)."""
    compare: dict = {}
    names = [t.name for t in tools]
    if "wsmerge" in names and "mergekit" in names:
        for method in methods:
            if method in RANDOMIZED:  # different random generators: not the same merge
                continue
            a, b = out_root / f"wsmerge-{method}", out_root / f"mergekit-{method}"
            if not (a.is_dir() and b.is_dir()):
                continue
            cmd = [sys.executable, str(HERE / "compare_outputs.py"), str(a), str(b)]
            r = subprocess.run(cmd + ["--atol", str(atol)], capture_output=True, text=True)
            try:
                compare[method] = json.loads(r.stdout)
            except json.JSONDecodeError:
                compare[method] = {"error": (r.stderr or r.stdout)[-2000:]}
    else:
        print("--compare needs both wsmerge and --mergekit; skipped", file=sys.stderr)
    return compare


# --------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        description="Benchmark `wsmerge run` (and optionally mergekit-yaml) on synthetic "
        "Llama-shaped checkpoints against an I/O floor; prints a Markdown table.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    ap.add_argument("--params", default="134M", help="comma-separated model sizes, e.g. 134M,1B")
    ap.add_argument(
        "--dtype", default="float32", help="checkpoint and merge dtype (float32, bfloat16)"
    )
    ap.add_argument(
        "--cases",
        default=None,
        help="comma-separated checkpoint cases, each a dtype and how sparse the task vectors are: "
        + ", ".join(f"{k} ({d}{f', {z:.0%} zero' if z else ''})" for k, (d, z) in CASES.items())
        .replace("%", "%%")  # argparse formats help with %
        + " (default: one dense case in --dtype)",
    )
    ap.add_argument(
        "--n-models", type=int, default=3, help="checkpoints per merge (model 0 = base)"
    )
    ap.add_argument("--seed", type=int, default=0, help="checkpoint seed")
    ap.add_argument(
        "--hidden-size",
        type=int,
        default=None,
        help="fix the hidden size (then only depth grows with --params, so the largest "
        "tensor stays the same size)",
    )
    ap.add_argument("--layers", type=int, default=None, help="fix the number of layers")
    ap.add_argument(
        "--methods",
        default="linear,task_arithmetic,ties",
        help="comma-separated subset of " + ",".join(METHODS),
    )
    ap.add_argument(
        "--repeat", type=int, default=1, help="runs per (method, tool); the table shows the median"
    )
    ap.add_argument(
        "--wsmerge",
        default=None,
        help="wsmerge executable (default: next to this Python, then PATH)",
    )
    ap.add_argument(
        "--no-wsmerge", action="store_true", help="skip wsmerge (floor and mergekit only)"
    )
    ap.add_argument(
        "--mergekit",
        default=None,
        help="path to mergekit-yaml (e.g. /tmp/mkvenv/bin/mergekit-yaml)",
    )
    ap.add_argument(
        "--wsmerge-args", default="", help="extra arguments for wsmerge run (one string)"
    )
    ap.add_argument(
        "--mergekit-args", default="", help="extra arguments for mergekit-yaml (one string)"
    )
    ap.add_argument(
        "--device", default="cpu", help="--device passed to both tools ('' for each tool's default)"
    )
    ap.add_argument(
        "--out-shard-size",
        default=None,
        help="output shard size passed to both tools (wsmerge --shard-size, mergekit --out-shard-size); default: each tool's default (5G for both)",
    )
    ap.add_argument(
        "--ckpt-shard-size", default="1G", help="shard size of the generated input checkpoints"
    )
    ap.add_argument(
        "--cache",
        choices=("warm", "cold"),
        default="warm",
        help="warm: read inputs before each run; cold: drop the page cache before each run",
    )
    ap.add_argument(
        "--settle",
        type=float,
        default=5.0,
        help="idle seconds before each timed run, so every run starts from the same memory "
        "state (on VMs with free page reporting, memory freed more than ~2 s earlier is "
        "handed back to the host and is slow to fault in again; see README)",
    )
    ap.add_argument("--no-floor", action="store_true", help="skip the I/O floor")
    ap.add_argument(
        "--floor-import-torch",
        action="store_true",
        help="the floor process imports torch first (counts start-up in the floor)",
    )
    ap.add_argument(
        "--no-startup",
        action="store_true",
        help="skip timing `python -c 'import torch, safetensors'` (start-up every tool pays)",
    )
    ap.add_argument(
        "--compare",
        action="store_true",
        help="compare wsmerge and mergekit outputs tensor by tensor",
    )
    ap.add_argument("--atol", type=float, default=1e-5, help="tolerance for --compare")
    ap.add_argument(
        "--keep-outputs", action="store_true", help="keep merged outputs under WORKDIR/out"
    )
    ap.add_argument(
        "--timeout", type=float, default=None, help="kill a run after this many seconds"
    )
    ap.add_argument(
        "--workdir", type=Path, default=HERE / "work", help="checkpoints, specs, outputs and logs"
    )
    ap.add_argument(
        "--json", type=Path, default=None, help="write all runs and summaries to this JSON file"
    )
    return ap


def find_tools(args: argparse.Namespace, ap: argparse.ArgumentParser, notes: list[str]) -> list[Tool]:
    """wsmerge (unless --no-wsmerge; missing: a note, and the run goes on) and --mergekit."""
    tools: list[Tool] = []
    if not args.no_wsmerge:
        exe, msg = find_wsmerge(args.wsmerge)
        print(msg, file=sys.stderr if exe is None else sys.stdout)
        if exe:
            tools.append(Tool("wsmerge", exe, shlex.split(args.wsmerge_args)))
        else:
            notes.append(msg + " -- measured the I/O floor and mergekit only")
            print("  -> continuing without wsmerge (I/O floor and mergekit only)", file=sys.stderr)
    if args.mergekit:
        why = probe([args.mergekit, "--help"])
        if why:
            ap.error(f"--mergekit {args.mergekit} is not usable: {why}")
        tools.append(Tool("mergekit", args.mergekit, shlex.split(args.mergekit_args)))
        print(f"mergekit: {args.mergekit}")
    return tools


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)

    args.dtype = DTYPE_ALIASES.get(args.dtype.lower(), args.dtype.lower())
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        ap.error(f"unknown method(s) {unknown}; choose from {list(METHODS)}")
    if args.repeat < 1:
        ap.error("--repeat must be >= 1")

    notes: list[str] = []
    tools = find_tools(args, ap, notes)
    cache = args.cache
    if cache == "cold":
        why = try_drop_caches()
        if why:
            msg = f"cannot drop the page cache ({why}); falling back to --cache warm"
            print(msg, file=sys.stderr)
            notes.append(msg)
            cache = "warm"

    # Warm the tools' own files (Python packages, shared libraries) once, untimed,
    # so the first timed run does not pay for a cold import that later runs do not.
    for tool in tools:
        probe([tool.exe, "run", "--help"] if tool.name == "wsmerge" else [tool.exe, "--help"])
    # With PYTHONDONTWRITEBYTECODE set (this project's dev VM sets it) an editable install's
    # modules are compiled from source at every start: 0.11 s of every wsmerge run here, which a
    # user's second run never pays (and mergekit's pip-installed modules have their .pyc files).
    # Write the bytecode once, as Python itself would have.
    if os.environ.get("PYTHONDONTWRITEBYTECODE") and any(t.name == "wsmerge" for t in tools):
        import compileall

        root = HERE.parent
        for pkg in ("weightspace", "merges", "zoo", "cli"):
            compileall.compile_dir(str(root / pkg), quiet=1)
        notes.append("PYTHONDONTWRITEBYTECODE is set: wsmerge's sources were byte-compiled once "
                     "before timing (a normal install caches its bytecode)")

    report: dict = {
        "machine": machine_info(),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "tools": {t.name: t.exe for t in tools},
        "notes": notes,
        "sizes": [],
    }
    if args.cases is None:
        cases = [(args.dtype, args.dtype, 0.0)]
    else:
        names = [c.strip() for c in args.cases.split(",") if c.strip()]
        bad = sorted(set(names) - set(CASES))
        if bad:
            ap.error(f"unknown case(s) {bad}; choose from {list(CASES)}")
        cases = [(c, *CASES[c]) for c in names]
    for params in [p.strip() for p in args.params.split(",") if p.strip()]:
        for case, dtype, zero in cases:
            case_args = argparse.Namespace(**{**vars(args), "case": case, "dtype": dtype, "zero_fraction": zero})
            size = bench_size(params, case_args, tools, methods, cache)
            report["sizes"].append(size)
            print()
            print(size_header(size, case_args))
            print(size_table(size))
            for method, cmp in size.get("compare", {}).items():
                print("\n" + compare_line(method, cmp))
            print(flush=True)
    if len(report["sizes"]) > 1 or len(tools) > 1:
        print(matrix_table(report))
        print()
    for note in notes:
        print(f"note: {note}")
    report["machine"]["loadavg_at_end"] = list(os.getloadavg())
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}")
    failed = failed_runs(report)
    if failed:
        print(
            f"failed runs: {', '.join(failed)} (see logs under {args.workdir}/logs)",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
