"""Learngene in miniature: do gene-initialized descendants of several depths beat random init?

    python examples/learngene_digits.py                    # seeds 0-2, tables; work files in runs/learngene-digits-work/
    python examples/learngene_digits.py --seeds 0 --json benchmarks/results/learngene_digits.json \\
        --plot docs/learngene-epochs.png

The task is digits under Gaussian noise at severity 5 (the zoo's `digits:corrupt=gaussian_noise@5`):
on clean digits every init converges by epoch 3, here random init is still climbing.

Per seed, a teacher (a pre-LN residual MLP, width 32, 6 blocks) is trained on the task, and
three genes come from it:
- "tleg" and "sws": trained as the authors train them (`train_gene(preset="authors")`: pure
  distillation at T = 1, 150 epochs, lr 5e-4 x 64/512, 5 warm-up epochs, no weight decay on
  1-D tensors) in the authors' auxiliary networks, 12 layers (TLEG) and 16 layers in stages
  3,3,4,3,3 (SWS);
- "tleg fitted": `fit_gene` of the teacher's weights, without training.

Descendants of depth 3, 6, 9 and 12 start from each gene, or from controls that separate
what the gene's layers bring from what its non-layer tensors bring (stem, final norm, head,
which an expansion carries over as they are):
- "random": the architecture's own seeded init;
- "random + <gene>'s stem/norm/head": the same random blocks, with the gene's non-layer tensors;
- "identity + teacher's stem/norm/head": blocks that pass their input through (fc2 = 0).
Then every descendant trains for the same epochs with the same recipe: AdamW (the authors'
descendant optimizer), weight decay 0.05, cosine decay, each init at its own best lr of
1e-3/3e-3/1e-2 (validation accuracy after 3 epochs at depth 6 on the first seed), so that no
init, the baseline included, trains at an lr that suits another; test accuracy after every
epoch.
"""

from __future__ import annotations

import math
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from weightspace.ir import WeightSpace

TASK = "digits:corrupt=gaussian_noise@5"
WIDTH = 32
TEACHER_DEPTH = 6
TEACHER_EPOCHS = 10
DEPTHS = (3, 6, 9, 12)
EPOCHS = 5
OPTIMIZER = "adamw"       # the descendants' optimizer in the authors' code (TLEG/SWS main.py, Des-S)
WEIGHT_DECAY = 0.05
LRS = (1e-3, 3e-3, 1e-2)   # the descendants' lr: per init, the best of these (learngene_digits)
LR_DEPTH, LR_EPOCHS = 6, 3  # ... by validation accuracy at this depth after these epochs, on the first seed
GENES = ("tleg", "sws", "tleg fitted")
INITS = ("random", "tleg", "random + tleg's stem/norm/head", "sws", "random + sws's stem/norm/head",
         "tleg fitted", "random + teacher's stem/norm/head", "identity + teacher's stem/norm/head")


def _arch(depth: int) -> dict:
    return {"arch": "resmlp", "width": WIDTH, "depth": depth, "mlp_ratio": 2}


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name).strip("-")


def _controls(gene_space: WeightSpace, depth: int, seed: int, task: Any, *, identity: bool = False
              ) -> dict[str, torch.Tensor]:
    """The random init that ModelRun(seed=seed) would draw at `depth`, with the gene's non-layer
    tensors; identity=True also zeroes fc2 so that every block passes its input through."""
    from weightspace.zoo.arch import build_model

    torch.manual_seed(seed)
    state = {n: p.detach().clone() for n, p in build_model(_arch(depth), task.input_shape,
                                                              task.num_classes).named_parameters()}
    for n in state:
        if not n.startswith("blocks."):
            state[n] = gene_space[n].load().to(state[n].dtype)
        elif identity and ".fc2." in n:
            state[n] = torch.zeros_like(state[n])
    return state


def _descendant_inits(work: Path, genes: dict[str, Any], non_layer: dict[str, WeightSpace], depth: int,
                      run_seed: int, task: Any, inits: tuple[str, ...]) -> dict[str, Path | None]:
    """The starting checkpoint of every init at `depth` (None: the architecture's own init)."""
    from weightspace.merges.learngene import save_expanded

    out: dict[str, Path | None] = {}
    for name in inits:
        if name == "random":
            out[name] = None
            continue
        out[name] = work / f"desc-{_slug(name)}-{depth}"
        if name in genes:
            save_expanded(genes[name], depth, out[name], overwrite=True)
        else:
            source = name.split(" + ")[1].split("'s")[0]
            state = _controls(non_layer[source], depth, run_seed, task, identity=name.startswith("identity"))
            WeightSpace.from_tensors(state).save(out[name], overwrite=True)
    return out


