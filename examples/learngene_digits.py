"""Learngene in miniature, on digits: grow networks of any depth from one compact gene.

    python examples/learngene_digits.py                  # seeds 0-2, work files in runs/learngene-digits-work/
    python examples/learngene_digits.py --seeds 0 --plot docs/learngene-epochs.png

A teacher (a pre-LN residual MLP, 6 blocks) is trained on digits. Three genes
come from it: a TLEG gene and an SWS gene trained by soft distillation into
an auxiliary 6-block network (as the papers do), and a TLEG gene fitted to the
teacher's weights without training (least squares over depth). Descendants of
depth 2..8 are initialized from each gene, or randomly, and trained for the
same few epochs; test accuracy is recorded after every epoch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from weightspace.ir import WeightSpace

WIDTH = 32
DEPTHS = (2, 3, 4, 6, 8)
INITS = ("random", "tleg (trained)", "sws (trained)", "tleg (fitted)")


def _arch(depth: int) -> dict:
    return {"arch": "resmlp", "width": WIDTH, "depth": depth, "mlp_ratio": 2}


def learngene_digits(workdir: str | Path, seed: int = 0, *, teacher_epochs: int = 15, gene_epochs: int = 5,
                     epochs: int = 3, depths: tuple[int, ...] = DEPTHS) -> dict[str, Any]:
    from weightspace.merges.learngene import fit_gene, save_expanded, save_gene, train_gene
    from weightspace.sources import load_space
    from weightspace.zoo.arch import build_model
    from weightspace.zoo.bind import open_batches, open_model
    from weightspace.zoo.build import checkpoint_config
    from weightspace.zoo.data import load_task
    from weightspace.zoo.train import ModelRun, TrainConfig, train

    work = Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    task = load_task("digits")

    # the teacher
    run = ModelRun(dataset="digits", arch=_arch(6), seed=seed, train=TrainConfig(epochs=teacher_epochs, lr=0.05))
    ck = train(run, task=task).checkpoints[-1]
    teacher_dir = work / "teacher"
    WeightSpace.from_tensors(ck.tensors).save(
        teacher_dir, config=checkpoint_config(run, ck.epoch, task.input_shape, task.num_classes), overwrite=True)
    teacher = open_model(teacher_dir)
    batches = open_batches("digits", teacher, split="train", batch_size=64)

    def factory(depth: int) -> torch.nn.Module:
        return build_model(_arch(depth), task.input_shape, task.num_classes)

    genes = {
        "tleg (trained)": train_gene(factory, teacher, batches, mode="tleg", aux_depth=6, epochs=gene_epochs,
                                     seed=seed),
        "sws (trained)": train_gene(factory, teacher, batches, mode="sws", aux_depth=6, stages=[2, 2, 2],
                                    epochs=gene_epochs, seed=seed),
        "tleg (fitted)": fit_gene(load_space(teacher_dir), mode="tleg"),
    }
    gene_params = {}
    for name, g in genes.items():
        slug = name.split(" ")[0] + "-" + name.split("(")[1].rstrip(")")
        save_gene(g, work / f"gene-{slug}", overwrite=True)
        gene_params[name] = g.space.num_params

    curves: dict[str, dict[int, list[float]]] = {name: {} for name in INITS}
    for depth in depths:
        for name in INITS:
            init = None
            if name != "random":
                slug = name.split(" ")[0] + "-" + name.split("(")[1].rstrip(")")
                init = work / f"desc-{slug}-{depth}"
                save_expanded(genes[name], depth, init, overwrite=True)
            r = ModelRun(dataset="digits", arch=_arch(depth), seed=seed + 1, init=str(init) if init else None,
                         train=TrainConfig(epochs=epochs, lr=0.02, checkpoints=tuple(range(epochs))))
            res = train(r, task=task)
            curves[name][depth] = [c.metrics["test_acc"] for c in res.checkpoints]
    teacher_acc = ck.metrics["test_acc"]
    each = sum(sum(p.numel() for p in factory(d).parameters()) for d in depths)
    return {"seed": seed, "teacher_acc": teacher_acc, "curves": curves, "gene_params": gene_params,
            "descendant_params": each, "depths": list(depths), "epochs": epochs}


def table(results: list[dict[str, Any]], epoch: int) -> str:
    depths = results[0]["depths"]
    lines = ["| init | " + " | ".join(f"depth {d}" for d in depths) + " | mean |",
             "| --- | " + " | ".join("---:" for _ in depths) + " | ---: |"]
    for name in INITS:
        vals = [sum(r["curves"][name][d][epoch] for r in results) / len(results) for d in depths]
        lines.append(f"| {name} | " + " | ".join(f"{v:.3f}" for v in vals) + f" | {sum(vals) / len(vals):.3f} |")
    return "\n".join(lines)


def plot(results: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    depths, epochs = results[0]["depths"], results[0]["epochs"]
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for i, name in enumerate(INITS):
        ys = [sum(r["curves"][name][d][e] for r in results for d in depths) / (len(results) * len(depths))
              for e in range(epochs + 1)]
        ax.plot(range(epochs + 1), ys, "o-", color=f"C{i}", label=name)
    ax.set_xlabel("epochs of training the descendant")
    ax.set_ylabel(f"test accuracy (mean over depths {depths[0]}..{depths[-1]})")
    ax.set_xticks(range(epochs + 1))
    ax.legend(fontsize=8)
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
    torch.set_num_threads(1)
    results = [learngene_digits(args.work / f"seed{s}", s) for s in args.seeds]
    r0 = results[0]
    for e in range(r0["epochs"] + 1):
        print(f"test accuracy after {e} epoch(s), mean over seeds {args.seeds}\n{table(results, e)}\n")
    print(f"teacher: {sum(r['teacher_acc'] for r in results) / len(results):.3f}")
    print(f"parameters: gene {r0['gene_params']}; all descendants {r0['descendant_params']:,}")
    if args.plot:
        plot(results, args.plot)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
