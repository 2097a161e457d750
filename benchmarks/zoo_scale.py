"""Zoo builds at scale: models per minute, per-model overhead and peak RSS as the zoo grows.

    python benchmarks/zoo_scale.py                          # 1,000 and 10,000 models, local and Ray
    python benchmarks/zoo_scale.py --models 1000,3000 --executors local --json /tmp/z.json

Each build is a grid of tiny MLPs on digits (width 4 and 8, depth 1, one epoch,
batch 32; seeds fill the grid), built from empty into a fresh folder by
`build_zoo` in a child process, with `--workers` processes (or local Ray CPUs).
This script samples the child's whole process tree from /proc every 0.2 s
(Ray's daemons and workers included: they descend from the driver): peak of
the summed RSS, and of the summed PSS, which counts shared pages once (Ray's
object store is shared memory). The child reports, per saved model, when it
was saved and its share of its batch's training time; from these:

- models/min: models / build wall time (`build_zoo`'s own clock: opening the
  zoo, planning, starting workers, training, saving, compacting the catalog);
- training time: the sum of the models' training seconds, divided by the
  workers (the wall the training alone would take, perfectly spread);
- per-model overhead: (wall - training time) / models, for the whole build and
  for its first and last thousand models (wall between the thousandth saves);
- write() bytes per model: what the building process wrote (/proc/self/io
  wchar: model files, catalog, pipes to its workers).

The machine's load average is recorded before and after every build. Results
go to benchmarks/results/zoo_scale.json; `--table` prints the README's table
from it and from results/zoo_scale_before.json (the same script run on the
code before the catalog log).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def spec_text(n: int, epochs: int) -> str:
    if n % 2:
        raise SystemExit("--models: even numbers only (two widths)")
    seeds = ", ".join(str(s) for s in range(n // 2))
    return (f"name: scale-{n}\ndataset: digits\narch: {{arch: mlp, depth: 1}}\n"
            f"train: {{epochs: {epochs}, batch_size: 32}}\ngrid:\n  width: [4, 8]\n  seed: [{seeds}]\n")


# ------------------------------------------------------------------ child: one build, timed from inside

def child(spec_path: str, out: str, executor: str, workers: int, timings: str) -> None:
    from weightspace.yaml_io import read_yaml_file  # noqa: F401  (imports before the clock starts)
    from weightspace.zoo.build import build_zoo
    from weightspace.zoo.spec import parse_zoo_spec

    text = Path(spec_path).read_text()
    spec = parse_zoo_spec(text, source=spec_path, max_models=10**6)
    saved: list[tuple[float, float]] = []
    t0 = time.perf_counter()
    report = build_zoo(spec, out, spec_text=text, executor=executor, workers=workers, yes=True,
                       progress=False, on_model=lambda row: saved.append(
                           (time.perf_counter() - t0, float(row["train_seconds"]))))
    io = dict(line.split(": ") for line in Path("/proc/self/io").read_text().splitlines())
    Path(timings).write_text(json.dumps({"seconds": report.seconds, "trained": report.trained,
                                         "saved": saved, "wchar": int(io["wchar"])}))


# ------------------------------------------------------------------ parent: run, sample memory, summarize

def _tree(root: int) -> list[int]:
    parent: dict[int, int] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                stat = Path(f"/proc/{d}/stat").read_text()
            except OSError:
                continue
            parent[int(d)] = int(stat.rsplit(")", 1)[1].split()[1])
    out, todo = [], [root]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(c for c, pp in parent.items() if pp == p)
    return out


def _kib(path: str, field: str) -> int:
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def sample(pid: int) -> tuple[int, int, int]:
    """(summed RSS KiB, summed PSS KiB, processes) of the tree under `pid`."""
    pids = _tree(pid)
    return (sum(_kib(f"/proc/{p}/status", "VmRSS") for p in pids),
            sum(_kib(f"/proc/{p}/smaps_rollup", "Pss") for p in pids), len(pids))


def chunk_stats(saved: list[tuple[float, float]], workers: int, size: int = 1000) -> list[dict]:
    """Per `size` saved models: wall between their last saves, training seconds, overhead per model."""
    out, prev_t = [], 0.0
    for i in range(0, len(saved), size):
        part = saved[i:i + size]
        wall = part[-1][0] - prev_t
        train = sum(s for _, s in part) / workers
        out.append({"models": f"{i + 1}-{i + len(part)}", "wall_s": round(wall, 3),
                    "models_per_min": round(60 * len(part) / wall, 1),
                    "overhead_ms_per_model": round(1000 * (wall - train) / len(part), 3)})
        prev_t = part[-1][0]
    return out


def measure(n: int, executor: str, workers: int, epochs: int, work: Path) -> dict:
    spec = work / f"scale-{n}.yaml"
    spec.write_text(spec_text(n, epochs))
    out = work / f"zoo-{n}-{executor}"
    shutil.rmtree(out, ignore_errors=True)
    timings = work / "timings.json"
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, __file__, "--child", str(spec), str(out), executor,
                             str(workers), str(timings)])
    peak_rss = peak_pss = procs = 0
    while True:      # wait4, not poll: its rusage is this child's (and its reaped descendants')
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        rss, pss, k = sample(proc.pid)
        peak_rss, peak_pss, procs = max(peak_rss, rss), max(peak_pss, pss), max(procs, k)
        time.sleep(0.2)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall_process = time.perf_counter() - t0
    load_after = os.getloadavg()
    if proc.returncode:
        raise SystemExit(f"build of {n} models ({executor}) failed with exit code {proc.returncode}")
    t = json.loads(timings.read_text())
    saved, wall = t["saved"], t["seconds"]
    train = sum(s for _, s in saved) / workers
    chunks = chunk_stats(saved, workers)
    catalog = sorted(p.name for p in out.iterdir() if p.name.startswith("catalog"))
    shutil.rmtree(out, ignore_errors=True)
    return {"models": n, "executor": executor, "workers": workers, "epochs": epochs,
            "threads_per_worker": max(1, len(os.sched_getaffinity(0)) // workers),
            "build_wall_s": round(wall, 2), "process_wall_s": round(wall_process, 2),
            "models_per_min": round(60 * n / wall, 1),
            "training_s_per_worker": round(train, 2),
            "overhead_ms_per_model": round(1000 * (wall - train) / n, 3),
            "first_thousand": chunks[0], "last_thousand": chunks[-1], "thousands": chunks,
            "write_bytes_per_model": round(t["wchar"] / n),
            "peak_tree_rss_mib": round(peak_rss / 1024, 1), "peak_tree_pss_mib": round(peak_pss / 1024, 1),
            "max_processes": procs,
            "largest_process_maxrss_mib": round(usage.ru_maxrss / 1024, 1),
            "catalog_files_after": catalog,
            "load_before": [round(x, 2) for x in load_before], "load_after": [round(x, 2) for x in load_after]}


def format_table(results: list[tuple[str, dict]]) -> str:
    """The README's table: one line per build of each (code, results JSON)."""
    head = ("| code | models | executor | models/min | overhead per model | first 1k | last 1k "
            "| written per model | peak RSS (PSS) | load |")
    lines = [head, "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for code, res in results:
        for r in res["rows"]:
            lines.append(
                f"| {code} | {r['models']:,} | {r['executor']} | {r['models_per_min']:,.0f} "
                f"| {r['overhead_ms_per_model']:.1f} ms | {r['first_thousand']['overhead_ms_per_model']:.1f} ms "
                f"| {r['last_thousand']['overhead_ms_per_model']:.1f} ms | {r['write_bytes_per_model'] / 1024:.1f} KiB "
                f"| {r['peak_tree_rss_mib']:,.0f} ({r['peak_tree_pss_mib']:,.0f}) MiB "
                f"| {r['load_before'][0]:.2f} → {r['load_after'][0]:.2f} |")
    return "\n".join(lines)


def committed_table() -> str:
    res = HERE / "results"
    return format_table([("before", json.loads((res / "zoo_scale_before.json").read_text())),
                         ("now", json.loads((res / "zoo_scale.json").read_text()))])


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]), sys.argv[6])
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="1000,10000", help="comma-separated zoo sizes (even)")
    ap.add_argument("--executors", default="local,ray")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--label", default="", help="stored with the results (e.g. the commit measured)")
    ap.add_argument("--json", type=Path, default=HERE / "results" / "zoo_scale.json")
    ap.add_argument("--table", action="store_true", help="print the README table of the committed results")
    args = ap.parse_args()
    if args.table:
        print(committed_table())
        return
    import torch

    rows = []
    with tempfile.TemporaryDirectory(prefix="zoo-scale-") as tmp:
        for executor in args.executors.split(","):
            for n in (int(x) for x in args.models.split(",")):
                r = measure(n, executor, args.workers, args.epochs, Path(tmp))
                rows.append(r)
                print(f"{n:>6} models {executor:<5}: {r['models_per_min']:>8.1f} models/min, "
                      f"overhead {r['overhead_ms_per_model']:.2f} ms/model (first 1k "
                      f"{r['first_thousand']['overhead_ms_per_model']:.2f}, last 1k "
                      f"{r['last_thousand']['overhead_ms_per_model']:.2f}), peak tree RSS "
                      f"{r['peak_tree_rss_mib']:.0f} MiB (PSS {r['peak_tree_pss_mib']:.0f}), load "
                      f"{r['load_before'][0]:.2f} -> {r['load_after'][0]:.2f}", flush=True)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({
        "label": args.label, "machine": platform.platform(), "cpus": len(os.sched_getaffinity(0)),
        "torch": torch.__version__, "python": platform.python_version(),
        "memory": "peak of the summed VmRSS / Pss of the build's process tree, sampled from /proc every 0.2 s",
        "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