def _train_descendant(task: Any, depth: int, seed: int, init: Path | None, lr: float, epochs: int):
    from weightspace.zoo.train import ModelRun, TrainConfig, train

    run = ModelRun(dataset=TASK, arch=_arch(depth), seed=seed, init=str(init) if init else None,
                   train=TrainConfig(epochs=epochs, lr=lr, optimizer=OPTIMIZER, weight_decay=WEIGHT_DECAY,
                                     checkpoints=tuple(range(epochs))))
    return train(run, task=task).checkpoints


def learngene_digits(workdir: str | Path, seed: int = 0, *, depths: tuple[int, ...] = DEPTHS,
                     epochs: int = EPOCHS, gene_epochs: int | None = None,
                     lrs: dict[str, float] | None = None, inits: tuple[str, ...] = INITS) -> dict[str, Any]:
    """One seed of the miniature. `gene_epochs` None trains the genes for the authors' 150 epochs.
    `lrs`: the descendants' lr per init; None chooses them on this seed (`lr_choice` in the result):
    for every init the lr of LRS with the best validation accuracy after LR_EPOCHS epochs at depth
    LR_DEPTH, so that no init, the baseline included, trains at an lr that suits another."""
    from weightspace.merges.learngene import fit_gene, train_gene
    from weightspace.sources import load_space
    from weightspace.zoo.arch import build_model
    from weightspace.zoo.bind import open_batches, open_model
    from weightspace.zoo.build import checkpoint_config
    from weightspace.zoo.data import load_task
    from weightspace.zoo.train import ModelRun, TrainConfig, train

    t0 = time.perf_counter()
    work = Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    task = load_task(TASK)

    run = ModelRun(dataset=TASK, arch=_arch(TEACHER_DEPTH), seed=seed,
                   train=TrainConfig(epochs=TEACHER_EPOCHS, lr=0.05))
    ck = train(run, task=task).checkpoints[-1]
    teacher_dir = work / "teacher"
    WeightSpace.from_tensors(ck.tensors).save(
        teacher_dir, config=checkpoint_config(run, ck.epoch, task.input_shape, task.num_classes), overwrite=True)
    teacher = open_model(teacher_dir)
    batches = open_batches(TASK, teacher, split="train", batch_size=64)

    def factory(depth: int) -> torch.nn.Module:
        return build_model(_arch(depth), task.input_shape, task.num_classes)

    genes, gene_report = {}, {}
    for mode in ("tleg", "sws"):
        g = train_gene(factory, teacher, batches, mode=mode, preset="authors", epochs=gene_epochs, seed=seed)
        r = g.meta["report"]
        genes[mode] = g
        gene_report[mode] = {k: r[k] for k in ("acc_start", "acc_end", "chance", "kd_start", "kd_end", "steps",
                                               "lr", "seconds")} | {"aux_depth": g.source_depth,
                                                                     "stages": g.meta["stages"]}
    fitted = fit_gene(load_space(teacher_dir))
    genes["tleg fitted"] = fitted
    rep = fitted.meta["report"]
    gene_report["tleg fitted"] = {"relative_residual": rep["relative_residual"], "per_layer": rep["per_layer"],
                                  "per_tensor": {r["suffix"]: r["relative_residual"] for r in rep["suffixes"]}}
    torch.manual_seed(seed)                      # the teacher's own init: how linear is it in depth?
    init_space = WeightSpace.from_tensors({n: p.detach() for n, p in factory(TEACHER_DEPTH).named_parameters()})
    gene_report["tleg fitted"]["relative_residual_at_init"] = fit_gene(init_space).meta["report"]["relative_residual"]
    non_layer = {"tleg": genes["tleg"].space, "sws": genes["sws"].space, "teacher": load_space(teacher_dir)}

    run_seed = seed + 1
    choice = None
    if lrs is None:
        start = _descendant_inits(work, genes, non_layer, LR_DEPTH, run_seed, task, inits)
        val = {name: {str(lr): _train_descendant(task, LR_DEPTH, run_seed, start[name], lr, LR_EPOCHS)[-1]
                      .metrics["val_acc"] for lr in LRS} for name in inits}
        lrs = {name: max(LRS, key=lambda lr, n=name: val[n][str(lr)]) for name in inits}
        choice = {"seed": seed, "depth": LR_DEPTH, "epochs": LR_EPOCHS, "val_acc": val, "lr": lrs}
    curves: dict[str, dict[int, list[float]]] = {name: {} for name in inits}
    for depth in depths:
        start = _descendant_inits(work, genes, non_layer, depth, run_seed, task, inits)
        for name in inits:
            cks = _train_descendant(task, depth, run_seed, start[name], lrs[name], epochs)
            curves[name][depth] = [c.metrics["test_acc"] for c in cks]
    params = {name: g.space.num_params for name, g in genes.items()}
    return {"seed": seed, "task": TASK, "teacher_acc": ck.metrics["test_acc"], "genes": gene_report,
            "gene_params": params, "descendant_params": sum(sum(p.numel() for p in factory(d).parameters())
                                                            for d in depths),
            "depths": list(depths), "epochs": epochs, "lrs": lrs, "lr_choice": choice, "curves": curves,
            "seconds": round(time.perf_counter() - t0, 1)}


