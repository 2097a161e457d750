"""Fisher merging's claim in miniature, on digits: data-aware merges beat simple averaging.

    python examples/merge_digits.py                      # seeds 0-5, work files in runs/merge-digits-work/
    python examples/merge_digits.py --seeds 0 --work /tmp/md

`digits_task_merge` follows Matena & Raffel's setup at digits scale: a base
MLP trained briefly on all of digits, one fine-tune per digit task
(classes 0-3, 4-6, 7-9; every model keeps the 10-way head), then merges of the
fine-tunes by simple averaging, task arithmetic (lambda picked on validation
data), Fisher-weighted averaging with each estimator, and RegMean, each
written by the same YAML specs a user runs with `wsmerge run`. Accuracy is
measured per task (that task's test images) and jointly (all test digits).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from weightspace.ir import WeightSpace

TASKS = ("digits:classes=0-3", "digits:classes=4-6", "digits:classes=7-9")
ARCH = {"arch": "mlp", "width": 64, "depth": 2}


def _save(tensors: dict[str, torch.Tensor], config: dict, out: Path) -> Path:
    WeightSpace.from_tensors(tensors).save(out, config=config, overwrite=True)
    return out


def _yaml(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def prepare_models(workdir: str | Path, seed: int = 0, *, base_epochs: int = 5, base_fraction: float = 0.3,
                   ft_epochs: int = 5, n_examples: int = 512,
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
    digits = load_task("digits")

    # 1. the base: a short run on a fraction of all digits
    base_run = ModelRun(dataset="digits", arch=ARCH, seed=seed,
                        train=TrainConfig(epochs=base_epochs, data_fraction=base_fraction, lr=0.05))
    res = train(base_run, task=digits)
    base = _save(res.checkpoints[-1].tensors,
                 checkpoint_config(base_run, base_epochs, digits.input_shape, digits.num_classes), work / "base")

    # 2. one fine-tune per task, from the base
    fts = []
    for i, ref in enumerate(TASKS):
        run = ModelRun(dataset=ref, arch=ARCH, seed=seed, init=str(base),
                       train=TrainConfig(epochs=ft_epochs, lr=0.02, batch_size=32))
        task = load_task(ref)
        r = train(run, task=task)
        fts.append(_save(r.checkpoints[-1].tensors,
                         checkpoint_config(run, ft_epochs, task.input_shape, task.num_classes), work / f"ft{i}"))

    # 3. statistics: each fine-tune on its own task's training data
    for i, (ref, ft) in enumerate(zip(TASKS, fts)):
        adapter = open_model(ft)
        batches = open_batches(ref, adapter, split="train", n_examples=n_examples)
        for est in estimators:
            save_fisher(fisher_diagonal(adapter, batches, estimator=est, n_samples=4, seed=seed),
                        work / f"ft{i}.fisher-{est}.safetensors")
        save_gram(gram_matrices(adapter, batches), work / f"ft{i}.gram.safetensors")
    return base, fts


def digits_task_merge(workdir: str | Path, seed: int = 0, *, base_epochs: int = 5,
                      base_fraction: float = 0.3, ft_epochs: int = 5, n_examples: int = 512,
                      lambdas: tuple[float, ...] = (0.2, 0.4, 0.6, 0.8, 1.0)) -> dict[str, Any]:
    """Train, merge, evaluate; returns {"rows": [{method, per-task acc, joint acc}], ...}."""
    from weightspace.merge import plan_merge, run_plan
    from weightspace.spec import parse_spec
    from weightspace.zoo.search import accuracy, search_merge, with_value

    work = Path(workdir)
    base, fts = prepare_models(work, seed, base_epochs=base_epochs, base_fraction=base_fraction,
                               ft_epochs=ft_epochs, n_examples=n_examples)

    def models(extra: str = "") -> str:
        return "\n".join(f"  - model: ft{i}\n    parameters: {{weight: 1.0{extra.format(i=i)}}}"
                         for i in range(len(fts)))

    specs = {
        "average": "merge_method: linear\nmodels:\n" + models(),
        "task arithmetic": "merge_method: task_arithmetic\nbase_model: base\nmodels:\n" + models(),
        "fisher (exact)": "merge_method: fisher\nmodels:\n" + models(", fisher: ft{i}.fisher-exact.safetensors"),
        "fisher (sampled)": "merge_method: fisher\nmodels:\n" + models(", fisher: ft{i}.fisher-sampled.safetensors"),
        "fisher (empirical)": "merge_method: fisher\nmodels:\n" + models(", fisher: ft{i}.fisher-empirical.safetensors"),
        "regmean": "merge_method: regmean\nmodels:\n" + models(", gram: ft{i}.gram.safetensors"),
    }

    def evaluate(model_dir: Path) -> dict[str, float]:
        out = {ref.split(":", 1)[1]: accuracy(model_dir, ref, "test") for ref in TASKS}
        out["joint"] = accuracy(model_dir, "digits", "test")
        return out

    rows = [{"method": "base", **evaluate(base)}]
    rows += [{"method": f"fine-tune {TASKS[i].split(':', 1)[1]}", **evaluate(ft)} for i, ft in enumerate(fts)]
    for name, text in specs.items():
        spec_path = _yaml(work / f"{name.replace(' ', '_').replace('(', '').replace(')', '')}.yaml", text + "\n")
        spec = parse_spec(spec_path.read_text(), str(spec_path))
        note = ""
        if name == "task arithmetic":      # lambda on validation data, as the papers do
            found = search_merge(spec, "weight", list(lambdas), data="digits", split="val", spec_dir=work)
            spec = with_value(spec, "weight", found.best)
            note = f"lambda={found.best:g}"
        out = work / "merged" / spec_path.stem
        run_plan(plan_merge(spec, spec_dir=work), out, overwrite=True, progress=False)
        rows.append({"method": name, **evaluate(out), "note": note})
    return {"seed": seed, "rows": rows}


def format_table(result: dict[str, Any]) -> str:
    rows = result["rows"]
    cols = [c for c in rows[0] if c not in ("method", "note")]
    lines = ["| method | " + " | ".join(f"acc {c}" for c in cols) + " |",
             "| --- | " + " | ".join("---:" for _ in cols) + " |"]
    for r in rows:
        note = f" ({r['note']})" if r.get("note") else ""
        lines.append(f"| {r['method']}{note} | " + " | ".join(f"{r[c]:.3f}" for c in cols) + " |")
    return "\n".join(lines)


def main() -> None:
    import argparse
    import json

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4, 5])
    ap.add_argument("--work", type=Path, default=Path("runs/merge-digits-work"))
    ap.add_argument("--json", type=Path, default=None, help="also write every table as JSON")
    ap.add_argument("--base-epochs", type=int, default=5)
    ap.add_argument("--base-fraction", type=float, default=0.3)
    ap.add_argument("--ft-epochs", type=int, default=5)
    ap.add_argument("--prepare", type=Path, default=None,
                    help="only train the models and write exact Fishers and Grams into this directory "
                         "(how examples/digits/ was made: --prepare examples/digits --seeds 1)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.prepare is not None:
        prepare_models(args.prepare, args.seeds[0], base_epochs=args.base_epochs,
                       base_fraction=args.base_fraction, ft_epochs=args.ft_epochs, estimators=("exact",))
        return
    results = []
    for seed in args.seeds:
        res = digits_task_merge(args.work / f"seed{seed}", seed, base_epochs=args.base_epochs,
                                base_fraction=args.base_fraction, ft_epochs=args.ft_epochs)
        results.append(res)
        print(f"seed {seed}\n{format_table(res)}\n")
    if len(results) > 1:
        mean = {"seed": "mean", "rows": []}
        for i, row in enumerate(results[0]["rows"]):
            m = {"method": row["method"]}
            for c in row:
                if c not in ("method", "note"):
                    m[c] = sum(r["rows"][i][c] for r in results) / len(results)
            mean["rows"].append(m)
        print(f"mean over seeds {args.seeds}\n{format_table(mean)}")
        results.append(mean)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
