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

Example::

    python benchmarks/bench_merge.py --params 134M --methods linear,task_arithmetic,ties \\
        --mergekit /tmp/mkvenv/bin/mergekit-yaml --repeat 3 --json benchmarks/results/134M.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
METHODS = ("linear", "task_arithmetic", "ties")
DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


# --------------------------------------------------------------------------- tools


@dataclass
class Tool:
    name: str
    exe: str
    extra: list[str] = field(default_factory=list)

    def command(self, spec: Path, out: Path, args: argparse.Namespace) -> list[str]:
        if self.name == "wsmerge":
            cmd = [self.exe, "run", str(spec), str(out), "--overwrite"]
            if args.device:
                cmd += ["--device", args.device]
            if args.out_shard_size:
                cmd += ["--shard-size", args.out_shard_size]
        else:  # mergekit-yaml
            cmd = [self.exe, str(spec), str(out), "--no-copy-tokenizer"]
            if args.device:
                cmd += ["--device", args.device]
            if args.out_shard_size:
                cmd += ["--out-shard-size", args.out_shard_size]
        return cmd + self.extra


def probe(cmd: list[str], timeout: float = 300) -> str | None:
    """Run ``cmd`` (a --help call); return None if it works, else a reason."""
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=child_env())
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"`{shlex.join(cmd)}` could not run: {e}"
    if r.returncode != 0:
        tail = (r.stderr or r.stdout).strip().splitlines()[-3:]
        return f"`{shlex.join(cmd)}` exited {r.returncode}: {' | '.join(tail)}"
    return None


def find_wsmerge(explicit: str | None) -> tuple[str | None, str]:
    if explicit:
        exe = explicit
    else:
        beside = Path(sys.executable).parent / "wsmerge"
        exe = str(beside) if beside.exists() else shutil.which("wsmerge")
    if not exe:
        return None, (
            "wsmerge not found (neither next to this Python nor on PATH); "
            "install the project with `pip install -e .`"
        )
    why = probe([exe, "run", "--help"])
    if why:
        return None, f"wsmerge at {exe} is not usable: {why}"
    return exe, f"wsmerge: {exe}"


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    # Local paths only: never let either tool wait on the network.
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    env.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    return env


# --------------------------------------------------------------------------- runs


class RssSampler(threading.Thread):
    """Poll /proc/PID/status for the peak anonymous and file-backed resident memory.

    ``ru_maxrss`` (exact, from the kernel) is the number reported; the sampled
    split says whether a peak is the process's own allocations (RssAnon) or
    pages of memory-mapped input files (RssFile), which also count as resident.
    Sampling can miss short spikes.
    """

    KEYS = ("VmRSS", "RssAnon", "RssFile", "RssShmem")

    def __init__(self, pid: int, interval: float = 0.02):
        super().__init__(daemon=True)
        self.path = f"/proc/{pid}/status"
        self.interval = interval
        self.peak_kib = dict.fromkeys(self.KEYS, 0)
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                with open(self.path) as f:
                    text = f.read()
            except OSError:
                return
            for line in text.splitlines():
                key, _, value = line.partition(":")
                if key in self.peak_kib:
                    self.peak_kib[key] = max(self.peak_kib[key], int(value.split()[0]))
            self.stop.wait(self.interval)


