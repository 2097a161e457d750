"""aTLAS's claims in miniature: task addition, few-shot transfer and test-time adaptation on digits.

    python examples/atlas_digits.py --json benchmarks/results/atlas_digits.json --plot docs/atlas-fewshot.png
    python examples/atlas_digits.py --seeds 0     # one seed (default 0-4); work files in runs/atlas-digits-work/

Five tasks, each a digits variant with all ten classes (a dataset of its own, as the
authors' datasets are): rotated by 90 degrees, mirrored, and three corruptions (gaussian
noise at severity 5, blur at 5, contrast at 3). A base MLP is pre-trained weakly on clean
digits; each task is a fine-tune of it. Every number is a test accuracy on the task's own
test split, through the task's own (10-way) head.

- Task addition (src/learn_task_addition.py): the five task vectors merged into one model.
  Task arithmetic and TIES pick their lambda on the validation splits; aTLAS learns on the
  validation splits as the authors: batches of 128 with an equal share of every task,
  AdamW lr 1e-3 constant, weight decay 0.1, clipping 1.0, 20 epochs, and keeps the epoch
  with the best mean normalised validation accuracy (accuracy / the fine-tune's), starting
  from the zero-shot score. The authors' 20 epochs come to about 470 steps on their smallest
  validation set (DTD, 16 images of it per batch); here they are 300 steps, and on most
  seeds the best epoch is the last, so a second row runs 300 epochs (4500 steps),
  everything else unchanged. The claims are also printed as paired differences (same seed).
- Few-shot (src/learn_few_shots.py): for each target task, the other four task vectors
  (the target's own is left out, as the authors leave it out), k = 1..16 labelled training
  examples per class, repeated to more than 10 batches of 128 an epoch, crop-flip
  augmentation, lr 1e-1 with cosine decay, 10 epochs, the best epoch on the target's
  validation split (as the authors, and reported both ways: also the last epoch, which uses
  no validation labels). Task arithmetic of the same four vectors picks lambda on that
  validation split too.
- Test-time adaptation (src/learn_ufm.py): for each target, the other four task vectors,
  learned on the target's unlabelled test inputs with UFM (fixed zero-shot pseudo-labels,
  trusted examples, weak and strong views, threshold 0.99), lr 1e-3 with cosine decay,
  batches of 128, the best epoch on the validation split (and the last epoch). The authors
  run 10 epochs over test sets of thousands of images (hundreds of steps); a digits test
  split has 360 images, 3 batches, so 10 epochs would be 30 steps: the main rows run 100
  epochs (300 steps), and one row the authors' 10. Entropy (AdaMerging's objective) and
  the re-computed pseudo-label objective run with the same settings.
"""

from __future__ import annotations

import math
import os
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from weightspace.ir import WeightSpace

TASKS = ("digits:rotate=90", "digits:flip=h", "digits:corrupt=gaussian_noise@5", "digits:corrupt=blur@5",
         "digits:corrupt=contrast@3")
NAMES = ("rotate", "flip", "noise", "blur", "contrast")
ARCH = {"arch": "mlp", "width": 64, "depth": 2}
SHOTS = (1, 2, 4, 8, 16)
LAMBDAS = tuple(round(0.05 * i, 2) for i in range(21))  # task arithmetic's grid: 0, 0.05, ..., 1
TIES_LAMBDAS = (0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 5.0)  # TIES scales a disjoint mean, so its lambda runs higher


def prepare(work: Path, seed: int, *, base_epochs: int = 8, base_fraction: float = 0.5,
            ft_epochs: int = 5) -> tuple[Path, list[Path]]:
    """A weakly pre-trained base on clean digits and one fine-tune of it per task, on disk. The
    fine-tunes train the body with the head frozen, as the authors fine-tune CLIP's image
    encoder under the frozen zero-shot head: task vectors hold no head, and every task is
    read through the base's head (ten digits; each task's own classes)."""
    from weightspace.zoo.arch import model_from_config
    from weightspace.zoo.build import checkpoint_config
    from weightspace.zoo.data import load_task
    from weightspace.zoo.train import ModelRun, TrainConfig, train

    work.mkdir(parents=True, exist_ok=True)
    digits = load_task("digits")
    run = ModelRun(dataset="digits", arch=ARCH, seed=seed,
                   train=TrainConfig(epochs=base_epochs, data_fraction=base_fraction, lr=0.05))
    ck = train(run, task=digits).checkpoints[-1]
    base = work / "base"
    config = checkpoint_config(run, ck.epoch, digits.input_shape, digits.num_classes)
    WeightSpace.from_tensors(ck.tensors).save(base, config=config, overwrite=True)
    fts = []
    for i, ref in enumerate(TASKS):
        module = model_from_config(config)
        module.load_state_dict(ck.tensors)
        tensors = finetune_body(module, load_task(ref).split("train"), epochs=ft_epochs, seed=seed * 100 + i)
        ft_run = ModelRun(dataset=ref, arch=ARCH, seed=seed, init=str(base),
                          train=TrainConfig(epochs=ft_epochs, lr=0.02, batch_size=32))
        out = work / f"ft{i}"
        WeightSpace.from_tensors(tensors).save(
            out, config=checkpoint_config(ft_run, ft_epochs, digits.input_shape, digits.num_classes), overwrite=True)
        fts.append(out)
    return base, fts


