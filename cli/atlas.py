"""`wsmerge atlas ...`: learn anisotropic task-vector coefficients (aTLAS), show them."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import click

from weightspace.cli.options import GreedyOption, Group, check_plot, device_option


@click.group(cls=Group)
def atlas() -> None:
    """aTLAS: task vectors composed with learned per-block coefficients.

    \b
    Examples (from the repository root):
      wsmerge atlas learn --base examples/digits/base --task-vectors examples/digits/ft0 \\
          examples/digits/ft1 examples/digits/ft2 --data digits --steps 50 -o runs/atlas.coeffs.safetensors
      wsmerge atlas show runs/atlas.coeffs.safetensors --plot runs/atlas.png   # task vector x block
      wsmerge run examples/atlas.yaml runs/atlas     # merge_method: atlas, parameters: {coefficients: ...}

    theta = theta_0 + sum_i sum_b lambda_(i,b) (theta_i - theta_0), one lambda per
    task vector and parameter tensor (Zhang et al., NeurIPS 2024). Only the
    coefficients are trained; the backbone is never modified.
    """


@atlas.command()
@click.option("--base", required=True, help="The pre-trained model theta_0 (zoo checkpoint or transformers dir).")
@click.option("--task-vectors", "finetuned", cls=GreedyOption, required=True, multiple=True,
              help="Fine-tuned models theta_i (task vector = theta_i - theta_0); repeat, or list after one flag.")
@click.option("--data", required=True, help="Zoo dataset reference, or a JSONL file for transformers models.")
@click.option("-o", "--out", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="Output coefficients (.safetensors), written atomically.")
@click.option("--objective", type=click.Choice(["supervised", "entropy", "pseudo-label"]), default="supervised",
              show_default=True, help="supervised: cross-entropy on labels (task addition, few-shot); "
                                      "entropy: unsupervised test-time adaptation (AdaMerging); "
                                      "pseudo-label: cross-entropy on confident predictions only.")
@click.option("--split", type=click.Choice(["train", "val", "test"]), default="val", show_default=True,
              help="Split of a zoo dataset the coefficients learn from.")
@click.option("--shots", type=click.IntRange(1, 16), default=None,
              help="Few-shot: k labelled examples per class (zoo datasets).")
@click.option("--n-examples", type=click.IntRange(min=1), default=None, help="Use at most this many examples.")
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--steps", type=click.IntRange(min=1), default=200, show_default=True, help="Optimizer steps.")
@click.option("--lr", type=float, default=None, help="Learning rate (default 1e-3; 1e-1 with --shots).")
@click.option("--partition", "partitions", type=click.IntRange(min=1), default=1, show_default=True,
              help="Split each tensor's entries into P seeded random groups, one coefficient each.")
@click.option("--blockwise/--no-blockwise", default=True, show_default=True,
              help="--no-blockwise: one coefficient per task vector.")
@click.option("--budget", type=click.IntRange(min=1), default=None,
              help="Keep only the B task vectors (or B per block) with the largest |dL/dlambda| at 0.")
@click.option("--budget-mode", type=click.Choice(["vectors", "blocks"]), default="vectors", show_default=True)
@click.option("--gradient-free", is_flag=True, help="No backward pass: a derivative-free optimizer.")
@click.option("--threshold", type=float, default=0.9, show_default=True, help="Confidence for pseudo-labels.")
@click.option("--penalty", type=click.Choice(["l1", "l2"]), default=None, help="Penalty on the coefficients.")
@click.option("--penalty-weight", type=float, default=0.0, show_default=True)
@device_option
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
def learn(base: str, finetuned: tuple[str, ...], data: str, out: Path, objective: str, split: str,
          shots: int | None, n_examples: int | None, batch_size: int, steps: int, lr: float | None,
          partitions: int, blockwise: bool, budget: int | None, budget_mode: str, gradient_free: bool,
          threshold: float, penalty: str | None, penalty_weight: float, device: str, seed: int,
          overwrite: bool, no_progress: bool) -> None:
    """Learn aTLAS coefficients for task vectors (FT - BASE) on DATA.

    \b
    Example (from the repository root; few-shot, 4 labelled digits per class):
      wsmerge atlas learn --base examples/digits/base --task-vectors examples/digits/ft0 \\
          examples/digits/ft1 --data digits --shots 4 --steps 50 -o runs/atlas-4shot.coeffs.safetensors
    """
    from weightspace.errors import InputError
    from weightspace.merges.atlas import learn_coefficients, save_coefficients
    from weightspace.sources import load_space
    from weightspace.zoo.bind import open_batches, open_model

    if out.exists() and not overwrite:
        raise InputError(f"{out} exists; pass --overwrite to replace it")
    if out.suffix != ".safetensors":
        raise click.UsageError(f"-o {out}: the output is a .safetensors file")
    adapter = open_model(base)
    base_space = load_space(base)
    fts = [load_space(f) for f in finetuned]
    if shots is not None:
        batches = _few_shot_batches(data, adapter, split, shots, seed, batch_size)
    else:
        batches = open_batches(data, adapter, split=split, batch_size=batch_size, n_examples=n_examples,
                               tokenizer=base if Path(base).is_dir() else None)
    t0 = time.perf_counter()
    coeffs = learn_coefficients(
        adapter, base_space, fts, batches, objective=objective, steps=steps, lr=lr,
        blockwise=blockwise, partitions=partitions, budget=budget, budget_mode=budget_mode,
        gradient_free=gradient_free, threshold=threshold, penalty=penalty, penalty_weight=penalty_weight,
        device=device, seed=seed, progress=not no_progress and sys.stderr.isatty(),
        task_names=list(finetuned), few_shot=shots is not None,
    )
    coeffs.meta.update({"data": data, "split": split, "shots": shots, "base": base})
    save_coefficients(coeffs, out)
    click.echo(f"{out}: {objective} coefficients, {tuple(coeffs.values.shape)} (tasks x blocks"
               f"{' x partitions' if coeffs.partitions > 1 else ''}) in {time.perf_counter() - t0:.1f} s")


def _few_shot_batches(data: str, adapter, split: str, k: int, seed: int, batch_size: int):
    from weightspace.errors import SpecError
    from weightspace.merges.atlas import few_shot
    from weightspace.zoo.data import load_task

    if Path(data).suffix in (".jsonl", ".txt"):
        raise SpecError("--shots takes a zoo dataset reference (few-shot text data: pass a JSONL file "
                        "with k examples per label and no --shots)")
    s = load_task(data).split(split)
    x, y = few_shot(s.x, s.y, k, seed)
    return [{"x": x[i:i + batch_size], "y": y[i:i + batch_size]} for i in range(0, len(y), batch_size)]


@atlas.command()
@click.argument("coefficients", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--plot", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write a heat map (task vector x block) as PNG/PDF/SVG.")
@click.option("--json", "as_json", is_flag=True, help="Print the coefficients as JSON.")
def show(coefficients: Path, plot: Path | None, as_json: bool) -> None:
    """Print learned coefficients per task vector and block; --plot draws the heat map.

    \b
    Example (from the repository root):
      wsmerge atlas show examples/digits/atlas.coeffs.safetensors --json
    """
    check_plot(plot)
    from weightspace.merges.atlas import load_coefficients

    c = load_coefficients(coefficients)
    values = c.values if c.values.dim() == 2 else c.values.mean(-1)
    if as_json:
        click.echo(json.dumps({"tasks": c.tasks, "blocks": c.blocks, "partitions": c.partitions,
                               "values": c.values.tolist(), "meta": c.meta}, indent=2, default=str))
    else:
        w = max(len(b) for b in c.blocks)
        click.echo(f"{'block'.ljust(w)}  " + "  ".join(f"task{i:<4}" for i in range(len(c.tasks))))
        for j, b in enumerate(c.blocks):
            click.echo(f"{b.ljust(w)}  " + "  ".join(f"{float(values[i, j]):>8.4f}" for i in range(len(c.tasks))))
        for i, t in enumerate(c.tasks):
            click.echo(f"task{i}: {t}")
    if plot is not None:
        plot_coefficients(c, plot)
        click.echo(f"heat map: {plot}", err=as_json)


def plot_coefficients(c, path: Path) -> Path:
    from weightspace.extras import pyplot

    plt = pyplot()
    values = (c.values if c.values.dim() == 2 else c.values.mean(-1)).float().numpy()
    fig, ax = plt.subplots(figsize=(max(4.0, 0.32 * len(c.blocks) + 2), 0.5 * len(c.tasks) + 2.2))
    lim = float(abs(values).max()) or 1.0
    im = ax.imshow(values, cmap="RdBu", vmin=-lim, vmax=lim, aspect="auto")
    ax.set_yticks(range(len(c.tasks)), [Path(t).name or t for t in c.tasks])
    ax.set_xticks(range(len(c.blocks)), c.blocks, rotation=90, fontsize=7)
    ax.set_xlabel("block (parameter tensor)")
    ax.set_title(f"aTLAS coefficients ({c.meta.get('objective', '?')}"
                 f"{', mean over partitions' if c.values.dim() == 3 else ''})", fontsize=10)
    fig.colorbar(im, ax=ax, shrink=0.8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