def run_child(cmd: list[str], log_path: Path, timeout: float | None) -> dict:
    """Run one child; wall clock and its own peak RSS (ru_maxrss, KiB on Linux)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()
    with open(log_path, "wb") as log:
        log.write(f"$ {shlex.join(cmd)}\n".encode())
        log.flush()
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=child_env())
        sampler = RssSampler(proc.pid)
        sampler.start()
        timer = threading.Timer(timeout, proc.kill) if timeout else None
        if timer:
            timer.start()
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        sampler.stop.set()
        if timer:
            timer.cancel()
    sampler.join()
    proc.returncode = os.waitstatus_to_exitcode(status)
    return {
        "cmd": cmd,
        "rc": proc.returncode,
        "wall_s": wall,
        "maxrss_kib": usage.ru_maxrss,
        "sampled_peak_kib": sampler.peak_kib,
        "user_s": usage.ru_utime,
        "sys_s": usage.ru_stime,
        "load_before": [round(x, 2) for x in load_before],
        "load_after": [round(x, 2) for x in os.getloadavg()],
        "log": str(log_path),
    }


def safetensors_files(model_dirs: list[Path]) -> list[Path]:
    return [p for d in model_dirs for p in sorted(d.glob("*.safetensors"))]


def read_all(paths: list[Path], chunk: int = 1 << 20) -> None:
    buf = memoryview(bytearray(chunk))
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass


def try_drop_caches() -> str | None:
    """Drop the page cache; return None on success or the reason it was refused."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError as e:
        return f"{type(e).__name__}: {e}"
    return None


def prepare(cache: str, inputs: list[Path], stale: list[Path], settle: float) -> None:
    for path in stale:
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    os.sync()
    if cache == "cold":
        why = try_drop_caches()
        if why:
            raise RuntimeError(f"drop_caches failed mid-run: {why}")
    else:
        read_all(inputs)
    if settle > 0:
        time.sleep(settle)


# --------------------------------------------------------------------------- specs


def write_specs(spec_dir: Path, models: list[Path], dtype: str, methods: list[str]) -> dict:
    spec_dir.mkdir(parents=True, exist_ok=True)
    base, others = str(models[0]), [str(m) for m in models[1:]]
    n = len(models)
    specs = {
        "linear": {
            "merge_method": "linear",
            "models": [{"model": str(m), "parameters": {"weight": 1.0 / n}} for m in models],
            "dtype": dtype,
        },
        "task_arithmetic": {
            "merge_method": "task_arithmetic",
            "base_model": base,
            "models": [{"model": m, "parameters": {"weight": 0.5}} for m in others],
            "parameters": {"lambda": 1.0},
            "dtype": dtype,
        },
        "ties": {
            "merge_method": "ties",
            "base_model": base,
            "models": [{"model": m, "parameters": {"density": 0.5, "weight": 0.5}} for m in others],
            "dtype": dtype,
        },
    }
    paths = {}
    for method in methods:
        path = spec_dir / f"{method}.yaml"
        path.write_text(yaml.safe_dump(specs[method], sort_keys=False))
        paths[method] = path
    return paths


# --------------------------------------------------------------------------- reporting


def summarize(runs: list[dict]) -> dict:
    ok = [r for r in runs if r["rc"] == 0]
    if not ok:
        return {"ok": False, "rc": runs[-1]["rc"] if runs else None}
    walls = [r["wall_s"] for r in ok]
    rss = [r["maxrss_kib"] / 1024 for r in ok]
    anon = [r["sampled_peak_kib"]["RssAnon"] / 1024 for r in ok]
    mapped = [r["sampled_peak_kib"]["RssFile"] / 1024 for r in ok]
    return {
        "ok": len(ok) == len(runs),
        "n": len(ok),
        "wall_s": statistics.median(walls),
        "wall_min_s": min(walls),
        "wall_max_s": max(walls),
        "peak_rss_mib": statistics.median(rss),
        "peak_rss_max_mib": max(rss),
        "sampled_peak_anon_mib": statistics.median(anon),
        "sampled_peak_file_mib": statistics.median(mapped),
    }


def fmt_row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def size_table(size: dict) -> str:
    floor = size["results"].get("(floor)/io_floor", {}).get("summary")
    floor_wall = floor["wall_s"] if floor and "wall_s" in floor else None
    lines = [
        fmt_row(["method", "tool", "wall s", "peak RSS MiB", "GB/s", "x floor"]),
        fmt_row(["---", "---", "---:", "---:", "---:", "---:"]),
    ]
    for res in size["results"].values():
        s = res["summary"]
        if "wall_s" not in s:
            cells = [res["method"], res["tool"], f"FAILED rc={s.get('rc')}", "", "", ""]
        else:
            gbps = size["input_bytes"] / 1e9 / s["wall_s"] if res["method"] != "(startup)" else None
            xf = s["wall_s"] / floor_wall if floor_wall and res["method"] != "(startup)" else None
            cells = [
                res["method"],
                res["tool"] + ("" if s["ok"] else " (some runs failed)"),
                f"{s['wall_s']:.2f}",
                f"{s['peak_rss_mib']:.0f}",
                f"{gbps:.2f}" if gbps else "–",
                f"{xf:.2f}" if xf else "–",
            ]
        lines.append(fmt_row(cells))
    return "\n".join(lines)