def finetune_body(module: torch.nn.Module, split: Any, *, epochs: int, seed: int, lr: float = 0.02,
                  batch_size: int = 32) -> dict[str, torch.Tensor]:
    """SGD with momentum 0.9 and a cosine schedule on every parameter but the head's (seeded)."""
    import torch.nn.functional as F

    body = [p for n, p in module.named_parameters() if not n.startswith("head.")]
    for n, p in module.named_parameters():
        p.requires_grad_(not n.startswith("head."))
    opt = torch.optim.SGD(body, lr=lr, momentum=0.9)
    g = torch.Generator().manual_seed(seed)
    steps = epochs * math.ceil(len(split.y) / batch_size)
    t = 0
    module.train()
    for _ in range(epochs):
        order = torch.randperm(len(split.y), generator=g)
        for k in range(0, len(order), batch_size):
            idx = order[k:k + batch_size]
            for group in opt.param_groups:
                group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * t / steps))
            opt.zero_grad()
            F.cross_entropy(module(split.x[idx]), split.y[idx]).backward()
            opt.step()
            t += 1
    return {n: p.detach().clone() for n, p in module.state_dict().items()}


class Bench:
    """One seed's models and data, and how a set of parameters scores on them."""

    def __init__(self, work: Path, seed: int):
        from weightspace.sources import load_space
        from weightspace.zoo.bind import open_model
        from weightspace.zoo.data import load_task

        self.work, self.seed = work, seed
        self.base_dir, self.ft_dirs = prepare(work, seed)
        self.adapter = open_model(self.base_dir)
        self.base = load_space(self.base_dir)
        self.fts = [load_space(f) for f in self.ft_dirs]
        self.base_t = self.base.materialize()
        self.ft_t = [f.materialize() for f in self.fts]
        self.splits = [load_task(ref) for ref in TASKS]

    def acc(self, params, t: int, split: str = "test") -> float:
        s = self.splits[t].split(split)
        with torch.no_grad():
            return float((self.adapter.forward(params, {"x": s.x}).argmax(-1) == s.y).float().mean())

    def accs(self, params, split: str = "test") -> list[float]:
        return [self.acc(params, t, split) for t in range(len(TASKS))]

    def arithmetic(self, lam: float, tasks: list[int]) -> dict[str, torch.Tensor]:
        return {n: b + lam * sum(self.ft_t[i][n] - b for i in tasks) for n, b in self.base_t.items()}

    def merge(self, name: str, text: str) -> dict[str, torch.Tensor]:
        """`text` merged through the planner and the streaming writer (what `wsmerge run` does)."""
        from weightspace.merge import plan_merge, run_plan
        from weightspace.sources import load_space
        from weightspace.spec import parse_spec

        spec_path = self.work / f"{name}.yaml"
        spec_path.write_text(text)
        out = self.work / "merged" / name
        run_plan(plan_merge(parse_spec(text, str(spec_path)), spec_dir=self.work), out, overwrite=True,
                 progress=False)
        return load_space(out).materialize()


def _record_last(score):
    """`score` for `select`, also keeping the parameters of the last epoch it saw."""
    last: dict[str, Any] = {}

    def select(params):
        last["params"] = {n: p.detach().clone() for n, p in params.items()}
        return score(params)

    return select, last


