"""`wsmerge evolve`: evolutionary search over a merge spec's values (weightspace.zoo.evolve).

    wsmerge evolve examples/evolve_digits.yaml -o runs/evolve --budget 48
    wsmerge evolve show runs/evolve --plot runs/evolve.png
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from weightspace.cli.options import Command, Group, Interrupted, check_plot


class _EvolveGroup(Group):
    """`wsmerge evolve SPEC ...` runs the search: a first argument that is not a subcommand
    (nor an option such as --help) is the search's SPEC."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and not args[0].startswith("-"):
            args = ["search", *args]
        return super().parse_args(ctx, args)


@click.group(cls=_EvolveGroup)
def evolve() -> None:
    """Evolutionary merge search: CMA-ES (or random search) over a merge spec's values.

    SPEC is a merge spec with {search: [lo, hi]} in place of values (also
    per layer group: a gradient of searched points, or a filter's value),
    merge_method: {choice: [...]} to search the method too, a `search:` block
    (optimizer cma|random, popsize, sigma, seed) and an `evaluation:` block (a
    zoo dataset with the split searched and the test split reported at the
    end, or a .txt/.jsonl file for the language-model evaluator). Each
    candidate is merged by the streaming executor into a temporary directory,
    scored, and removed; candidates run in parallel as Ray tasks (a local
    instance, or a cluster with --address) or local processes.

    \b
    Examples (from the repository root):
      wsmerge evolve examples/evolve_digits.yaml -o runs/evolve --budget 16 --executor local --workers 1
      wsmerge evolve show runs/evolve
      wsmerge run runs/evolve/best.yaml runs/evolve-best

    On a Ray cluster: wsmerge evolve SPEC -o DIR --budget 200 --address ray://HOST:10001
    (every node must see the models and data at the paths SPEC gives).
    """


@evolve.command("search")
@click.argument("spec", type=click.Path(dir_okay=False, path_type=Path))
@click.option("-o", "--out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="The search's directory: candidates.parquet, best.yaml, result.json, ...")
@click.option("--budget", type=int, default=None,
              help="Candidates to evaluate (failed ones count); default the spec's search.budget.")
@click.option("--workers", type=int, default=None,
              help="Candidates evaluated at once, one thread each (default: the cores of this "
                   "machine; on a cluster, its CPUs).")
@click.option("--executor", type=click.Choice(["auto", "ray", "local"]), default="auto", show_default=True,
              help="auto: Ray when installed, else local processes; one local worker runs in this process.")
@click.option("--address", default=None, metavar="ADDRESS",
              help="A Ray cluster to run the candidates on (ray://HOST:10001, or auto).")
@click.option("--seed", type=int, default=None, help="The optimiser's seed (default the spec's search.seed).")
@click.option("--resume", is_flag=True,
              help="Continue the search already in OUT (same spec and seed): logged candidates are "
                   "replayed, the missing ones evaluated; a larger --budget extends it.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@click.option("--json", "as_json", is_flag=True, help="Print result.json.")
def search(spec: Path, out: Path, budget: int | None, workers: int | None, executor: str,
           address: str | None, seed: int | None, resume: bool, no_progress: bool, as_json: bool) -> None:
    """Search SPEC's values and write the search to OUT (see `wsmerge evolve --help`).

    OUT gets candidates.parquet (every candidate: its values, score, seconds,
    error), best.yaml (rewritten atomically whenever the best improves; an
    ordinary merge spec), optimizer.json and, at the end, result.json with the
    winner's validation and test scores. A killed search continues with --resume.

    \b
    Examples (from the repository root):
      wsmerge evolve examples/evolve_digits.yaml -o runs/evolve-random --budget 8 --seed 1 --executor local --workers 1
      wsmerge evolve examples/evolve_digits.yaml -o runs/evolve-random --budget 16 --seed 1 --executor local --workers 1 --resume
    """
    from weightspace.zoo.evolve import load_search_spec, run_search
    from weightspace.zoo.executors import available_cores

    s = load_search_spec(spec)
    if workers is None:
        workers = available_cores()
    echo = None if as_json else (lambda m: click.echo(m, err=True))
    try:
        result = run_search(s, out, budget=budget, workers=workers, executor=executor, address=address,
                            seed=seed, resume=resume, progress=not no_progress and sys.stderr.isatty(),
                            echo=echo)
    except KeyboardInterrupt:
        raise Interrupted(f"interrupted; the candidates evaluated so far are in {out}: continue with "
                          f"`wsmerge evolve {spec} -o {out} --resume`") from None
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    best = result["best"]
    if best is None:
        click.echo(f"{result['candidates']} candidates, all failed; see `wsmerge evolve show {out}`")
        return
    test = f", test {result['test']['value']:.4f}" if result["test"] else ""
    click.echo(f"{result['candidates']} candidates ({result['failed']} failed) in "
               f"{result['search_seconds']:.1f} s on {result['workers']} {result['executor']} worker(s); "
               f"best: candidate {best['index']}, {result['metric']} {best['value']:.4f}{test}; "
               f"spec in {out / 'best.yaml'}")


@evolve.command("show", cls=Command)
@click.argument("directory", type=click.Path(file_okay=False, exists=True, path_type=Path))
@click.option("--plot", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Draw every candidate's score and the best so far (needs the plot extra).")
@click.option("--top", type=click.IntRange(1, 1000), default=5, show_default=True, help="Candidates listed.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def show(directory: Path, plot: Path | None, top: int, as_json: bool) -> None:
    """What a search found: the best so far, the top candidates, the history, the winning spec.

    \b
    Examples (from the repository root):
      wsmerge evolve show runs/evolve-random --top 3
      wsmerge evolve show runs/evolve-random --plot runs/evolve-random.png
    """
    from weightspace.zoo.evolve.show import format_summary, plot_history, summarize

    check_plot(plot)
    if plot is not None:
        from weightspace.files import check_output_file
        from weightspace.zoo.evolve.log import BEST, LOG, OPTIMIZER, PARQUET, RESULT, STATE

        check_output_file(plot, True, inputs=[directory / n for n in (BEST, LOG, OPTIMIZER, PARQUET,
                                                                       RESULT, STATE)])
    info = summarize(directory, top=top)
    if plot is not None:
        plot_history(info, plot)
    if as_json:
        click.echo(json.dumps({k: v for k, v in info.items() if k not in ("values", "history")}, indent=2))
        return
    click.echo(format_summary(info))
    if plot is not None:
        click.echo(f"plot: {plot}")
