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


def _size_type():
    from weightspace.cli.run import SizeType

    return SizeType()


def _shard_size_option(fn):
    return click.option("--shard-size", type=_size_type(), default="5G", show_default=True,
                        help="Largest shard of a directory output (K/M/G/T, KiB/MiB/GiB).")(fn)


@click.command(cls=Command)
@_common
@click.option("--estimator", type=click.Choice(["exact", "sampled", "empirical"]), default="exact",
              show_default=True, help="exact: sum over classes weighted by the model's probabilities "
                                      "(classifiers only); sampled: labels drawn from the model; "
                                      "empirical: the data's labels (a causal LM's next tokens).")
@click.option("--samples", type=click.IntRange(min=1), default=1, show_default=True,
              help="Label draws per example (sampled).")
@click.option("--max-stats-memory", type=_size_type(), default="2GiB", show_default=True,
              help="Bytes of float32 Fisher accumulators held at once (e.g. 512M, 2GiB). When the "
                   "whole model's Fisher is larger, parameters are taken in groups, one data pass "
                   "per group. vmap chunks fill the rest (per-example gradients are chunk x group).")
@click.option("--vmap-chunk", type=click.IntRange(min=1), default=None,
              help="Examples per vmap call (default: as many as fit in --max-stats-memory beside the "
                   "accumulators, at least 1, at most --batch-size).")
@click.option("--per-example", type=click.Choice(["auto", "vmap", "loop"]), default="auto",
              show_default=True, help="Per-example gradients by torch.func.vmap, by an autograd loop, "
                                      "or auto: vmap, with the loop where the model does not trace "
                                      "and for a transformers model on the CPU (faster there, and "
                                      "less than half of vmap's memory at 134M).")
@_shard_size_option
def fisher(model: str, data: str, out: Path, split: str, n_examples: int, batch_size: int, task: str,
           num_labels: int | None, max_length: int, seed: int, device: str, overwrite: bool,
           no_progress: bool, estimator: str, samples: int, max_stats_memory: int,
           vmap_chunk: int | None, per_example: str, shard_size: int) -> None:
    """Diagonal Fisher information of MODEL on DATA, as a companion weight space.

    Squares of per-example gradients of the log-likelihood (never the square
    of a batch gradient), averaged over examples, in float32 whatever the
    model's dtype, with MODEL's tensor names. Name the file (or directory) as
    the model's `fisher` parameter in a `merge_method: fisher` spec.

    A transformers classifier takes a JSONL file as DATA (`--data train.jsonl
    --estimator empirical`); a causal LM (Llama, Qwen2, GPT-2...) a text file,
    one example per line, or a JSONL of {"text": ...}, with `--estimator
    empirical` or `sampled`. An example's log-likelihood is the sum over its
    non-padding next-token predictions.

    With -o DIR the Fisher is written as sharded safetensors and an index,
    group by group: at most --max-stats-memory of accumulators, the model and
    one batch are held. A tied embedding and lm_head is one parameter: its
    Fisher is written under each name the checkpoint stores.

    \b
    Examples (from the repository root):
      wsmerge fisher examples/digits/ft0 --data digits:classes=0-3 -o runs/ft0.fisher.safetensors
      wsmerge fisher examples/digits/ft1 --data digits:classes=4-6 --estimator empirical \\
          --n-examples 512 --max-stats-memory 20K -o runs/ft1-fisher
    """
    from weightspace.merges import fisher as fisher_api
    from weightspace.sources import load_space

    _check_out(out, overwrite, model, data)
    stored = list(load_space(model).keys())
    adapter, batches = _open(model, data, split, n_examples, batch_size, task, num_labels, max_length, seed,
                             device)
    t0 = time.perf_counter()
    info = fisher_api.write_fisher(adapter, batches, out, estimator=estimator, n_samples=samples, n_examples=n_examples,
                        seed=seed, per_example=per_example, vmap_chunk=vmap_chunk,
                        max_stats_memory=max_stats_memory, shard_size=shard_size, stored_names=stored,
                        info={"model": str(model), "data": data, "split": split}, overwrite=overwrite,
                        inputs=[model, data], progress=not no_progress and sys.stderr.isatty(),
                        estimate=fisher_api.fisher_diagonal)
    passes = info["passes"]
    click.echo(f"{out}: {estimator} Fisher of {model} over {info['examples']} examples, "
               f"{passes} pass{'es' if passes > 1 else ''} ({info['per_example']}), "
               f"{info['examples_per_second']} examples/s ({time.perf_counter() - t0:.1f} s)")