def size_header(size: dict, args: argparse.Namespace) -> str:
    loads = [r["load_before"] for res in size["results"].values() for r in res["runs"]]
    load_txt = ""
    if loads:
        l1 = [x[0] for x in loads]
        load_txt = (
            f"; 1-min load avg over runs {min(l1):.2f}–{max(l1):.2f} "
            f"(start {' '.join(f'{x:.2f}' for x in size['load_start'])}, "
            f"end {' '.join(f'{x:.2f}' for x in size['load_end'])})"
        )
    return (
        f"### {size['num_params'] / 1e6:.1f}M params x {size['n_models']} models, {size['dtype']}, "
        f"{size['model_bytes'] / 1e9:.3f} GB each ({size['input_bytes'] / 1e9:.3f} GB read per merge)\n\n"
        f"cache: {size['cache']}; settle {args.settle:g} s; median of {args.repeat}; "
        f"device: {args.device or 'tool default'}"
        f"{load_txt}\n"
    )


def machine_info() -> dict:
    info = {
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "cpus": os.cpu_count(),
        "loadavg_at_start": list(os.getloadavg()),
    }
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                info["mem_total_gib"] = round(int(line.split()[1]) / 2**20, 1)
                break
    except OSError:
        pass
    return info


# --------------------------------------------------------------------------- main


def bench_size(
    params: str, args: argparse.Namespace, tools: list[Tool], methods: list[str], cache: str
) -> dict:
    tag = f"{params}-{args.dtype}-n{args.n_models}-s{args.seed}"
    if args.hidden_size:
        tag += f"-h{args.hidden_size}"
    if args.layers:
        tag += f"-l{args.layers}"
    work = args.workdir.resolve()
    ckpt_root = work / f"ckpt-{tag}"
    gen = [
        sys.executable, str(HERE / "make_checkpoints.py"), str(ckpt_root),
        "--params", params, "--n-models", str(args.n_models), "--dtype", args.dtype,
        "--seed", str(args.seed), "--shard-size", args.ckpt_shard_size,
    ]  # fmt: skip
    if args.hidden_size:
        gen += ["--hidden-size", str(args.hidden_size)]
    if args.layers:
        gen += ["--layers", str(args.layers)]
    subprocess.run(gen, check=True)
    settings = json.loads((ckpt_root / ".complete.json").read_text())
    models = [ckpt_root / f"model_{k}" for k in range(args.n_models)]
    inputs = safetensors_files(models)
    input_bytes = sum(p.stat().st_size for p in inputs)
    model_bytes = sum(p.stat().st_size for p in safetensors_files(models[:1]))
    specs = write_specs(work / "specs" / tag, models, args.dtype, methods)
    out_root = work / "out" / tag
    log_root = work / "logs" / tag
    shutil.rmtree(log_root, ignore_errors=True)
    out_root.mkdir(parents=True, exist_ok=True)

    jobs: list[tuple[str, str, list[str], Path]] = []
    if not args.no_startup:
        cmd = [sys.executable, "-c", "import torch, safetensors"]
        jobs.append(("(startup)", "python+torch import", cmd, out_root / "none"))
    floor_out = out_root / "floor.bin"
    if not args.no_floor:
        cmd = [sys.executable, str(HERE / "io_floor.py"), "--out", str(floor_out)]
        cmd += ["--import-torch"] if args.floor_import_torch else []
        cmd += [str(m) for m in models]
        jobs.append(("(floor)", "io_floor", cmd, floor_out))
        jobs.append(("(floor)", "io_floor --fsync", cmd[:2] + ["--fsync"] + cmd[2:], floor_out))
    for method in methods:
        for tool in tools:
            out = out_root / f"{tool.name}-{method}"
            jobs.append((method, tool.name, tool.command(specs[method], out, args), out))

    size: dict = {
        "tag": tag,
        "params_arg": params,
        "num_params": settings["num_params"],
        "shape": settings["shape"],
        "n_models": args.n_models,
        "dtype": args.dtype,
        "model_bytes": model_bytes,
        "input_bytes": input_bytes,
        "cache": cache,
        "specs": {m: str(p) for m, p in specs.items()},
        "load_start": [round(x, 2) for x in os.getloadavg()],
        "results": {
            f"{m}/{t}": {"method": m, "tool": t, "cmd": c, "runs": []} for m, t, c, _ in jobs
        },
    }
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
    floor_out.unlink(missing_ok=True)
    size["load_end"] = [round(x, 2) for x in os.getloadavg()]
    for res in size["results"].values():
        res["summary"] = summarize(res["runs"])

    if args.compare:
        size["compare"] = {}
        names = [t.name for t in tools]
        if "wsmerge" in names and "mergekit" in names:
            for method in methods:
                a, b = out_root / f"wsmerge-{method}", out_root / f"mergekit-{method}"
                if not (a.is_dir() and b.is_dir()):
                    continue
                cmd = [sys.executable, str(HERE / "compare_outputs.py"), str(a), str(b)]
                r = subprocess.run(cmd + ["--atol", str(args.atol)], capture_output=True, text=True)
                try:
                    size["compare"][method] = json.loads(r.stdout)
                except json.JSONDecodeError:
                    size["compare"][method] = {"error": (r.stderr or r.stdout)[-2000:]}
        else:
            print("--compare needs both wsmerge and --mergekit; skipped", file=sys.stderr)
    if not args.keep_outputs:
        for method in methods:
            for tool in tools:
                shutil.rmtree(out_root / f"{tool.name}-{method}", ignore_errors=True)
    return size


