"""Fisher merging's and RegMean's claims in miniature: data-aware merges beat simple averaging.

    python examples/merge_digits.py                          # both families, seeds 0-4 (~1-2 min on 2 cores)
    python examples/merge_digits.py --family classes --seeds 0 --work /tmp/md
    python examples/merge_digits.py --prepare examples/digits --seeds 1    # the committed examples/digits/

Each family is one base MLP (width 64, depth 2) and three fine-tunes from it, one per task,
every model keeping the 10-way head. The fine-tunes are merged with equal weights, as the
RegMean paper's merges and the Fisher paper's ensembling experiments are, by the same YAML
specs a user runs with `wsmerge run`:

- ``classes``: a weak base (5 epochs on 30% of digits) and fine-tunes on digits 0-3, 4-6 and
  7-9. Each forgets the other tasks; the score is accuracy on all test digits.
- ``rotations``: a base trained on upright digits (20 epochs, all of them) and fine-tunes on
  digits rotated by 90, 180 and 270 degrees, which the base cannot read. Inputs, not labels,
  differ between tasks; the score is the mean test accuracy over the three rotations.

Rows: the base, each fine-tune and the best of them (picked on test, an upper bound on keeping
one model); simple averaging; task arithmetic with lambda picked on validation data (a reference
that is tuned); Fisher merging with the authors' settings (the defaults: max(F, 1e-6) for the
first model only, weights divided by each whole Fisher's norm) for each estimator, and with
the plain variant (F + 1e-6 for every model, unnormalized) this project used to default to;
RegMean with alpha 0.1 (the default, the authors' emotion and NER runs) and alpha 1 (their
GLUE runs, no shrinkage). Statistics: each fine-tune's exact, sampled (4 draws) and empirical
Fisher and its Grams, on (up to) 512 training examples of its own task.

`--json` writes every seed's rows and the summary (mean, sample standard deviation, min, max,
and on how many seeds each method beats averaging); `--plot` draws the summary.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, NamedTuple

import torch

from weightspace.ir import WeightSpace

ARCH = {"arch": "mlp", "width": 64, "depth": 2}
PLAIN = ", floor_mode: add, normalize_fishers: false, favor_target: false"


class Family(NamedTuple):
    tasks: tuple[str, ...]
    joint: str | None          # a dataset scored as a whole, or None: the mean over the tasks
    base_data: str = "digits"
    base_epochs: int = 5
    base_fraction: float = 0.3
    ft_epochs: int = 5


FAMILIES = {
    "classes": Family(("digits:classes=0-3", "digits:classes=4-6", "digits:classes=7-9"), "digits"),
    "rotations": Family(("digits:rotate=90", "digits:rotate=180", "digits:rotate=270"), None,
                        base_epochs=20, base_fraction=1.0),
}
TASKS = FAMILIES["classes"].tasks


def _save(tensors: dict[str, torch.Tensor], config: dict, out: Path) -> Path:
    WeightSpace.from_tensors(tensors).save(out, config=config, overwrite=True)
    return out


def _short(ref: str) -> str:
    return ref.split(":", 1)[1]


def prepare_models(workdir: str | Path, seed: int = 0, *, family: Family = FAMILIES["classes"],
                   n_examples: int = 512,
                   estimators: tuple[str, ...] = ("exact", "sampled", "empirical")) -> tuple[Path, list[Path]]:
    """Train the base and one fine-tune per task; write each fine-tune's Fisher files and Gram file."""
    from weightspace.merges.fisher import fisher_diagonal, save_fisher
    from weightspace.merges.regmean import gram_matrices, save_gram
    from weightspace.zoo.bind import open_batches, open_model
    from weightspace.zoo.build import checkpoint_config
    from weightspace.zoo.data import load_task
    from weightspace.zoo.train import ModelRun, TrainConfig, train

    work = Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    base_task = load_task(family.base_data)

    # 1. the base
    base_run = ModelRun(dataset=family.base_data, arch=ARCH, seed=seed,
                        train=TrainConfig(epochs=family.base_epochs, data_fraction=family.base_fraction,
                                          lr=0.05))
    res = train(base_run, task=base_task)
    base = _save(res.checkpoints[-1].tensors,
                 checkpoint_config(base_run, family.base_epochs, base_task.input_shape,
                                   base_task.num_classes), work / "base")

    # 2. one fine-tune per task, from the base
    fts = []
    for i, ref in enumerate(family.tasks):
        run = ModelRun(dataset=ref, arch=ARCH, seed=seed, init=str(base),
                       train=TrainConfig(epochs=family.ft_epochs, lr=0.02, batch_size=32))
        task = load_task(ref)
        r = train(run, task=task)
        fts.append(_save(r.checkpoints[-1].tensors,
                         checkpoint_config(run, family.ft_epochs, task.input_shape, task.num_classes),
                         work / f"ft{i}"))

    # 3. statistics: each fine-tune on its own task's training data
    for i, (ref, ft) in enumerate(zip(family.tasks, fts)):
        adapter = open_model(ft)
        batches = open_batches(ref, adapter, split="train", n_examples=n_examples)
        for est in estimators:
            save_fisher(fisher_diagonal(adapter, batches, estimator=est, n_samples=4, seed=seed),
                        work / f"ft{i}.fisher-{est}.safetensors")
        save_gram(gram_matrices(adapter, batches), work / f"ft{i}.gram.safetensors")
    return base, fts


