"""Evolutionary merge search on the committed digit fine-tunes, against the other merges.

    python examples/evolve_digits.py --json benchmarks/results/evolve_digits.json
    python examples/evolve_digits.py --seeds 0 1 --budget 24       # quicker

The models are examples/digits/ (seed 1 of merge_digits.py's `classes` family: a weak base and
fine-tunes on digits 0-3, 4-6 and 7-9); every score is accuracy on all ten digits, searched on
the validation split, reported on the test split. Rows:

- evolve, CMA-ES: examples/evolve_digits.yaml (task arithmetic, one weight per fine-tune and
  layer group, 6 values in [0, 1.5]), `--budget` candidates, one row per seed;
- evolve, random search: the same spec and budget with `optimizer: random`;
- task arithmetic with lambda searched: every weight lambda, on a grid of `--budget` points in
  [0, 1.5], the best on validation (ties: the smaller lambda);
- TIES with its defaults (weight 1, density 1 unless set, lambda 1) and with density 0.5;
- aTLAS: examples/atlas.yaml (coefficients learned on the validation split, committed).

Then the wall time of one search (seed 0, `--timing-budget` candidates) with 1 worker (this
process), 2 local processes and 2 Ray workers, and the overhead per candidate: wall time x
workers / candidates minus the mean merge + evaluation time measured inside the workers; and
the same after start-up (from the first result to the last, so without starting the workers).

Rows also: the CMA-ES search over 3 weights (one per fine-tune) at the same budget, and the
6-weight searches at `--long-budget` candidates.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent


def _merge_and_score(spec_path: Path, splits=("val", "test")) -> dict[str, float]:
    from weightspace.merge import plan_merge, run_plan
    from weightspace.spec import load_spec
    from weightspace.zoo.search import accuracy

    with tempfile.TemporaryDirectory() as d:
        run_plan(plan_merge(load_spec(spec_path), spec_dir=spec_path.parent), Path(d) / "m", progress=False)
        return {s: accuracy(Path(d) / "m", "digits", s) for s in splits}


def _with_weight(lam: float, work: Path) -> Path:
    p = work / f"ta-{lam:.4f}.yaml"
    d = EXAMPLES / "digits"
    p.write_text("merge_method: task_arithmetic\nbase_model: %s\nmodels:\n" % (d / "base") + "".join(
        f"  - model: {d / f'ft{i}'}\n    parameters: {{weight: {lam}}}\n" for i in range(3))
        + "parameters: {lambda: 1.0}\ndtype: float32\n")
    return p


def _ties(density: float | None, work: Path) -> Path:
    d = EXAMPLES / "digits"
    dens = "" if density is None else f", density: {density}"
    p = work / f"ties-{density}.yaml"
    p.write_text("merge_method: ties\nbase_model: %s\nmodels:\n" % (d / "base") + "".join(
        f"  - model: {d / f'ft{i}'}\n    parameters: {{weight: 1.0{dens}}}\n" for i in range(3))
        + "dtype: float32\n")
    return p


def _search_spec(optimizer: str, work: Path, per_layer: bool = True) -> Path:
    text = (EXAMPLES / "evolve_digits.yaml").read_text().replace("optimizer: cma", f"optimizer: {optimizer}")
    text = text.replace("digits/", str(EXAMPLES / "digits") + "/")
    if not per_layer:   # one weight per fine-tune (3 values)
        text = text.replace("{weight: [{search: [0, 1.5]}, {search: [0, 1.5]}]}", "{weight: {search: [0, 1.5]}}")
    p = work / f"evolve-{optimizer}-{'layers' if per_layer else 'models'}.yaml"
    p.write_text(text)
    return p


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--budget", type=int, default=48)
    ap.add_argument("--long-budget", type=int, nargs="*", default=[192],
                    help="also run the 6-weight searches with these budgets")
    ap.add_argument("--timing-budget", type=int, default=96)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--no-timing", action="store_true", help="skip the 1 / 2 worker wall times")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    from weightspace.zoo.evolve import load_search_spec, run_search

    work = Path(tempfile.mkdtemp(prefix="evolve-digits-"))
    load = [os.getloadavg()[0]]
    rows: dict[str, list[dict]] = {}
    try:
        runs = [(opt, True, args.budget) for opt in ("cma", "random")] + [("cma", False, args.budget)]
        runs += [(opt, True, b) for b in args.long_budget for opt in ("cma", "random")]
        for opt, per_layer, budget in runs:
            s = load_search_spec(_search_spec(opt, work, per_layer))
            name = (f"evolve ({'CMA-ES' if opt == 'cma' else 'random search'}), "
                    f"{'6 weights (3 fine-tunes x 2 layer groups)' if per_layer else '3 weights'}, "
                    f"{budget} candidates")
            for seed in args.seeds:
                r = run_search(s, work / f"{opt}-{per_layer}-{budget}-{seed}", budget=budget,
                               executor="local", workers=1, seed=seed)
                rows.setdefault(name, []).append(
                    {"seed": seed, "val": r["best"]["value"], "test": r["test"]["value"],
                     "params": r["best"]["params"]})
        grid = [round(1.5 * i / (args.budget - 1), 6) for i in range(args.budget)]
        ta = {lam: _merge_and_score(_with_weight(lam, work), ("val",))["val"] for lam in grid}
        lam = max(grid, key=lambda v: (ta[v], -v))
        rows["task arithmetic, lambda searched"] = [{"val": ta[lam], "lambda": lam,
                                                     "test": _merge_and_score(_with_weight(lam, work))["test"]}]
        rows["TIES defaults"] = [_merge_and_score(_ties(None, work))]
        rows["TIES density 0.5"] = [_merge_and_score(_ties(0.5, work))]
        rows["aTLAS (examples/atlas.yaml)"] = [_merge_and_score(EXAMPLES / "atlas.yaml")]
        load.append(os.getloadavg()[0])
        timing = {}
        if not args.no_timing:
            s = load_search_spec(_search_spec("cma", work))
            for name, kw in (("1 worker (in process)", dict(executor="local", workers=1)),
                             ("2 local processes", dict(executor="local", workers=2)),
                             ("2 Ray workers (local instance)", dict(executor="ray", workers=2))):
                if kw["executor"] == "ray":
                    import importlib.util

                    if importlib.util.find_spec("ray") is None:
                        continue
                out = work / f"t-{kw['executor']}-{kw['workers']}"
                t = time.perf_counter()
                r = run_search(s, out, budget=args.timing_budget, seed=0, **kw)
                wall = time.perf_counter() - t
                from weightspace.zoo.evolve.log import SearchLog

                log = SearchLog(out).rows()
                merge = statistics.mean(x["merge_s"] for x in log)
                ev = statistics.mean(x["eval_s"] for x in log)
                per = r["search_seconds"] * kw["workers"] / len(log)
                ends = sorted(x["elapsed_s"] for x in log)     # when each result reached the parent
                steady = (ends[-1] - ends[0]) / (len(log) - 1) * kw["workers"]
                timing[name] = {"wall_s": round(wall, 2), "search_s": r["search_seconds"],
                                "merge_s": round(merge, 4), "eval_s": round(ev, 4),
                                "worker_s_per_candidate": round(per, 4),
                                "overhead_s_per_candidate": round(per - merge - ev, 4),
                                "steady_overhead_s_per_candidate": round(steady - merge - ev, 4),
                                "load_1min": round(os.getloadavg()[0], 2)}
        load.append(os.getloadavg()[0])
    finally:
        shutil.rmtree(work, ignore_errors=True)
    lines = ["| method | seeds | validation | test |", "| --- | ---: | ---: | ---: |"]
    def fmt(rs: list[dict], key: str) -> str:
        v = [r[key] for r in rs]
        return f"{statistics.mean(v):.3f} ± {statistics.stdev(v):.3f}" if len(v) > 1 else f"{v[0]:.3f}"

    for name, rs in rows.items():
        lines.append(f"| {name} | {len(rs) if len(rs) > 1 else '—'} | {fmt(rs, 'val')} | {fmt(rs, 'test')} |")
    print("\n".join(lines))
    if timing:
        print("\n| run | wall s | merge s | evaluation s | overhead s / candidate | after start-up |")
        print("| --- | ---: | ---: | ---: | ---: | ---: |")
        for name, t in timing.items():
            print(f"| {name} | {t['wall_s']:.2f} | {t['merge_s']:.4f} | {t['eval_s']:.4f} | "
                  f"{t['overhead_s_per_candidate']:.4f} | {t['steady_overhead_s_per_candidate']:.4f} |")
    print(f"load (1 min) at start, after the table, at the end: {load}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"command": " ".join(["python", "examples/evolve_digits.py",
                                                                *sys.argv[1:]]),
                                         "budget": args.budget, "long_budget": args.long_budget,
                                         "timing_budget": args.timing_budget, "seeds": args.seeds, "rows": rows,
                                         "timing": timing, "load_1min": load,
                                         "uptime": subprocess.run(["uptime"], capture_output=True,
                                                                  text=True).stdout.strip()}, indent=1) + "\n")


if __name__ == "__main__":
    main()