def main(argv: list[str] | None = None) -> int:
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
        default=",".join(METHODS),
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
    args = ap.parse_args(argv)

    args.dtype = DTYPE_ALIASES.get(args.dtype.lower(), args.dtype.lower())
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        ap.error(f"unknown method(s) {unknown}; choose from {list(METHODS)}")
    if args.repeat < 1:
        ap.error("--repeat must be >= 1")

    notes: list[str] = []
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

    report: dict = {
        "machine": machine_info(),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "tools": {t.name: t.exe for t in tools},
        "notes": notes,
        "sizes": [],
    }
    for params in [p.strip() for p in args.params.split(",") if p.strip()]:
        size = bench_size(params, args, tools, methods, cache)
        report["sizes"].append(size)
        print()
        print(size_header(size, args))
        print(size_table(size))
        for method, cmp in size.get("compare", {}).items():
            if "error" in cmp:
                print(f"\ncompare {method}: error: {cmp['error'][-300:]}")
            else:
                print(
                    f"\ncompare {method} (wsmerge vs mergekit): {cmp['tensors_compared']} tensors, "
                    f"max |diff| {cmp['max_abs_diff']:.3g} (rel {cmp['max_rel_diff']:.3g}), "
                    f"{'equal' if cmp['equal_within_atol'] else 'DIFFERENT'} at atol {cmp['atol']:g}"
                    f" ({cmp.get('elements_over_atol', 0)} elements in "
                    f"{cmp.get('tensors_over_atol', 0)} tensors over it)"
                )
        print(flush=True)
    for note in notes:
        print(f"note: {note}")
    report["machine"]["loadavg_at_end"] = list(os.getloadavg())
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}")
    failed = [
        f"{s['tag']}:{key}"
        for s in report["sizes"]
        for key, res in s["results"].items()
        if not res["summary"].get("ok")
    ]
    if failed:
        print(
            f"failed runs: {', '.join(failed)} (see logs under {args.workdir}/logs)",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
