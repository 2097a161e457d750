"""aTLAS's claims in miniature, on digits: learned anisotropic scaling of task vectors.

    python examples/atlas_digits.py                      # seeds 0-2, writes work files to runs/atlas-digits-work/
    python examples/atlas_digits.py --seeds 0 --plot atlas-fewshot.png

Five digit tasks (classes 0-1, 2-3, 4-5, 6-7, 8-9), one fine-tune each from a
weakly pre-trained base MLP; every model keeps the 10-way head. Compared:
task arithmetic (one lambda, picked on validation data), TIES (lambda picked
on validation data), layer-wise AdaMerging (one coefficient per task vector
and parameter tensor, entropy on unlabelled test inputs), aTLAS supervised
(task addition: cross-entropy on the validation split), aTLAS few-shot
(k = 1, 2, 4, 8, 16 labelled examples per class) and aTLAS test-time
adaptation (entropy and pseudo-labels, no labels).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from weightspace.ir import WeightSpace

TASKS = ("digits:classes=0-1", "digits:classes=2-3", "digits:classes=4-5", "digits:classes=6-7",
         "digits:classes=8-9")
ARCH = {"arch": "mlp", "width": 64, "depth": 2}
SHOTS = (1, 2, 4, 8, 16)


def prepare(work: Path, seed: int, *, base_epochs: int = 5, base_fraction: float = 0.3,
            ft_epochs: int = 5) -> tuple[Path, list[Path]]:
    from weightspace.zoo.build import checkpoint_config
    from weightspace.zoo.data import load_task
    from weightspace.zoo.train import ModelRun, TrainConfig, train

    work.mkdir(parents=True, exist_ok=True)
    digits = load_task("digits")

    def save(run: ModelRun, res: Any, task: Any, out: Path) -> Path:
        ck = res.checkpoints[-1]
        WeightSpace.from_tensors(ck.tensors).save(
            out, config=checkpoint_config(run, ck.epoch, task.input_shape, task.num_classes), overwrite=True)
        return out

    run = ModelRun(dataset="digits", arch=ARCH, seed=seed,
                   train=TrainConfig(epochs=base_epochs, data_fraction=base_fraction, lr=0.05))
    base = save(run, train(run, task=digits), digits, work / "base")
    fts = []
    for i, ref in enumerate(TASKS):
        task = load_task(ref)
        run = ModelRun(dataset=ref, arch=ARCH, seed=seed, init=str(base),
                       train=TrainConfig(epochs=ft_epochs, lr=0.02, batch_size=32))
        fts.append(save(run, train(run, task=task), task, work / f"ft{i}"))
    return base, fts


def atlas_digits(workdir: str | Path, seed: int = 0, *, steps: int = 300,
                 lambdas: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.7, 1.0),
                 ties_lambdas: tuple[float, ...] = (0.5, 1.0, 1.5, 2.0, 3.0), atlas_lr: float = 0.05,
                 tta_lr: float = 1e-3, threshold: float = 0.6,
                 shots: tuple[int, ...] = SHOTS) -> dict[str, Any]:
    from weightspace.merge import plan_merge, run_plan
    from weightspace.merges.atlas import few_shot, learn_coefficients, save_coefficients
    from weightspace.sources import load_space
    from weightspace.spec import parse_spec
    from weightspace.zoo.bind import open_batches, open_model
    from weightspace.zoo.data import load_task
    from weightspace.zoo.search import accuracy, search_merge, with_value

    work = Path(workdir)
    base, fts = prepare(work, seed)
    adapter = open_model(base)
    base_space = load_space(base)
    ft_spaces = [load_space(f) for f in fts]
    models = "".join(f"  - model: ft{i}\n    parameters: {{weight: 1.0}}\n" for i in range(len(fts)))

    def evaluate(model_dir: Path) -> dict[str, float]:
        out = {ref.split("=", 1)[1]: accuracy(model_dir, ref, "test") for ref in TASKS}
        out["joint"] = accuracy(model_dir, "digits", "test")
        return out

    def merge(name: str, text: str) -> Path:
        spec_path = work / f"{name}.yaml"
        spec_path.write_text(text)
        out = work / "merged" / name
        run_plan(plan_merge(parse_spec(text, str(spec_path)), spec_dir=work), out, overwrite=True, progress=False)
        return out

    def atlas_row(name: str, batches: list, **kw: Any) -> dict[str, Any]:
        slug = "".join(ch if ch.isalnum() else "_" for ch in name.split(" (")[0] + "_" + name)[:60]
        c = learn_coefficients(adapter, base_space, ft_spaces, batches, steps=steps, seed=seed,
                               task_names=[f"ft{i}" for i in range(len(fts))], **kw)
        save_coefficients(c, work / f"{slug}.coeffs.safetensors")
        plain = "".join(f"  - model: ft{i}\n" for i in range(len(fts)))
        out = merge(slug, f"merge_method: atlas\nbase_model: base\nmodels:\n{plain}"
                          f"parameters: {{coefficients: {slug}.coeffs.safetensors}}\n")
        return {"method": name, **evaluate(out)}

    rows: list[dict[str, Any]] = [{"method": "base", **evaluate(base)}]
    # task arithmetic and TIES: one lambda, picked on validation data (TIES: its global lambda
    # scales the elected, disjoint mean of the trimmed task vectors)
    chosen_lambda = {}
    for name, text, param, grid in (
        ("task arithmetic", f"merge_method: task_arithmetic\nbase_model: base\nmodels:\n{models}",
         "weight", lambdas),
        ("ties", "merge_method: ties\nbase_model: base\nmodels:\n"
                 + models.replace("weight: 1.0", "weight: 1.0, density: 0.5"), "lambda", ties_lambdas),
    ):
        spec = parse_spec(text, name)
        found = search_merge(spec, param, list(grid), data="digits", split="val", spec_dir=work)
        chosen_lambda[name] = found.best
        out = work / "merged" / name.replace(" ", "_")
        run_plan(plan_merge(with_value(spec, param, found.best), spec_dir=work), out, overwrite=True,
                 progress=False)
        rows.append({"method": name, **evaluate(out), "note": f"lambda={found.best:g}"})
    ta = chosen_lambda["task arithmetic"]

    val = open_batches("digits", adapter, split="val", batch_size=128)
    test_inputs = open_batches("digits", adapter, split="test", batch_size=128)
    # test-time adaptation starts from task arithmetic's lambda (at 0 the weak base is too unsure
    # for pseudo-labels, and entropy collapses onto one task); supervised starts from 0
    rows.append(atlas_row("adamerging (layer-wise, entropy on test inputs)", test_inputs,
                          objective="entropy", init=ta, lr=tta_lr))
    rows.append(atlas_row("atlas (supervised, val labels)", val, objective="supervised", lr=atlas_lr))
    rows.append(atlas_row(f"atlas (pseudo-labels p>={threshold:g} on test inputs)", test_inputs,
                          objective="pseudo-label", init=ta, lr=tta_lr, threshold=threshold))
    s = load_task("digits").val
    curve = []
    for k in shots:
        x, y = few_shot(s.x, s.y, k, seed)
        batches = [{"x": x, "y": y}]
        row = atlas_row(f"atlas few-shot k={k}", batches, objective="supervised", few_shot=True)
        curve.append({"k": k, "joint": row["joint"]})
        rows.append(row)
    return {"seed": seed, "rows": rows, "few_shot": curve}


def format_table(result: dict[str, Any]) -> str:
    rows = result["rows"]
    cols = [c for c in rows[0] if c not in ("method", "note")]
    lines = ["| method | " + " | ".join(cols) + " |", "| --- | " + " | ".join("---:" for _ in cols) + " |"]
    for r in rows:
        note = f" ({r['note']})" if r.get("note") else ""
        lines.append(f"| {r['method']}{note} | " + " | ".join(f"{r[c]:.3f}" for c in cols) + " |")
    return "\n".join(lines)


def plot_few_shot(results: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.4))
    ks = [c["k"] for c in results[0]["few_shot"]]
    mean = [sum(r["few_shot"][i]["joint"] for r in results) / len(results) for i in range(len(ks))]
    for r in results:
        ax.plot(ks, [c["joint"] for c in r["few_shot"]], color="0.75", lw=1)
    ax.plot(ks, mean, "o-", color="C0", label="aTLAS few-shot (mean over seeds)")
    for name, color in (("task arithmetic", "C1"), ("base", "C7")):
        v = sum(next(x["joint"] for x in r["rows"] if x["method"] == name) for r in results) / len(results)
        ax.axhline(v, ls="--", color=color, label=f"{name}")
    ax.set_xscale("log", base=2)
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.set_xlabel("labelled examples per class (k)")
    ax.set_ylabel("joint test accuracy (10 digits)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    import argparse
    import json

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--work", type=Path, default=Path("runs/atlas-digits-work"))
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--plot", type=Path, default=None, help="few-shot curve (needs matplotlib)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    results = []
    for seed in args.seeds:
        res = atlas_digits(args.work / f"seed{seed}", seed, steps=args.steps)
        results.append(res)
        print(f"seed {seed}\n{format_table(res)}\n", flush=True)
    if len(results) > 1:
        mean = {"seed": "mean", "rows": []}
        for i, row in enumerate(results[0]["rows"]):
            m = {"method": row["method"]}
            for c in row:
                if c not in ("method", "note"):
                    m[c] = sum(r["rows"][i][c] for r in results) / len(results)
            mean["rows"].append(m)
        print(f"mean over seeds {args.seeds}\n{format_table(mean)}")
    if args.plot:
        plot_few_shot(results, args.plot)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
