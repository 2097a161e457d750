"""`wsmerge fisher` and `wsmerge gram`: per-model statistics for data-aware merges."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import click

from weightspace.cli.options import Command, device_option

_COMMON = [
    click.argument("model"),
    click.option("--data", required=True,
                 help="A zoo dataset reference (digits, digits:classes=0-4, ...) for zoo models; "
                      "a JSONL ({\"text\", \"label\"} per line) or text file for transformers models."),
    click.option("-o", "--out", type=click.Path(path_type=Path), required=True,
                 help="Output: a .safetensors file, or a directory (sharded safetensors and an "
                      "index); written atomically."),
    click.option("--split", type=click.Choice(["train", "val", "test"]), default="train", show_default=True,
                 help="Split of a zoo dataset."),
    click.option("--n-examples", type=click.IntRange(min=1), default=4096, show_default=True,
                 help="Use at most this many examples."),
    click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True),
    click.option("--task", type=click.Choice(["auto", "classification", "causal-lm"]), default="auto",
                 show_default=True, help="Head of a transformers model (auto: from config.json)."),
    click.option("--num-labels", type=click.IntRange(min=2), default=None,
                 help="Add a seeded classification head with N labels to a bare transformers encoder."),
    click.option("--max-length", type=click.IntRange(min=2), default=128, show_default=True,
                 help="Truncate text examples to this many tokens."),
    click.option("--seed", type=int, default=0, show_default=True),
    device_option,
    click.option("--overwrite", is_flag=True, help="Replace OUT if it exists."),
    click.option("--no-progress", is_flag=True, help="No progress bar."),
]


def _common(fn):
    for deco in reversed(_COMMON):
        fn = deco(fn)
    return fn


def _open(model: str, data: str, split: str, n_examples: int, batch_size: int, task: str,
          num_labels: int | None, max_length: int, seed: int, device: str = "cpu"):
    from weightspace.zoo.bind import open_batches, open_model

    adapter = open_model(model, task=task, num_labels=num_labels, seed=seed, device=device)
    tok = model if Path(model).is_dir() else None
    batches = open_batches(data, adapter, split=split, batch_size=batch_size, n_examples=n_examples,
                           tokenizer=tok, max_length=max_length)
    return adapter, batches


def _check_out(out: Path, overwrite: bool, *inputs: str | Path) -> None:
    """-o OUT is a .safetensors file or a directory (a name without a suffix: sharded safetensors
    and an index, like a checkpoint); it is none of the inputs nor inside one, and an existing
    one needs --overwrite."""
    from weightspace.files import check_output, check_output_file

    if out.suffix == ".safetensors":
        check_output_file(out, overwrite, inputs=inputs)
    elif out.suffix and not out.is_dir():
        raise click.UsageError(f"-o {out}: the output is a .safetensors file or a directory "
                               f"(a name without a suffix)")
    else:
        check_output(out, overwrite, inputs=inputs)


@click.command(cls=Command)
@_common
@click.option("--estimator", type=click.Choice(["exact", "sampled", "empirical"]), default="exact",
              show_default=True, help="exact: sum over classes weighted by the model's probabilities; "
                                      "sampled: labels drawn from the model; empirical: the data's labels.")
@click.option("--samples", type=click.IntRange(min=1), default=1, show_default=True,
              help="Label draws per example (sampled).")
def fisher(model: str, data: str, out: Path, split: str, n_examples: int, batch_size: int, task: str,
           num_labels: int | None, max_length: int, seed: int, device: str, overwrite: bool,
           no_progress: bool, estimator: str, samples: int) -> None:
    """Diagonal Fisher information of MODEL on DATA, as a companion weight space.

    Squares of per-example gradients of the log-likelihood (never the square
    of a batch gradient), averaged over examples, in float32, with MODEL's
    tensor names. Name the file as the model's `fisher` parameter in a
    `merge_method: fisher` spec.

    A transformers classifier works the same way, with a JSONL file as DATA
    (`--data train.jsonl --estimator empirical`).

    \b
    Examples (from the repository root):
      wsmerge fisher examples/digits/ft0 --data digits:classes=0-3 -o runs/ft0.fisher.safetensors
      wsmerge fisher examples/digits/ft1 --data digits:classes=4-6 --estimator empirical \\
          --n-examples 512 -o runs/ft1.fisher.safetensors
    """
    from weightspace.merges.fisher import fisher_diagonal, save_fisher

    _check_out(out, overwrite, model, data)
    adapter, batches = _open(model, data, split, n_examples, batch_size, task, num_labels, max_length, seed,
                             device)
    t0 = time.perf_counter()
    space = fisher_diagonal(adapter, batches, estimator=estimator, n_samples=samples, n_examples=n_examples,
                            seed=seed, progress=not no_progress and sys.stderr.isatty())
    space.meta.setdefault("fisher", {}).update({"model": str(model), "data": data, "split": split})
    save_fisher(space, out)
    info = space.meta.get("fisher", {})
    click.echo(f"{out}: {estimator} Fisher of {model} over {info.get('examples', '?')} examples, "
               f"{len(space)} tensors, {space.num_params:,} entries ({time.perf_counter() - t0:.1f} s)")


@click.command(cls=Command)
@_common
@click.option("--padding", type=click.Choice(["exclude", "include"]), default="exclude", show_default=True,
              help="Padding tokens' inputs: left out, or counted as the RegMean authors' compute_grams does.")
def gram(model: str, data: str, out: Path, split: str, n_examples: int, batch_size: int, task: str,
         num_labels: int | None, max_length: int, seed: int, device: str, overwrite: bool,
         no_progress: bool, padding: str) -> None:
    """Gram matrices of every linear layer's inputs (RegMean), as a companion weight space.

    For each torch.nn.Linear layer, G = X^T X / N over the N input rows
    (tokens; padding excluded unless --padding include), taken in eval mode
    and stored under the layer's weight name with shape (in, in). Name the
    file as the model's `gram` parameter in a `merge_method: regmean` spec.

    Layers of other linear kinds (GPT-2 Conv1D, convolutions) and tied or
    unused ones get no Gram; they are listed here, in the file's metadata and
    in the merge's notes, and a RegMean merge averages their weights.

    \b
    Example (from the repository root):
      wsmerge gram examples/digits/ft0 --data digits:classes=0-3 -o runs/ft0.gram.safetensors
    """
    import warnings

    from weightspace.merges.regmean import describe_skipped, gram_matrices, save_gram

    _check_out(out, overwrite, model, data)
    adapter, batches = _open(model, data, split, n_examples, batch_size, task, num_labels, max_length, seed,
                             device)
    t0 = time.perf_counter()
    with warnings.catch_warnings():  # the skipped layers are reported below, once
        warnings.filterwarnings("ignore", message="gram_matrices: no Gram for")
        space = gram_matrices(adapter, batches, n_examples=n_examples, padding=padding,
                              progress=not no_progress and sys.stderr.isatty())
    save_gram(space, out)
    click.echo(f"{out}: Gram matrices of {len(space)} linear layers of {model} "
               f"({time.perf_counter() - t0:.1f} s)")
    for line in describe_skipped(space.meta.get("skipped") or {}):
        click.echo(f"no Gram (a RegMean merge averages these weights): {line}")