def _specs(n: int) -> dict[str, str]:
    def models(extra: str = "") -> str:
        return "\n".join(f"  - model: ft{i}\n    parameters: {{weight: 1.0{extra.format(i=i)}}}"
                         for i in range(n))

    def fisher(est: str, params: str = "") -> str:
        text = "merge_method: fisher\nmodels:\n" + models(f", fisher: ft{{i}}.fisher-{est}.safetensors")
        return text + (f"\nparameters: {{fisher_floor: 1.0e-6{params}}}" if params else "")

    return {
        "average": "merge_method: linear\nmodels:\n" + models(),
        "task arithmetic": "merge_method: task_arithmetic\nbase_model: base\nmodels:\n" + models(),
        "fisher exact (authors)": fisher("exact"),
        "fisher exact (plain)": fisher("exact", PLAIN),
        "fisher sampled (authors)": fisher("sampled"),
        "fisher empirical (authors)": fisher("empirical"),
        "regmean alpha=0.1": "merge_method: regmean\nmodels:\n" + models(", gram: ft{i}.gram.safetensors")
                             + "\nparameters: {alpha: 0.1}",
        "regmean alpha=1": "merge_method: regmean\nmodels:\n" + models(", gram: ft{i}.gram.safetensors")
                           + "\nparameters: {alpha: 1.0}",
    }


def run_family(name: str, workdir: str | Path, seed: int = 0,
               lambdas: tuple[float, ...] = (0.2, 0.4, 0.6, 0.8, 1.0)) -> dict[str, Any]:
    """Train, merge, evaluate one family for one seed: {"seed", "rows": [{method, per task, joint}]}."""
    from weightspace.merge import plan_merge, run_plan
    from weightspace.spec import parse_spec
    from weightspace.zoo.search import accuracy, with_value

    family = FAMILIES[name]
    work = Path(workdir)
    base, fts = prepare_models(work, seed, family=family)

    def evaluate(model_dir: Path) -> dict[str, float]:
        out = {_short(ref): accuracy(model_dir, ref, "test") for ref in family.tasks}
        out["joint"] = (accuracy(model_dir, family.joint, "test") if family.joint
                        else sum(out.values()) / len(out))
        return out

    def score_on_val(model_dir: Path) -> float:
        if family.joint:
            return accuracy(model_dir, family.joint, "val")
        return sum(accuracy(model_dir, ref, "val") for ref in family.tasks) / len(family.tasks)

    rows = [{"method": "base", **evaluate(base)}]
    rows += [{"method": f"fine-tune {_short(ref)}", **evaluate(ft)} for ref, ft in zip(family.tasks, fts)]
    # the one fine-tune that scores best, picked on test: an upper bound on keeping a single model
    top = max(rows[1:], key=lambda r: r["joint"])
    rows.append({**top, "method": "best single fine-tune", "note": top["method"].split(" ", 1)[1]})
    for method, text in _specs(len(fts)).items():
        stem = "".join(c if c.isalnum() else "_" for c in method)
        spec_path = work / f"{stem}.yaml"
        spec_path.write_text(text + "\n")
        spec = parse_spec(spec_path.read_text(), str(spec_path))
        note = ""
        if method == "task arithmetic":      # lambda on validation data (the family's score), as the papers do
            scores = {}
            for lam in lambdas:
                out = work / "search" / f"lambda{lam:g}"
                run_plan(plan_merge(with_value(spec, "weight", lam), spec_dir=work), out,
                         overwrite=True, progress=False)
                scores[lam] = score_on_val(out)
            best = max(scores, key=lambda k: (scores[k], -k))
            spec = with_value(spec, "weight", best)
            note = f"lambda={best:g}"
        out = work / "merged" / stem
        run_plan(plan_merge(spec, spec_dir=work), out, overwrite=True, progress=False)
        rows.append({"method": method, **evaluate(out), "note": note})
    return {"seed": seed, "rows": rows}


