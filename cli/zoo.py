"""`wsmerge zoo ...`: build model zoos, compute their landscape metrics, show them."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from weightspace.cli.options import Group, Interrupted, check_plot

# catalog columns that are never "config that varies"
_NOT_CONFIG = {"checkpoints", "betas"}
_METRIC_COLUMNS = ("train_loss", "train_acc", "val_acc", "test_acc", "gap", "hessian_top_eig",
                   "hessian_trace", "mc_linear", "mc_bezier", "cka")


@click.group(cls=Group)
def zoo() -> None:
    """Populations of small trained models: build, measure, show.

    \b
    Examples (from the repository root):
      wsmerge zoo build examples/zoo/digits-phases.yaml -o runs/zoo --dry-run   count, train nothing
      wsmerge zoo build examples/zoo/digits-phases.yaml -o runs/zoo    train the grid (resumable)
      wsmerge zoo build examples/zoo/digits-phases.yaml -o runs/zoo --executor ray   the same on Ray
      wsmerge zoo metrics runs/zoo                     landscape metrics it lacks
      wsmerge zoo show runs/zoo --plot runs/phases.png     table and phase diagram
      wsmerge zoo datasets                             dataset references

    A zoo is a directory: catalog.parquet (one row per checkpoint; read it
    with pandas or duckdb) and models/<id>/epoch-NNNN/ checkpoints that every
    wsmerge command reads.
    """


@zoo.command()
@click.argument("spec", type=click.Path(dir_okay=False, path_type=Path))
@click.option("-o", "--out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="The zoo directory (created, or resumed if it exists).")
@click.option("--executor", type=click.Choice(["local", "ray"]), default="local", show_default=True,
              help="local: a process pool on this machine; ray: Ray tasks (local Ray without --address).")
@click.option("--workers", type=click.IntRange(min=1), default=None,
              help="Processes (local) or CPUs (local Ray). Default: all cores.")
@click.option("--address", default=None, help="Ray cluster address (with --executor ray).")
@click.option("--yes", is_flag=True, help="Build even if the grid has more than 1000 models.")
@click.option("--max-batch", type=click.IntRange(min=1), default=64, show_default=True,
              help="Most models trained together in one vmapped computation.")
@click.option("--dry-run", is_flag=True, help="Count the models and the ones already built; train nothing.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@click.option("--json", "as_json", is_flag=True, help="Print the build report as JSON.")
def build(spec: Path, out: Path, executor: str, workers: int | None, address: str | None, yes: bool,
          max_batch: int, dry_run: bool, no_progress: bool, as_json: bool) -> None:
    """Train every model of SPEC's grid that the zoo at OUT does not have yet.

    Models that share an architecture and a batch size train together as one
    batched computation (torch.func vmap). Each finished model is written
    atomically with its catalog rows, so an interrupted build (Ctrl-C, SIGTERM:
    exit code 130) resumes where it stopped: run the same command again.

    \b
    Example:
      wsmerge zoo build examples/zoo/digits-tasks.yaml -o runs/zoo-tasks --workers 2
    """
    from weightspace.errors import SpecError
    from weightspace.spec import read_yaml_file
    from weightspace.zoo.build import build_zoo
    from weightspace.zoo.spec import LARGE_ZOO, MAX_MODELS, parse_zoo_spec
    from weightspace.zoo.store import Zoo, is_zoo

    if address and executor != "ray":
        raise click.UsageError("--address needs --executor ray")
    text = read_yaml_file(spec, "zoo spec")
    # the grid is counted from its axes before it is expanded: above LARGE_ZOO only with --yes
    # (a dry run reports it), never above MAX_MODELS
    s = parse_zoo_spec(text, source=str(spec), folder=spec.parent,
                       max_models=MAX_MODELS if yes or dry_run else LARGE_ZOO)
    for n in s.notes:
        click.echo(f"note: {n}", err=True)
    from weightspace.files import check_disjoint

    # a zoo adds to OUT and never replaces it, but OUT may not be or hold a model it starts from
    check_disjoint(out, [v for v in (s.init, *s.grid.get("init", ())) if isinstance(v, str)])
    if dry_run:
        runs = s.runs()
        have = Zoo(out).model_ids if is_zoo(out) else set()
        todo = sum(r.model_id not in have for r in runs)
        info = {"models": len(runs), "built": len(runs) - todo, "to_train": todo,
                "checkpoints_per_model": len(runs[0].train.checkpoint_epochs), "axes": list(s.grid)}
        if len(runs) > LARGE_ZOO and not yes:
            info["needs_yes"] = True
        click.echo(json.dumps(info, indent=2) if as_json else
                   f"{s.name}: {len(runs)} models over axes {', '.join(s.grid) or '(none)'}; "
                   f"{info['built']} built, {todo} to train")
        return
    progress = not no_progress and sys.stderr.isatty()
    try:
        report = build_zoo(s, out, spec_text=text, executor=executor, workers=workers, address=address,
                           yes=yes, max_batch=max_batch, progress=progress)
    except KeyboardInterrupt:
        n = len(Zoo(out).model_ids) if is_zoo(out) else 0
        raise Interrupted(f"interrupted: {n} model{'' if n == 1 else 's'} {'is' if n == 1 else 'are'} saved "
                          f"in {out}; run the same command to resume") from None
    except SpecError as e:
        raise SpecError(f"{spec}: {e}") from None
    info = {"zoo": str(out), "models": report.total, "trained": report.trained, "skipped": report.skipped,
            "adopted": len(report.adopted), "retrained_missing": report.retrained_missing,
            "seconds": round(report.seconds, 2), "models_per_minute": round(report.models_per_minute, 1)}
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    line = f"{out}: {report.total} models; trained {report.trained}, already built {report.skipped}"
    if report.adopted:
        line += f", recovered {len(report.adopted)} from an interrupted build"
    if report.retrained_missing:
        line += f", retrained {report.retrained_missing} whose weights were missing"
    if report.trained:
        line += f" ({report.seconds:.1f} s, {report.models_per_minute:.1f} models/min)"
    click.echo(line)


@zoo.command()
@click.argument("zoo_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--checkpoints", type=click.Choice(["last", "all"]), default=None,
              help="Which checkpoints get metrics (default: the spec's metrics.checkpoints, else last).")
@click.option("--executor", type=click.Choice(["local", "ray"]), default="local", show_default=True)
@click.option("--workers", type=click.IntRange(min=1), default=None, help="Processes. Default: all cores.")
@click.option("--address", default=None, help="Ray cluster address (with --executor ray).")
@click.option("--no-pairs", is_flag=True, help="Skip mode connectivity and CKA between seeds.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
def metrics(zoo_dir: Path, checkpoints: str | None, executor: str, workers: int | None,
            address: str | None, no_pairs: bool, no_progress: bool) -> None:
    """Landscape metrics for every checkpoint of ZOO_DIR that lacks them.

    Per model: train/test loss and accuracy, generalization gap, Hessian top
    eigenvalue (power iteration on Hessian-vector products) and trace
    (Hutchinson). Per pair of seeds of one config: mode connectivity mc on
    the linear path and on a fitted Bezier curve, and CKA of their logits.
    Settings come from the spec's `metrics:` section (zoo.yaml). Each
    checkpoint's metrics are saved in the catalog as they arrive, so an
    interrupted run (exit code 130) resumes: run the same command again.

    \b
    Example:
      wsmerge zoo metrics runs/zoo --checkpoints all --no-pairs
    """
    from weightspace.zoo.survey import compute_metrics

    progress = not no_progress and sys.stderr.isatty()
    try:
        done = compute_metrics(zoo_dir, checkpoints=checkpoints, executor=executor, workers=workers,
                               address=address, pairs=not no_pairs, progress=progress)
    except KeyboardInterrupt:
        n = _with_metrics(zoo_dir)
        raise Interrupted(f"interrupted: {n} checkpoint(s) of {zoo_dir} have their metrics saved; "
                          f"run the same command to compute the rest") from None
    click.echo(f"{zoo_dir}: metrics for {done} checkpoint(s)" if done else
               f"{zoo_dir}: every checkpoint already has its metrics")


def _with_metrics(zoo_dir: Path) -> int:
    """Checkpoints whose landscape metrics are in the catalog (0 if it cannot be read)."""
    from weightspace.errors import WeightspaceError
    from weightspace.zoo.store import Zoo
    from weightspace.zoo.survey import DONE_COLUMN

    try:
        return sum(r.get(DONE_COLUMN) is not None for r in Zoo(zoo_dir).rows)
    except WeightspaceError:
        return 0


def varying_columns(rows: list[dict[str, Any]]) -> list[str]:
    """Config columns whose value differs between rows (the zoo's grid axes)."""
    from weightspace.zoo.arch import ARCHITECTURES
    from weightspace.zoo.train import TrainConfig

    config = {"dataset", "arch", "seed", *TrainConfig.model_fields,
              *(k for knobs in ARCHITECTURES.values() for k in knobs)}
    if not rows:
        return []
    cols = []
    for c in rows[0]:
        if c not in config or c in _NOT_CONFIG:
            continue
        values = {json.dumps(r.get(c), sort_keys=True) for r in rows}
        if len(values) > 1:
            cols.append(c)
    return cols


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


@zoo.command()
@click.argument("zoo_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--all", "all_checkpoints", is_flag=True, help="Every checkpoint, not only each model's last.")
@click.option("--plot", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write a phase diagram (PNG/PDF/SVG) of the metrics over --x and --y.")
@click.option("--x", "x_axis", default="batch_size", show_default=True, help="Temperature-like axis.")
@click.option("--y", "y_axis", default="width", show_default=True, help="Load-like axis.")
@click.option("--fit-loss", type=float, default=0.05, show_default=True,
              help="Train loss below which a cell counts as fitting the data.")
@click.option("--mc-eps", type=float, default=0.05, show_default=True,
              help="mc above -eps counts as mode-connected.")
@click.option("--cka-threshold", type=float, default=0.9, show_default=True, help="Phase IV-A below, IV-B above.")
@click.option("--json", "as_json", is_flag=True, help="Rows (and phase cells) as JSON.")
def show(zoo_dir: Path, all_checkpoints: bool, plot: Path | None, x_axis: str, y_axis: str,
         fit_loss: float, mc_eps: float, cka_threshold: float, as_json: bool) -> None:
    """A table of ZOO_DIR's models; with --plot, a phase diagram (width x batch size).

    The diagram averages each metric over the other axes (seeds included) per
    cell and labels the cell with the phases of Yang et al. (2021): I/II
    underfit (poorly/well connected), III fit but poorly connected, IV-A/IV-B
    fit and connected (low/high CKA). Run `wsmerge zoo metrics` first for
    Hessian, mc and CKA panels.

    \b
    Example:
      wsmerge zoo show runs/zoo --all --json
    """
    check_plot(plot)
    from weightspace.errors import InputError
    from weightspace.zoo.phases import PhaseRules, phase_grid, plot_phases
    from weightspace.zoo.store import Zoo

    z = Zoo(zoo_dir)
    z.check_weights()
    rows = z.rows if all_checkpoints else z.final_rows()
    rows = sorted(rows, key=lambda r: (r["model_id"], r["epoch"]))
    axes = varying_columns(rows)
    metric_cols = [c for c in _METRIC_COLUMNS if any(r.get(c) is not None for r in rows)]
    grid = None
    if plot is not None or as_json:
        try:
            grid = phase_grid(rows, x=x_axis, y=y_axis, rules=PhaseRules(fit_loss, mc_eps, cka_threshold))
        except InputError:
            if plot is not None:       # --json alone still prints the rows of a zoo without these axes
                raise
    if as_json:
        out: dict[str, Any] = {"rows": [{k: r.get(k) for k in ["model_id", "epoch", *axes, *metric_cols]}
                                        for r in rows]}
        if grid is not None:
            out["phases"] = [{grid["y"]: y, grid["x"]: x, **c} for (y, x), c in grid["cells"].items()]
        click.echo(json.dumps(out, indent=2))
    else:
        header = ["model_id", "epoch", *axes, *metric_cols]
        table = [header] + [[_fmt(r.get(c)) for c in header] for r in rows]
        widths = [max(len(row[i]) for row in table) for i in range(len(header))]
        for row in table:
            click.echo("  ".join(v.rjust(w) for v, w in zip(row, widths)))
        click.echo(f"{len(rows)} checkpoint(s) of {len({r['model_id'] for r in rows})} model(s) in {zoo_dir}")
    if plot is not None:
        plot_phases(grid, plot, title=f"{zoo_dir}")
        click.echo(f"phase diagram: {plot}", err=as_json)


@zoo.command()
@click.argument("zoo_dir", type=click.Path(file_okay=False, path_type=Path))
@click.argument("where", nargs=-1, metavar="[COLUMN=VALUE]...")
@click.option("--epoch", type=click.IntRange(min=0), default=None,
              help="That epoch's checkpoint instead of each model's last.")
@click.option("--one", is_flag=True, help="Exactly one model must match (else exit 1).")
@click.option("--json", "as_json", is_flag=True, help="The matching catalog rows as JSON.")
def find(zoo_dir: Path, where: tuple[str, ...], epoch: int | None, one: bool, as_json: bool) -> None:
    """Print the checkpoint directory of every model whose catalog columns match.

    COLUMN=VALUE pairs name catalog columns (grid axes such as width, batch_size,
    seed, dataset, or any other column of `zoo show --all --json`); a model
    matches when every pair does. Use it to name a zoo model without its id,
    e.g. in a shell: A=$(wsmerge zoo find runs/zoo width=64 seed=0 --one).

    \b
    Example:
      wsmerge zoo find runs/zoo width=64 batch_size=8 seed=0 --one
    """
    from weightspace.errors import InputError
    from weightspace.yaml_io import safe_load
    from weightspace.zoo.store import Zoo

    pairs = {}
    for item in where:
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise click.UsageError(f"{item!r}: give COLUMN=VALUE, e.g. width=64")
        pairs[key] = safe_load(value, source=repr(item))
    z = Zoo(zoo_dir)
    rows = z.find(pairs, epoch=epoch)
    wanted = " ".join(where) or "(any)"
    if not rows:
        raise InputError(f"{zoo_dir}: no {'checkpoint' if epoch is None else f'epoch-{epoch} checkpoint'} "
                         f"matches {wanted}")
    if one and len(rows) > 1:
        raise InputError(f"{zoo_dir}: {len(rows)} models match {wanted} (ids "
                         f"{', '.join(r['model_id'] for r in rows[:5])}{' ...' if len(rows) > 5 else ''}); "
                         f"add COLUMN=VALUE pairs until one does")
    if as_json:
        click.echo(json.dumps([{**r, "checkpoint": str(z.checkpoint_dir(r))} for r in rows], indent=2,
                              default=str))
        return
    for r in rows:
        click.echo(z.checkpoint_dir(r))


@zoo.command()
def datasets() -> None:
    """Dataset references a spec or --data can name (bases, transforms, corruptions).

    \b
    Example:
      wsmerge zoo datasets
    """
    from weightspace.zoo import data

    describe = getattr(data, "describe", None)
    rows = describe() if describe is not None else [(n, "base", "") for n in data.BASES]
    width = max(len(r[0]) for r in rows)
    for name, kind, help_ in rows:
        click.echo(f"{name.ljust(width)}  {kind:<10}  {help_}")