def task_addition(b: Bench, long_epochs: int = 300) -> list[dict[str, Any]]:
    from weightspace.merges.atlas import learn_coefficients, save_coefficients

    T = len(TASKS)
    ft_val = [b.acc(b.ft_t[t], t, "val") for t in range(T)]

    def normalised_val(params) -> float:
        return statistics.mean(b.acc(params, t, "val") / ft_val[t] for t in range(T))

    rows = [{"method": "zero-shot (base)", "acc": b.accs(b.base_t)},
            {"method": "fine-tuned (each task its own model)", "acc": [b.acc(b.ft_t[t], t) for t in range(T)]}]
    lam = max(LAMBDAS, key=lambda v: normalised_val(b.arithmetic(v, list(range(T)))))
    rows.append({"method": "task arithmetic", "acc": b.accs(b.arithmetic(lam, list(range(T)))),
                 "note": f"lambda {lam:g}"})
    models = "".join(f"  - model: ft{i}\n    parameters: {{weight: 1.0, density: 0.5}}\n" for i in range(T))
    best = None
    for lt in TIES_LAMBDAS:
        params = b.merge(f"ties-{lt:g}", f"merge_method: ties\nbase_model: base\nmodels:\n{models}"
                                         f"parameters: {{lambda: {lt}}}\n")
        score = normalised_val(params)
        if best is None or score > best[0]:
            best = (score, lt, params)
    rows.append({"method": "ties", "acc": b.accs(best[2]), "note": f"lambda {best[1]:g}, density 0.5"})
    # the authors' loaders: batch 128 split evenly over the tasks (int(128 / 5) = 25 each), one
    # epoch = the smallest validation split's batches
    per = 128 // T
    vals = [s.split("val") for s in b.splits]
    g = torch.Generator().manual_seed(b.seed)
    orders = [torch.randperm(len(v.y), generator=g) for v in vals]
    n_batches = math.ceil(min(len(v.y) for v in vals) / per)
    batches = [{"x": torch.cat([v.x[o[i * per:(i + 1) * per]] for v, o in zip(vals, orders)]),
                "y": torch.cat([v.y[o[i * per:(i + 1) * per]] for v, o in zip(vals, orders)])}
               for i in range(n_batches)]
    for epochs in (20, long_epochs):
        c = learn_coefficients(b.adapter, b.base, b.fts, batches, epochs=epochs, select=normalised_val,
                               seed=b.seed, task_names=[f"ft{i}" for i in range(T)])
        name = f"task-addition-{epochs}"
        save_coefficients(c, b.work / f"{name}.coeffs.safetensors")
        plain = "".join(f"  - model: ft{i}\n" for i in range(T))
        merged = b.merge(name, f"merge_method: atlas\nbase_model: base\nmodels:\n{plain}"
                               f"parameters: {{coefficients: {name}.coeffs.safetensors}}\n")
        label = ("aTLAS, the authors' 20 epochs" if epochs == 20 else f"aTLAS, {epochs} epochs")
        rows.append({"method": f"{label} ({c.meta['steps']} steps)", "acc": b.accs(merged),
                     "note": f"best epoch {c.meta['selection']['best_epoch']} of {epochs}"})
    for r in rows:
        r["avg"] = statistics.mean(r["acc"])
    return rows


def few_shot_transfer(b: Bench, shots: tuple[int, ...] = SHOTS) -> list[dict[str, Any]]:
    from weightspace.merges.atlas import apply_coefficients, few_shot, learn_coefficients
    from weightspace.merges.atlas.data import oversampled_batches

    T = len(TASKS)
    rows: dict[str, dict[str, Any]] = {}

    def put(method: str, t: int, value: float) -> None:
        rows.setdefault(method, {"method": method, "acc": [math.nan] * T})["acc"][t] = value

    for t in range(T):
        others = [i for i in range(T) if i != t]
        put("zero-shot (base)", t, b.acc(b.base_t, t))
        lam = max(LAMBDAS, key=lambda v: b.acc(b.arithmetic(v, others), t, "val"))
        put("task arithmetic of the other four (lambda on val)", t, b.acc(b.arithmetic(lam, others), t))
        train = b.splits[t].split("train")
        for k in shots:
            x, y = few_shot(train.x, train.y, k, b.seed)
            select, last = _record_last(lambda p, t=t: b.acc(p, t, "val"))
            c = learn_coefficients(b.adapter, b.base, [b.fts[i] for i in others],
                                   oversampled_batches(x, y, 128, b.seed), few_shot=True, epochs=10,
                                   augment="crop-flip", select=select, seed=b.seed)
            put(f"aTLAS k={k} (best epoch on val)", t,
                b.acc(apply_coefficients(c, b.base, [b.fts[i] for i in others]), t))
            put(f"aTLAS k={k} (last epoch)", t, b.acc(last["params"], t))
    out = list(rows.values())
    for r in out:
        r["avg"] = statistics.mean(r["acc"])
    return out