def _stats(v: list[float]) -> dict[str, float]:
    mean = sum(v) / len(v)
    sd = math.sqrt(sum((x - mean) ** 2 for x in v) / (len(v) - 1)) if len(v) > 1 else 0.0
    return {"mean": mean, "std": sd, "min": min(v), "max": max(v)}


def joint_of(per_seed: list[dict[str, Any]], method: str) -> list[float]:
    return [next(r["joint"] for r in s["rows"] if r["method"] == method) for s in per_seed]


def summarize(per_seed: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per method: mean, sample std, min and max of each column over seeds; the paired
    difference of its joint score from averaging's, and on how many seeds it is above it."""
    out = []
    cols = [c for c in per_seed[0]["rows"][0] if c not in ("method", "note")]
    avg = joint_of(per_seed, "average")
    for i, row in enumerate(per_seed[0]["rows"]):
        m: dict[str, Any] = {"method": row["method"]}
        for c in cols:
            m[c] = _stats([s["rows"][i][c] for s in per_seed])
        joint = [s["rows"][i]["joint"] for s in per_seed]
        m["beats_average"] = sum(j > a for j, a in zip(joint, avg))
        m["minus_average"] = _stats([j - a for j, a in zip(joint, avg)])
        notes = [s["rows"][i].get("note") for s in per_seed if s["rows"][i].get("note")]
        if notes:
            m["notes"] = notes
        out.append(m)
    return out


def format_summary(summary: list[dict[str, Any]], n_seeds: int) -> str:
    """The README's table: per-task means, joint mean ± std, joint minus averaging's (paired)."""
    cols = [c for c in summary[0] if c not in ("method", "beats_average", "minus_average", "notes")]
    lines = ["| method | " + " | ".join(cols[:-1]) + " | joint | joint − average | > average |",
             "| --- | " + " | ".join("---:" for _ in cols) + " | ---: | ---: |"]
    for m in summary:
        if m["method"] == "average":
            diff, beats = "", ""
        else:
            diff = f"{m['minus_average']['mean']:+.3f} ± {m['minus_average']['std']:.3f}"
            beats = f"{m['beats_average']}/{n_seeds}"
        cells = [f"{m[c]['mean']:.3f}" for c in cols[:-1]]
        lines.append(f"| {m['method']} | " + " | ".join(cells)
                     + f" | {m['joint']['mean']:.3f} ± {m['joint']['std']:.3f} | {diff} | {beats} |")
    return "\n".join(lines)


def format_rows(result: dict[str, Any]) -> str:
    rows = result["rows"]
    cols = [c for c in rows[0] if c not in ("method", "note")]
    lines = ["| method | " + " | ".join(cols) + " |", "| --- | " + " | ".join("---:" for _ in cols) + " |"]
    for r in rows:
        note = f" ({r['note']})" if r.get("note") else ""
        lines.append(f"| {r['method']}{note} | " + " | ".join(f"{r[c]:.3f}" for c in cols) + " |")
    return "\n".join(lines)


def plot(results: dict[str, Any], path: Path) -> None:
    from weightspace.extras import pyplot

    plt = pyplot()
    fams = list(results["families"])
    fig, axes = plt.subplots(1, len(fams), figsize=(6.5 * len(fams), 4.2), squeeze=False)
    for ax, fam in zip(axes[0], fams):
        summary = [m for m in results["families"][fam]["summary"] if not m["method"].startswith("fine-tune")]
        names = [m["method"] for m in summary]
        means = [m["joint"]["mean"] for m in summary]
        sds = [m["joint"]["std"] for m in summary]
        colors = ["#999999" if n in ("base", "best single fine-tune", "average", "task arithmetic") else
                  "#4477aa" if n.startswith("fisher") else "#cc6677" for n in names]
        ax.barh(range(len(names)), means, xerr=sds, color=colors, capsize=3)
        for s in results["families"][fam]["per_seed"]:
            ax.plot([r["joint"] for r in s["rows"] if not r["method"].startswith("fine-tune")],
                    range(len(names)), "k.", ms=3, alpha=0.6)
        ax.set_yticks(range(len(names)), names)
        ax.invert_yaxis()
        ax.set_xlabel("joint test accuracy (bars: mean ± std over seeds; dots: seeds)")
        ax.set_title(f"{fam}: {', '.join(_short(t) for t in results['families'][fam]['tasks'])}",
                     fontsize=10)
        ax.set_xlim(0, 1)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> None:
    import argparse
    import json
    import subprocess
    import sys

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", choices=[*FAMILIES, "all"], default="all")
    ap.add_argument("--seeds", type=int, nargs="+", default=list(range(10)))
    ap.add_argument("--work", type=Path, default=Path("runs/merge-digits-work"))
    ap.add_argument("--json", type=Path, default=None, help="write every seed's rows and the summary as JSON")
    ap.add_argument("--plot", type=Path, default=None, help="draw the summary (needs the plot extra)")
    ap.add_argument("--prepare", type=Path, default=None,
                    help="only train the classes family's models and write exact Fishers and Grams into "
                         "this directory (how examples/digits/ was made: --prepare examples/digits --seeds 1)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.prepare is not None:
        prepare_models(args.prepare, args.seeds[0], estimators=("exact",))
        for i in range(len(TASKS)):  # the names the example specs use
            (args.prepare / f"ft{i}.fisher-exact.safetensors").replace(args.prepare / f"ft{i}.fisher.safetensors")
        return
    if args.plot is not None:
        from weightspace.extras import pyplot

        pyplot()  # a missing extra is reported before the work
    load = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    t0 = time.perf_counter()
    fams = list(FAMILIES) if args.family == "all" else [args.family]
    results: dict[str, Any] = {"command": " ".join(["python", "examples/merge_digits.py", *sys.argv[1:]]),
                               "seeds": args.seeds, "families": {}}
    for fam in fams:
        per_seed = []
        for seed in args.seeds:
            res = run_family(fam, args.work / fam / f"seed{seed}", seed)
            per_seed.append(res)
            print(f"{fam}, seed {seed}\n{format_rows(res)}\n", flush=True)
        summary = summarize(per_seed)
        print(f"{fam}, seeds {args.seeds}: mean ± std\n{format_summary(summary, len(args.seeds))}\n")
        results["families"][fam] = {"tasks": list(FAMILIES[fam].tasks), "joint": FAMILIES[fam].joint
                                    or "mean over the tasks", "per_seed": per_seed, "summary": summary}
    results["seconds"] = round(time.perf_counter() - t0, 1)
    results["uptime_before"] = load
    results["uptime_after"] = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    print(f"{results['seconds']} s; load before: {load}; after: {results['uptime_after']}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    if args.plot:
        plot(results, args.plot)


if __name__ == "__main__":
    main()