@click.command(cls=Command)
@_common
@click.option("--padding", type=click.Choice(["exclude", "include"]), default="exclude", show_default=True,
              help="Padding tokens' inputs: left out, or counted as the RegMean authors' compute_grams does.")
@click.option("--max-stats-memory", type=_size_type(), default="2GiB", show_default=True,
              help="Memory for Gram accumulators at once (K/M/G/T, KiB/MiB/GiB). Layers whose Grams do "
                   "not fit together are taken in further passes over the data.")
@click.option("--gram-dtype", type=click.Choice(["float32", "float64"]), default="float32",
              show_default=True, help="Accumulate and store the Grams in this dtype (activations of a "
                                      "bf16/fp16 model are cast up first).")
@_shard_size_option
def gram(model: str, data: str, out: Path, split: str, n_examples: int, batch_size: int, task: str,
         num_labels: int | None, max_length: int, seed: int, device: str, overwrite: bool,
         no_progress: bool, padding: str, max_stats_memory: int, gram_dtype: str, shard_size: int) -> None:
    """Gram matrices of every linear layer's inputs (RegMean), as a companion weight space.

    For each linear layer, G = X^T X / N over the N input rows, taken in
    eval mode and stored under the layer's weight name with shape (in, in):
    tokens for nn.Linear and GPT-2's Conv1D (padding excluded unless
    --padding include), unfolded input patches (in * kernel) for Conv1d and
    Conv2d. Name the output as the model's `gram` parameter in a
    `merge_method: regmean` spec.

    -o DIR streams: the Grams of as many layers as fit --max-stats-memory
    are accumulated (on --device, in --gram-dtype), written as shards and
    dropped, and the data runs again for the next group; the run says how
    many passes it took. -o FILE.safetensors holds every Gram in memory, for
    small models.

    A tied lm_head (sharing the input embedding) gets no Gram, nor do grouped,
    transposed or 3-D convolutions or layers the forward never reaches; they
    are listed here, in the file's metadata and in the merge's notes, and a
    RegMean merge averages their weights.

    \b
    Examples (from the repository root):
      wsmerge gram examples/digits/ft0 --data digits:classes=0-3 -o runs/ft0.gram.safetensors
      wsmerge gram examples/digits/ft0 --data digits:classes=0-3 -o runs/ft0-gram \\
          --max-stats-memory 40KiB --shard-size 20K
    """
    import warnings

    import torch

    from weightspace.merges import regmean
    from weightspace.merges.regmean.grams import GRAM_DTYPES, human_bytes

    _check_out(out, overwrite, model, data)
    dtype = GRAM_DTYPES[gram_dtype]
    adapter, batches = _open(model, data, split, n_examples, batch_size, task, num_labels, max_length, seed,
                             device)
    progress = not no_progress and sys.stderr.isatty()
    t0 = time.perf_counter()
    with warnings.catch_warnings():  # the skipped layers are reported below, once
        warnings.filterwarnings("ignore", message="gram_matrices: no Gram for")
        if out.suffix == ".safetensors":
            el = torch.empty((), dtype=dtype).element_size()
            total = sum(la.in_dim**2 * el for la in regmean.find_layers(adapter.module).layers)
            if total > max_stats_memory:
                raise click.UsageError(
                    f"-o {out}: one file holds every Gram in memory ({human_bytes(total)}), more than "
                    f"--max-stats-memory {human_bytes(max_stats_memory)}; give a directory (-o "
                    f"{out.with_suffix('')}) to stream them")
            space = regmean.gram_matrices(adapter, batches, n_examples=n_examples, padding=padding,
                                          dtype=dtype, progress=progress)
            regmean.save_gram(space, out)
            info, n = space.meta, len(space)
        else:
            info = regmean.write_grams(adapter, batches, out, max_memory=max_stats_memory,
                                       shard_size=shard_size, overwrite=overwrite, inputs=[model, data],
                                       n_examples=n_examples, padding=padding, dtype=dtype,
                                       progress=progress)
            n = len(info.get("layouts") or {}) - sum(v == "unused" for v in info["skipped"].values())
    passes = info.get("passes", 1)
    click.echo(f"{out}: Gram matrices of {n} linear layers of {model} over {info.get('examples')} "
               f"examples, {passes} pass{'es' if passes != 1 else ''} over the data "
               f"({time.perf_counter() - t0:.1f} s)")
    for line in regmean.describe_skipped(info.get("skipped") or {}):
        click.echo(f"no Gram (a RegMean merge averages these weights): {line}")