def test_time(b: Bench, epochs: int = 100) -> list[dict[str, Any]]:
    from weightspace.merges.atlas import apply_coefficients, learn_coefficients

    T = len(TASKS)
    rows: dict[str, dict[str, Any]] = {}

    def put(method: str, t: int, value: float) -> None:
        rows.setdefault(method, {"method": method, "acc": [math.nan] * T})["acc"][t] = value

    taken: dict[str, list[int]] = {}  # optimizer steps that had a loss, per objective and target
    chosen: dict[str, list[int]] = {}  # the epoch kept on val, per objective and target
    runs = (("ufm", epochs, "UFM"), ("ufm", 10, "UFM, the authors' 10 epochs"),
            ("entropy", epochs, "entropy"), ("pseudo-label", epochs, "pseudo-label p>=0.9, re-computed"))
    for t in range(T):
        others = [b.fts[i] for i in range(T) if i != t]
        put("zero-shot (base)", t, b.acc(b.base_t, t))
        test = b.splits[t].split("test")
        inputs = [{"x": test.x[i:i + 128]} for i in range(0, len(test.y), 128)]  # no labels
        for objective, n_epochs, label in runs:
            select, last = _record_last(lambda p, t=t: b.acc(p, t, "val"))
            with warnings.catch_warnings():  # steps without a confident prediction: counted below
                warnings.simplefilter("ignore")
                c = learn_coefficients(b.adapter, b.base, others, inputs, objective=objective,
                                       epochs=n_epochs, select=select, seed=b.seed)
            put(f"{label} (best epoch on val)", t, b.acc(apply_coefficients(c, b.base, others), t))
            taken.setdefault(label, [0] * T)[t] = c.meta["steps_taken"]
            chosen.setdefault(label, [0] * T)[t] = c.meta["selection"]["best_epoch"]
            if n_epochs == epochs:
                put(f"{label} (last epoch)", t, b.acc(last["params"], t))
    out = list(rows.values())
    for r in out:
        r["avg"] = statistics.mean(r["acc"])
        label = r["method"].rsplit(" (", 1)[0]
        if label in taken:
            r["steps_taken"] = taken[label]
            if r["method"].endswith("(best epoch on val)"):
                r["best_epoch"] = chosen[label]
    return out


def run_seed(work: Path, seed: int) -> dict[str, Any]:
    t0 = time.perf_counter()
    b = Bench(work, seed)
    res = {"seed": seed, "task_addition": task_addition(b), "few_shot": few_shot_transfer(b),
           "test_time": test_time(b)}
    res["seconds"] = round(time.perf_counter() - t0, 1)
    return res