# ---------------------------------------------------------------------------------------------
# tables and plot


def _stats(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _cell(values: list[float]) -> str:
    m, s = _stats(values)
    return f"{m:.3f} ± {s:.3f}"


def _depth_mean(r: dict[str, Any], name: str, epoch: int) -> float:
    return statistics.fmean(r["curves"][name][str(d) if str(d) in r["curves"][name] else d][epoch]
                            for d in r["depths"])


def _at(r: dict[str, Any], name: str, depth: int, epoch: int) -> float:
    c = r["curves"][name]
    return c[depth if depth in c else str(depth)][epoch]


def table_by_epoch(results: list[dict[str, Any]], epochs: tuple[int, ...]) -> str:
    """Rows: inits; columns: test accuracy after `epochs`, mean over depths, mean ± std over seeds."""
    inits = [n for n in INITS if n in results[0]["curves"]]
    lines = ["| init | " + " | ".join(f"epoch {e}" for e in epochs) + " |",
             "| --- | " + " | ".join("---:" for _ in epochs) + " |"]
    for name in inits:
        lines.append(f"| {name} | " + " | ".join(_cell([_depth_mean(r, name, e) for r in results])
                                                 for e in epochs) + " |")
    return "\n".join(lines)


def table_by_depth(results: list[dict[str, Any]], epoch: int) -> str:
    """Rows: inits; columns: depths; test accuracy after `epoch`, mean ± std over seeds."""
    inits = [n for n in INITS if n in results[0]["curves"]]
    depths = results[0]["depths"]
    lines = ["| init | " + " | ".join(f"depth {d}" for d in depths) + " |",
             "| --- | " + " | ".join("---:" for _ in depths) + " |"]
    for name in inits:
        lines.append(f"| {name} | " + " | ".join(_cell([_at(r, name, d, epoch) for r in results])
                                                 for d in depths) + " |")
    return "\n".join(lines)


def leads(results: list[dict[str, Any]], epoch: int) -> dict[str, dict[str, Any]]:
    """Each gene's lead over random init and over its own control (random blocks with the same
    non-layer tensors) at `epoch`: per depth the mean over seeds, and how many of the
    seeds x depths pairs it is ahead in."""
    control = {"tleg": "random + tleg's stem/norm/head", "sws": "random + sws's stem/norm/head",
               "tleg fitted": "random + teacher's stem/norm/head"}
    out = {}
    depths = results[0]["depths"]
    for gene, ctrl in control.items():
        row = {}
        for base in ("random", ctrl):
            diffs = {d: [_at(r, gene, d, epoch) - _at(r, base, d, epoch) for r in results] for d in depths}
            row["over " + ("random" if base == "random" else "control")] = {
                "per_depth": {str(d): statistics.fmean(v) for d, v in diffs.items()},
                "ahead": sum(x > 0 for v in diffs.values() for x in v), "pairs": len(results) * len(depths)}
        out[gene] = row
    return out


def plot(results: list[dict[str, Any]], path: Path) -> None:
    from weightspace.extras import pyplot

    plt = pyplot()
    epochs = results[0]["epochs"]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.8), sharey=True)
    panels = (("tleg", "random + tleg's stem/norm/head"), ("sws", "random + sws's stem/norm/head"),
              ("tleg fitted", "random + teacher's stem/norm/head", "identity + teacher's stem/norm/head"))
    style = {0: ("C0", "o-"), 1: ("C1", "s--"), 2: ("C2", "^:")}
    for ax, names in zip(axes, panels):
        for i, name in enumerate(("random",) + names):
            ys = [[_depth_mean(r, name, e) for r in results] for e in range(epochs + 1)]
            m = [statistics.fmean(y) for y in ys]
            s = [statistics.stdev(y) if len(y) > 1 else 0.0 for y in ys]
            color, fmt = ("0.4", "x-") if name == "random" else style[i - 1]
            ax.plot(range(epochs + 1), m, fmt, color=color, label=name, markersize=4)
            ax.fill_between(range(epochs + 1), [a - b for a, b in zip(m, s)], [a + b for a, b in zip(m, s)],
                            color=color, alpha=0.15)
        ax.set_title(f"gene: {names[0]}", fontsize=9)
        ax.set_xlabel("epochs of training the descendant")
        ax.set_xticks(range(epochs + 1))
        ax.legend(fontsize=7, loc="lower right")
    axes[0].set_ylabel(f"test accuracy, mean over depths {results[0]['depths']}")
    fig.suptitle(f"{TASK}: mean ± std over seeds {[r['seed'] for r in results]}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    import argparse
    import json

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--work", type=Path, default=Path("runs/learngene-digits-work"))
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--plot", type=Path, default=None)
    args = ap.parse_args()
    if args.plot:
        from weightspace.extras import pyplot

        pyplot()  # a missing extra is reported before anything is computed
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    results = [learngene_digits(args.work / f"seed{args.seeds[0]}", args.seeds[0])]
    choice = results[0]["lr_choice"]
    results += [learngene_digits(args.work / f"seed{s}", s, lrs=choice["lr"]) for s in args.seeds[1:]]
    seconds = time.perf_counter() - t0
    epochs = results[0]["epochs"]
    print(f"{TASK}; seeds {args.seeds}; test accuracy, mean ± std over seeds\n")
    print(f"descendants' lr per init (validation accuracy after {choice['epochs']} epochs at depth "
          f"{choice['depth']}, seed {choice['seed']}):")
    for name, lr in choice["lr"].items():
        print(f"  {name}: {lr:g}   " + "  ".join(f"{k}: {v:.3f}" for k, v in choice["val_acc"][name].items()))
    print(f"mean over depths {results[0]['depths']}\n{table_by_epoch(results, (0, 1, 2, 3, epochs))}\n")
    for e in (0, 3):
        print(f"after {e} epochs\n{table_by_depth(results, e)}\n")
    for e in (1, 3):
        print(f"leads at epoch {e}:", json.dumps(leads(results, e), indent=1))
    print(f"teacher: {_cell([r['teacher_acc'] for r in results])}")
    for g in ("tleg", "sws"):
        print(f"{g} gene, auxiliary network's training accuracy: "
              f"{_cell([r['genes'][g]['acc_end'] for r in results])} "
              f"({results[0]['genes'][g]['steps']} steps, {_cell([r['genes'][g]['seconds'] for r in results])} s)")
    fits = [r["genes"]["tleg fitted"] for r in results]
    print(f"tleg fit, relative residual: {_cell([f['relative_residual'] for f in fits])} (the teacher's "
          f"initialization: {_cell([f['relative_residual_at_init'] for f in fits])})")
    r0 = results[0]
    print(f"parameters: genes {r0['gene_params']}; all descendants {r0['descendant_params']:,}")
    print(f"{seconds:.0f} s for {len(results)} seeds")
    if args.plot:
        plot(results, args.plot)
    if args.json:
        summary = {"by_epoch": {str(e): {n: _stats([_depth_mean(r, n, e) for r in results])
                                         for n in results[0]["curves"]} for e in range(epochs + 1)},
                   "by_depth": {str(e): {n: {str(d): _stats([_at(r, n, d, e) for r in results])
                                             for d in results[0]["depths"]} for n in results[0]["curves"]}
                                for e in (0, 3)},
                   "leads_epoch_1": leads(results, 1), "leads_epoch_3": leads(results, 3),
                   "lr_choice": choice, "seconds": round(seconds, 1),
                   "command": "python examples/learngene_digits.py --json benchmarks/results/learngene_digits.json "
                              "--plot docs/learngene-epochs.png"}
        args.json.write_text(json.dumps({"summary": summary, "runs": results}, indent=1,
                                        default=lambda x: x if not isinstance(x, float) or math.isfinite(x)
                                        else None) + "\n")


if __name__ == "__main__":
    main()
