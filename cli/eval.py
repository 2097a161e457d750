"""`wsmerge eval`: perplexity, multiple-choice and classification accuracy of a (merged) model.

    wsmerge eval runs/merged --data val.txt --data mc.jsonl --json runs/eval.json
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import click

from weightspace.cli.options import Command, device_option


@click.command(cls=Command, name="eval")
@click.argument("model", type=click.Path(file_okay=False, path_type=Path))
@click.option("--data", "data", multiple=True, metavar="FILE",
              help="An evaluation file (repeat for several): a text file (perplexity, one document a "
                   "line) or JSONL of {\"context\", \"choices\", \"answer\"}, {\"text\", \"choices\", "
                   "\"label\"} or {\"text\", \"label\"} lines.")
@click.option("--lm-eval", "lm_eval_tasks", default=None, metavar="TASKS",
              help="lm-evaluation-harness tasks (comma-separated) run on the loaded model; needs the "
                   "lmeval extra (pip install 'weightspace[lmeval]').")
@click.option("--tokenizer", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="The tokenizer's folder, when MODEL has none (e.g. the base model's).")
@click.option("--json", "json_out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write the report here as JSON (atomically).")
@click.option("--overwrite", is_flag=True, help="Replace the --json file if it exists.")
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True,
              help="Sequences per forward pass.")
@click.option("--max-length", type=click.IntRange(min=2), default=None,
              help="Tokens per forward pass; longer documents are scored in rolling windows "
                   "[default: the model's max_position_embeddings, at most 2048].")
@click.option("--limit", type=click.IntRange(min=1), default=None,
              help="Score only the first N examples of each file (and of each lm-eval task).")
@device_option
@click.option("--no-progress", is_flag=True, help="No progress bar.")
def eval_(model: Path, data: tuple[str, ...], lm_eval_tasks: str | None, tokenizer: Path | None,
          json_out: Path | None, overwrite: bool, batch_size: int, max_length: int | None,
          limit: int | None, device: str, no_progress: bool) -> None:
    """Score MODEL (a transformers model directory, e.g. a merge's output) on local files.

    \b
    What is measured depends on the file (every line is checked first):
      text file                            perplexity: one document a line
      JSONL {"context","choices","answer"} multiple choice: acc, acc_norm, acc_bytes
      JSONL {"text","choices","label"}     the same, text as the context
      JSONL {"text","label"}               accuracy of a sequence classifier's head

    The conventions are lm-evaluation-harness's: text is encoded without
    special tokens; each document is prefixed with BOS (else EOS), which is
    not scored, and every token of it is; perplexity = exp(mean NLL over all
    scored tokens of the file); documents longer than --max-length are
    scored in disjoint rolling windows. A choice is scored as the summed
    log-likelihood of " " + choice after the context (the split of
    context+choice's own tokens); acc_norm divides by the choice's length
    in characters, acc_bytes by its UTF-8 bytes.

    Nothing is downloaded and no remote code runs; only --json is written.

    \b
    Examples (from the repository root):
      wsmerge eval examples/models/base --tokenizer examples/eval/tokenizer --data examples/eval/val.txt
      wsmerge eval examples/models/ft_a --tokenizer examples/eval/tokenizer \\
          --data examples/eval/val.txt --data examples/eval/mc.jsonl --json runs/eval-ft_a.json
    """
    from weightspace.evaluate import Evaluator, read_data
    from weightspace.files import atomic_file, check_output_file

    if not data and lm_eval_tasks is None:
        raise click.UsageError("give --data FILE (repeatable) or --lm-eval TASKS")
    tasks = None
    if lm_eval_tasks is not None:
        from weightspace.evaluate.lmeval import parse_tasks
        from weightspace.extras import require

        tasks = parse_tasks(lm_eval_tasks)
        require("lm_eval", "lmeval", "--lm-eval needs the lm-eval package")   # before the model loads
    if json_out is not None:
        check_output_file(json_out, overwrite, inputs=[model, *data, *([tokenizer] if tokenizer else [])])
    files = [read_data(d, limit=limit) for d in data]          # every file checked before the model loads
    progress = not no_progress and sys.stderr.isatty()
    t0 = time.perf_counter()
    ev = Evaluator.open(model, tokenizer=tokenizer, device=device, batch_size=batch_size,
                        max_length=max_length, progress=progress)
    for f in files:
        ev.check(f)
    load_seconds = time.perf_counter() - t0
    results = [ev.run(f) for f in files]
    report = {"model": str(model), "device": str(ev.device),
              "dtype": str(next(ev.module.parameters()).dtype).replace("torch.", ""),
              "batch_size": batch_size, "max_length": ev.max_length, "limit": limit,
              "load_seconds": load_seconds, "results": results}
    if tasks is not None:
        from weightspace.evaluate.lmeval import run_lm_eval

        t1 = time.perf_counter()
        report["lm_eval"] = {"tasks": tasks, "results": run_lm_eval(ev, tasks, limit=limit),
                             "seconds": time.perf_counter() - t1}
    _print_table(report)
    if json_out is not None:
        with atomic_file(json_out) as tmp:
            tmp.write_text(json.dumps(report, indent=2, default=str) + "\n")
        click.echo(f"report: {json_out}")


def _print_table(report: dict) -> None:
    rows = []
    for r in report["results"]:
        for k, v in r["metrics"].items():
            if k in ("tokens", "documents"):
                continue
            speed = r["examples_per_second"]
            rows.append((Path(r["data"]).name, str(r["n"]), k, f"{v:.4f}", "" if speed is None else f"{speed:.1f}"))
    for task, metrics in (report.get("lm_eval") or {}).get("results", {}).items():
        for k, v in metrics.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                rows.append((task, "", k, f"{v:.4f}", ""))
    head = ("data", "n", "metric", "value", "examples/s")
    widths = [max(len(x) for x in col) for col in zip(head, *rows)]
    for row in (head, *rows):
        click.echo("  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))).rstrip())