def summarise(results: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Per part and method: mean and sample standard deviation over seeds, per task and on average."""
    out = {}
    for part in ("task_addition", "few_shot", "test_time"):
        rows = []
        for i, row in enumerate(results[0][part]):
            per_seed = [r[part][i] for r in results]
            assert all(p["method"] == row["method"] for p in per_seed)
            cols = {}
            for j, name in enumerate(NAMES):
                cols[name] = [p["acc"][j] for p in per_seed]
            cols["avg"] = [p["avg"] for p in per_seed]
            rows.append({"method": row["method"],
                         **{k: {"mean": statistics.mean(v), "std": statistics.stdev(v) if len(v) > 1 else 0.0}
                            for k, v in cols.items()},
                         "notes": [p.get("note") for p in per_seed if p.get("note")]})
        out[part] = rows
    return out


# the claims as paired differences (same seed, same models): (part, method, compared with)
TA_OTHERS = "task arithmetic of the other four (lambda on val)"
GAPS = (
    ("task_addition", "aTLAS, 300 epochs (4500 steps)", "task arithmetic"),
    ("task_addition", "aTLAS, the authors' 20 epochs (300 steps)", "task arithmetic"),
    ("task_addition", "aTLAS, 300 epochs (4500 steps)", "ties"),
    ("few_shot", "aTLAS k=1 (best epoch on val)", TA_OTHERS),
    ("few_shot", "aTLAS k=16 (best epoch on val)", TA_OTHERS),
    ("few_shot", "aTLAS k=1 (last epoch)", TA_OTHERS),
    ("few_shot", "aTLAS k=16 (last epoch)", TA_OTHERS),
    ("few_shot", "aTLAS k=16 (best epoch on val)", "aTLAS k=1 (best epoch on val)"),
    ("test_time", "UFM (best epoch on val)", "zero-shot (base)"),
    ("test_time", "UFM (last epoch)", "zero-shot (base)"),
    ("test_time", "UFM, the authors' 10 epochs (best epoch on val)", "zero-shot (base)"),
    ("test_time", "entropy (best epoch on val)", "zero-shot (base)"),
    ("test_time", "entropy (last epoch)", "zero-shot (base)"),
    ("test_time", "pseudo-label p>=0.9, re-computed (last epoch)", "zero-shot (base)"),
)


def paired_gaps(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per claim in GAPS: the per-seed difference of the five tasks' mean accuracy, its mean and
    sample standard deviation, and on how many seeds it is positive."""

    def avg(r: dict[str, Any], part: str, method: str) -> float:
        return next(x["avg"] for x in r[part] if x["method"] == method)

    out = []
    for part, a, b in GAPS:
        d = [avg(r, part, a) - avg(r, part, b) for r in results]
        out.append({"part": part, "method": a, "versus": b, "per_seed": [round(v, 4) for v in d],
                    "mean": statistics.mean(d), "std": statistics.stdev(d) if len(d) > 1 else 0.0,
                    "positive": sum(v > 0 for v in d)})
    return out


def format_gaps(gaps: list[dict[str, Any]]) -> str:
    lines = ["| method | minus | difference (mean ± std) | seeds above 0 |", "| --- | --- | ---: | ---: |"]
    for g in gaps:
        lines.append(f"| {g['method']} | {g['versus']} | {g['mean']:+.3f} ± {g['std']:.3f} | "
                     f"{g['positive']} of {len(g['per_seed'])} |")
    return "\n".join(lines)


def format_table(rows: list[dict[str, Any]]) -> str:
    cols = [*NAMES, "avg"]
    lines = ["| method | " + " | ".join(cols) + " |", "| --- | " + " | ".join("---:" for _ in cols) + " |"]
    for r in rows:
        lines.append(f"| {r['method']} | " + " | ".join(f"{r[c]['mean']:.3f} ± {r[c]['std']:.3f}" for c in cols)
                     + " |")
    return "\n".join(lines)


def plot_few_shot(summary: dict[str, Any], path: Path, shots: tuple[int, ...] = SHOTS) -> None:
    from weightspace.extras import pyplot

    plt = pyplot()
    rows = {r["method"]: r["avg"] for r in summary["few_shot"]}
    fig, ax = plt.subplots(figsize=(5.4, 3.6))
    for label, fmt, color in (("best epoch on val", "o-", "C0"), ("last epoch", "s--", "C2")):
        m = [rows[f"aTLAS k={k} ({label})"]["mean"] for k in shots]
        s = [rows[f"aTLAS k={k} ({label})"]["std"] for k in shots]
        ax.errorbar(shots, m, yerr=s, fmt=fmt, color=color, capsize=3, label=f"aTLAS, {label}")
    for name, color in (("task arithmetic of the other four (lambda on val)", "C1"), ("zero-shot (base)", "C7")):
        ax.axhline(rows[name]["mean"], ls=":", color=color, label=name.split(" (")[0])
    ax.set_xscale("log", base=2)
    ax.set_xticks(shots, [str(k) for k in shots])
    ax.set_xlabel("labelled training examples per class (k)")
    ax.set_ylabel("test accuracy, mean of 5 targets")
    ax.set_title("few-shot transfer from the other four task vectors", fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    import argparse
    import json

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--work", type=Path, default=Path("runs/atlas-digits-work"))
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--plot", type=Path, default=None, help="few-shot curve (needs matplotlib)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    results = []
    for seed in args.seeds:
        res = run_seed(args.work / f"seed{seed}", seed)
        results.append(res)
        print(f"seed {seed}: {res['seconds']} s", flush=True)
    summary = summarise(results)
    for part, title in (("task_addition", "Task addition"), ("few_shot", "Few-shot transfer"),
                        ("test_time", "Test-time adaptation")):
        print(f"\n{title}, test accuracy, mean ± std over seeds {args.seeds}\n{format_table(summary[part])}")
    gaps = paired_gaps(results)
    print(f"\nPaired differences of the mean accuracy (same seed)\n{format_gaps(gaps)}")
    total = round(time.perf_counter() - t0, 1)
    print(f"\n{total} s in all")
    if args.plot:
        plot_few_shot(summary, args.plot)
    if args.json:
        command = "python examples/atlas_digits.py " + " ".join(sys.argv[1:])
        load = {"before": [round(v, 2) for v in load_before], "after": [round(v, 2) for v in os.getloadavg()]}
        args.json.write_text(json.dumps({"command": command, "seeds": args.seeds, "tasks": dict(zip(NAMES, TASKS)),
                                         "seconds": total, "load_average_1_5_15_min": load,
                                         "summary": summary, "paired": gaps,
                                         "per_seed": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
