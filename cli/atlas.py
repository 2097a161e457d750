"""`wsmerge atlas ...`: learn anisotropic task-vector coefficients (aTLAS), show them."""

from __future__ import annotations

import json
import sys
import time
import warnings
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
@click.option("--data", required=True,
              help="Zoo dataset reference; for transformers models a JSONL file ({\"text\", \"label\"} for "
                   "classifiers) or a text file (one example a line; a causal LM learns on the mean "
                   "next-token NLL over its non-padding tokens).")
@click.option("--tokenizer", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Folder with the tokenizer for text data (default: the --base folder).")
@click.option("--max-length", type=click.IntRange(min=2), default=128, show_default=True,
              help="Tokens per example of text data (longer lines are truncated).")
@click.option("--task", type=click.Choice(["auto", "classification", "causal-lm"]), default="auto",
              show_default=True,
              help="What a transformers model is: auto reads config.json's architectures "
                   "(*ForCausalLM, *ForSequenceClassification); causal-lm for others such as "
                   "GPT2LMHeadModel.")
@click.option("-o", "--out", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="Output coefficients (.safetensors), written atomically.")
@click.option("--objective", type=click.Choice(["supervised", "entropy", "pseudo-label", "ufm"]),
              default="supervised", show_default=True,
              help="supervised: cross-entropy on labels (task addition, few-shot); without labels: ufm, "
                   "the paper's test-time objective (fixed zero-shot pseudo-labels, trusted examples, weak "
                   "and strong views; zoo image data), entropy (AdaMerging), pseudo-label (the model's own "
                   "confident argmax).")
@click.option("--preset", type=click.Choice(["authors"]), default=None,
              help="The authors' run for this objective: --epochs 20 (task addition) or 10 (few-shot, "
                   "ufm), --batch-size 128, --select-split val; few-shot examples drawn from --split "
                   "train, repeated to 10 batches an epoch and augmented (crop-flip); ufm on --split "
                   "test. Options given explicitly win.")
@click.option("--split", type=click.Choice(["train", "val", "test"]), default="val", show_default=True,
              help="Split of a zoo dataset the coefficients learn from.")
@click.option("--shots", type=click.IntRange(1, 16), default=None,
              help="Few-shot: k labelled examples per class (zoo datasets).")
@click.option("--n-examples", type=click.IntRange(min=1), default=None, help="Use at most this many examples.")
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--steps", type=click.IntRange(min=1), default=200, show_default=True, help="Optimizer steps.")
@click.option("--epochs", type=click.IntRange(min=1), default=None,
              help="Passes over the data instead of --steps (a ufm epoch: one pass over the untrusted examples).")
@click.option("--lr", type=float, default=None,
              help="Learning rate (default 1e-3; 1e-1 with --shots, as the authors).")
@click.option("--schedule", type=click.Choice(["auto", "constant", "cosine"]), default="auto", show_default=True,
              help="auto: constant for supervised task addition, cosine decay for few-shot and test-time (the authors').")
@click.option("--select-split", type=click.Choice(["train", "val", "test"]), default=None,
              help="Keep the coefficients of the epoch with the best accuracy on this split of the zoo "
                   "dataset (the authors select on val, starting from the zero-shot accuracy).")
@click.option("--select-data", default=None,
              help="Labelled data to select the best epoch on, if not DATA (a zoo reference with "
                   "--select-split, or a JSONL file).")
@click.option("--augment", type=click.Choice(["crop-flip"]), default=None,
              help="Augment each step's images (random resized crop + flip; the strong view of ufm).")
@click.option("--partition", "partitions", type=click.IntRange(min=1), default=1, show_default=True,
              help="Split each tensor's entries into P seeded random groups, one coefficient each.")
@click.option("--blockwise/--no-blockwise", default=True, show_default=True,
              help="--no-blockwise: one coefficient per task vector.")
@click.option("--budget", type=click.IntRange(min=1), default=None,
              help="Keep only the B task vectors (or B per block) with the largest |dL/dlambda| at 0.")
@click.option("--budget-mode", type=click.Choice(["vectors", "blocks"]), default="vectors", show_default=True)
@click.option("--gradient-free", is_flag=True, help="No backward pass: a derivative-free optimizer.")
@click.option("--threshold", type=float, default=None,
              help="Confidence a pseudo-label needs (default 0.99 for ufm, the authors'; 0.9 for pseudo-label).")
@click.option("--penalty", type=click.Choice(["l1", "l2"]), default=None,
              help="Penalty: the mean over blocks of the coefficients' l1 / l2 norm across task vectors.")
@click.option("--penalty-weight", type=float, default=0.5, show_default=True)
@click.option("--tv-dtype", type=click.Choice(["auto", "float16", "bfloat16", "float32"]), default="auto",
              show_default=True,
              help="dtype the task vectors are held in: auto = the model's when it is 16-bit (bf16 "
                   "model: bf16), float16 for a float32 model. Only the coefficients are float32.")
@device_option
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
def learn(base: str, finetuned: tuple[str, ...], data: str, tokenizer: Path | None, max_length: int,
          task: str, out: Path, objective: str, preset: str | None,
          split: str, shots: int | None, n_examples: int | None, batch_size: int, steps: int,
          epochs: int | None, lr: float | None, schedule: str, select_split: str | None,
          select_data: str | None, augment: str | None, partitions: int, blockwise: bool,
          budget: int | None, budget_mode: str, gradient_free: bool, threshold: float | None,
          penalty: str | None, penalty_weight: float, tv_dtype: str, device: str, seed: int,
          overwrite: bool, no_progress: bool) -> None:
    """Learn aTLAS coefficients for task vectors (FT - BASE) on DATA.

    \b
    Examples (from the repository root):
      # few-shot, 4 labelled digits per class, as the authors run it
      wsmerge atlas learn --base examples/digits/base --task-vectors examples/digits/ft0 \\
          examples/digits/ft1 --data digits --shots 4 --preset authors -o runs/atlas-4shot.coeffs.safetensors
      # test-time adaptation on the unlabelled test inputs, best epoch on val
      wsmerge atlas learn --base examples/digits/base --task-vectors examples/digits/ft0 \\
          examples/digits/ft1 --data digits --objective ufm --preset authors \\
          -o runs/atlas-ufm.coeffs.safetensors

    A causal LM (Llama, GPT-2, ...) learns the same way from a text file (one
    example a line; the loss is the mean next-token NLL over non-padding tokens),
    tokenized with the base folder's tokenizer or --tokenizer DIR: --base
    ./llama-base --task-vectors ./llama-math ./llama-code --data train.txt.
    A bf16 model keeps bf16 task vectors (--tv-dtype auto).
    """
    import torch

    from weightspace.errors import InputError, SpecError
    from weightspace.files import check_output_file
    from weightspace.merges.atlas import learn_coefficients, save_coefficients
    from weightspace.sources import load_space
    from weightspace.zoo.bind import open_batches, open_model

    if out.suffix != ".safetensors":
        raise click.UsageError(f"-o {out}: the output is a .safetensors file")
    text_data = Path(data).suffix in (".jsonl", ".txt") or Path(data).is_file()
    tok_dir = tokenizer if tokenizer is not None else (Path(base) if Path(base).is_dir() else None)
    check_output_file(out, overwrite, inputs=[base, *finetuned, data] + ([str(tok_dir)] if tok_dir else []))
    if text_data:
        _check_text_inputs(Path(data), tok_dir, tokenizer is not None)
    ctx = click.get_current_context()
    given = {name for name in ("steps", "epochs", "batch_size", "select_split", "augment", "split")
             if ctx.get_parameter_source(name) != click.core.ParameterSource.DEFAULT}
    if {"steps", "epochs"} <= given:
        raise click.UsageError("--steps and --epochs: give one of them")
    zoo_data = Path(data).suffix not in (".jsonl", ".txt")
    if preset == "authors":
        if not given & {"steps", "epochs"}:
            epochs = 20 if objective == "supervised" and shots is None else 10
        if "batch_size" not in given:
            batch_size = 128
        if "select_split" not in given and select_data is None and zoo_data:
            select_split = "val"
        if shots is not None and "split" not in given:  # the authors draw the k shots from train
            split = "train"
        if objective == "ufm" and "split" not in given:  # and adapt to the unlabelled test inputs
            split = "test"
    adapter = open_model(base, task=task, device=device)
    base_space = load_space(base)
    fts = [load_space(f) for f in finetuned]
    if shots is not None:
        batches = _few_shot_batches(data, adapter, split, shots, seed, batch_size, oversample=preset == "authors")
        if preset == "authors" and "augment" not in given and batches[0]["x"].dim() == 4:
            augment = "crop-flip"
    else:
        batches = open_batches(data, adapter, split=split, batch_size=batch_size, n_examples=n_examples,
                               tokenizer=tok_dir, max_length=max_length)
        if text_data:
            _check_tokens(Path(data), adapter, batches)
    select = None
    if select_split is not None or select_data is not None:
        ref = select_data or data
        if Path(ref).suffix not in (".jsonl", ".txt") and select_split is None:
            raise SpecError("--select-data: a zoo dataset needs --select-split too")
        select = open_batches(ref, adapter, split=select_split or "val", batch_size=512,
                              tokenizer=tok_dir, max_length=max_length)
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        coeffs = learn_coefficients(
            adapter, base_space, fts, batches, objective=objective, steps=steps, epochs=epochs, lr=lr,
            schedule=schedule, blockwise=blockwise, partitions=partitions, budget=budget,
            budget_mode=budget_mode, gradient_free=gradient_free, threshold=threshold, penalty=penalty,
            penalty_weight=penalty_weight, augment=augment, select=select, device=device, seed=seed,
            progress=not no_progress and sys.stderr.isatty(), task_names=list(finetuned),
            few_shot=shots is not None, tv_dtype=None if tv_dtype == "auto" else getattr(torch, tv_dtype),
        )
    if coeffs.meta["steps_taken"] == 0:
        why = next((str(w.message) for w in caught if "took no optimizer step" in str(w.message)),
                   "learn_coefficients took no optimizer step")
        raise InputError(f"{why}; {out} was not written")
    for w in caught:
        click.echo(f"warning: {w.message}", err=True)
    coeffs.meta.update({"data": data, "split": split, "shots": shots, "base": base, "preset": preset,
                        "tokenizer": None if tok_dir is None or not text_data else str(tok_dir),
                        "select_split": select_split, "select_data": select_data})
    save_coefficients(coeffs, out)
    chosen = coeffs.meta["selection"]
    picked = (f"; kept epoch {chosen['best_epoch']} of {len(chosen['scores']) - 1} (accuracy "
              f"{chosen['best_score']:.3f}, {chosen['scores'][0]:.3f} before)" if chosen else "")
    click.echo(f"{out}: {objective} coefficients, {tuple(coeffs.values.shape)} (tasks x blocks"
               f"{' x partitions' if coeffs.partitions > 1 else ''}), {coeffs.meta['steps']} steps in "
               f"{time.perf_counter() - t0:.1f} s{picked}")


def _check_text_inputs(data: Path, tok_dir: Path | None, given: bool) -> None:
    """Before any model is read: the text file exists and holds a line, and a tokenizer is there."""
    from weightspace.errors import InputError
    from weightspace.tokenizers.members import VOCAB_FILES, has_vocab_files

    if not data.is_file():
        raise InputError(f"--data {data}: no such file")
    if not any(line.strip() for line in data.read_text(encoding="utf-8").splitlines()):
        raise InputError(f"--data {data}: no text (every line is empty), so no token to learn from")
    if tok_dir is None or not has_vocab_files(tok_dir):
        what = f"--tokenizer {tok_dir}" if given else f"--base {tok_dir}"
        raise InputError(f"{what}: no tokenizer files (looked for {', '.join(VOCAB_FILES[:4])}) to "
                         f"tokenize --data {data}; save the tokenizer with the model or pass "
                         f"--tokenizer DIR")


def _check_tokens(data: Path, adapter, batches: list) -> None:
    """The text must give at least one token to predict (a line of two tokens or more)."""
    from weightspace.binding import IGNORE_INDEX, HFCausalLMAdapter
    from weightspace.errors import InputError

    if not isinstance(adapter, HFCausalLMAdapter):
        return
    for b in batches:
        y = adapter.labels_or_none(b)
        if y is None or bool((y != IGNORE_INDEX).any()):
            return
    raise InputError(f"--data {data}: no token to predict: every line tokenizes to fewer than 2 tokens "
                     f"(a causal LM predicts each token from the ones before it)")


def _few_shot_batches(data: str, adapter, split: str, k: int, seed: int, batch_size: int, oversample: bool):
    from weightspace.errors import SpecError
    from weightspace.merges.atlas import few_shot
    from weightspace.merges.atlas.data import oversampled_batches
    from weightspace.zoo.data import load_task

    if Path(data).suffix in (".jsonl", ".txt"):
        raise SpecError("--shots takes a zoo dataset reference (few-shot text data: pass a JSONL file "
                        "with k examples per label and no --shots)")
    s = load_task(data).split(split)
    x, y = few_shot(s.x, s.y, k, seed)
    if oversample:  # the authors' few-shot loader: repeated to more than 10 batches an epoch
        return oversampled_batches(x, y, batch_size, seed)
    return [{"x": x[i:i + batch_size], "y": y[i:i + batch_size]} for i in range(0, len(y), batch_size)]


def _recorded_path(recorded: str | None, file: Path) -> str:
    """A model path as a coefficients file records it (relative to the file), as a path from here."""
    if recorded is None:
        return "in memory"
    return recorded if Path(recorded).is_absolute() else str(file.parent / recorded)


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
        click.echo(json.dumps({"tasks": c.tasks, "models": c.models, "blocks": c.blocks,
                               "partitions": c.partitions, "values": c.values.tolist(), "meta": c.meta},
                              indent=2, default=str))
    else:
        w = max(len(b) for b in c.blocks)
        click.echo(f"{'block'.ljust(w)}  " + "  ".join(f"task{i:<4}" for i in range(len(c.tasks))))
        for j, b in enumerate(c.blocks):
            click.echo(f"{b.ljust(w)}  " + "  ".join(f"{float(values[i, j]):>8.4f}" for i in range(len(c.tasks))))
        for i, t in enumerate(c.tasks):
            ident = c.models[i] if c.models else None
            click.echo(f"task{i}: {t}" + (f"  ({_recorded_path(ident['path'], coefficients)}, fingerprint "
                                          f"{ident['fingerprint']})" if ident else ""))
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
