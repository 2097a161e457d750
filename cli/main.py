"""wsmerge: merge, inspect and generate neural-network weights.

Exit codes: 0 ok, 1 runtime failure, 2 bad spec or usage. Tracebacks are
shown only with -v or WSMERGE_DEBUG=1.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import click

from weightspace.cli.display import human_bytes
from weightspace.cli.mergekit_flags import MergekitFlags, mergekit_flags
from weightspace.cli.options import DEBUG_ENV, Group, Interrupted, device_option
from weightspace.errors import WeightspaceError


def _debug() -> bool:
    return os.environ.get(DEBUG_ENV, "") not in ("", "0")


class SizeType(click.ParamType):
    name = "size"

    def convert(self, value, param, ctx):
        from weightspace.sink import parse_size

        try:
            return parse_size(value)
        except WeightspaceError as e:
            self.fail(str(e), param, ctx)


@click.group(cls=Group)
@click.version_option(package_name="weightspace", prog_name="wsmerge")
def wsmerge() -> None:
    """Merge, inspect and generate neural-network weights.

    \b
    Start here (from the repository root; outputs go under runs/):
      wsmerge demo                                  tiny models merged 6 ways, in wsmerge-demo/
      wsmerge methods                               every merge method, its parameters and defaults
      wsmerge run examples/ties.yaml runs/ties      run a YAML merge spec (mergekit's schema)
      wsmerge run examples/ties.yaml --dry-run      the plan only: tensors, bytes, peak memory
      wsmerge inspect runs/ties --vs examples/models/base   structure, dtypes, cosine per tensor
      wsmerge upload runs/ties my-org/tiny-ties     push a result to the Hub (token: HF_TOKEN)

    More commands, each with examples in its --help: zoo (populations of small
    trained models), fisher and gram (statistics for data-aware merges), atlas
    (learned task-vector coefficients), align (permutation alignment), rws
    (robust weight signatures), learngene (genes that grow networks of any
    depth) and generate (weight generators).

    Exit codes: 0 ok, 1 runtime failure, 2 bad spec or usage, 130 interrupted.
    Pass -v after any command (or set WSMERGE_DEBUG=1) to see tracebacks.
    """


@wsmerge.command()
@click.argument("spec", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("out", type=click.Path(file_okay=False, path_type=Path), required=False)
@click.option("-o", "--out", "out_option", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="The output directory, as with every other command (the same as OUT; give either).")
@click.option("--dry-run", is_flag=True, help="Validate and print the plan; read no tensor data.")
@device_option
@click.option("--shard-size", type=SizeType(), default="5G", show_default=True,
              help="Largest output shard, in bytes or with K/M/G suffix (decimal; KiB/MiB/GiB binary).")
@click.option("--out-dtype", type=click.Choice(["float32", "float16", "bfloat16"]), default=None,
              help="Output dtype; overrides the spec's out_dtype/dtype.")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists (atomically, at the end).")
@click.option("--allow-nonfinite", is_flag=True, help="Write NaN/Inf results instead of refusing.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@click.option("--json", "as_json", is_flag=True, help="Print the plan or the run's stats as JSON.")
@click.option("--search", default=None, metavar="PARAM=VALUES",
              help="Try PARAM=v1,v2,... (or start:stop:count) on --data and keep the best: weight "
                   "(every model's), target_weight (first model v, others (1-v)/(n-1)) or a global "
                   "parameter.")
@click.option("--data", default=None, help="Validation data for --search (a zoo dataset reference or a "
                                           "JSONL file for transformers classifiers).")
@click.option("--split", type=click.Choice(["train", "val", "test"]), default="val", show_default=True,
              help="Split of a zoo dataset scored by --search.")
@click.option("--push-to-hub", "push_repo", default=None, metavar="ORG/NAME",
              help="After a successful merge, upload OUT to this Hub model repo (token: HF_TOKEN).")
@click.option("--private", is_flag=True, help="With --push-to-hub: create the repo as private.")
@click.option("--revision", default=None, help="With --push-to-hub: the branch to commit to.")
@click.option("--create-pr", is_flag=True, help="With --push-to-hub: open a pull request instead.")
@mergekit_flags
def run(spec: Path, out: Path | None, out_option: Path | None, dry_run: bool, device: str, shard_size: int,
        out_dtype: str | None, overwrite: bool, allow_nonfinite: bool, no_progress: bool,
        as_json: bool, search: str | None, data: str | None, split: str,
        push_repo: str | None = None, private: bool = False, revision: str | None = None,
        create_pr: bool = False) -> None:
    """Run the merge described by SPEC (YAML) and write a checkpoint to OUT.

    SPEC uses mergekit's schema (merge_method, base_model, models[].model,
    models[].parameters, parameters, dtype, out_dtype, tokenizer_source,
    slices). Models are local paths or Hub ids (org/name@revision); a path
    that exists on disk never touches the network.

    OUT becomes a directory that transformers' from_pretrained loads: sharded
    safetensors with an index, config.json, tokenizer files and a model card.
    It is written beside OUT and renamed into place only when complete.

    \b
    Examples (from the repository root):
      wsmerge run examples/ties.yaml runs/ties
      wsmerge run examples/ties.yaml -o runs/ties-sharded --shard-size 60K
      wsmerge run examples/ties.yaml --dry-run
      wsmerge run examples/fisher.yaml runs/fisher-best --search target_weight=0:1:5 --data digits
      wsmerge run examples/ties.yaml runs/ties-mk --out-shard-size 1B --no-copy-tokenizer --quiet

    mergekit-yaml's flags work too, with mergekit's meaning (--cuda, --out-shard-size
    with K/M/B = thousand/million/billion, --copy-tokenizer, --write-model-card,
    --random-seed, --allow-crimes, --quiet, -j); its memory and I/O flags
    (--lazy-unpickle, --low-cpu-memory, --read-to-gpu, --async-write, ...) are
    accepted and change nothing, since wsmerge always streams; --trust-remote-code
    is refused (no remote code ever runs).
    """
    from weightspace.merge import plan_merge, run_plan
    from weightspace.spec import load_spec

    ctx = click.get_current_context()
    mk = MergekitFlags.of(ctx)
    device, shard_size = _mergekit_device_and_shards(ctx, mk, device, shard_size)
    out = _one_out(out, out_option)
    if out is None and not dry_run:
        raise click.UsageError("missing OUT (the output directory: SPEC OUT or -o OUT); or pass --dry-run")
    if push_repo is None and (private or revision or create_pr):
        raise click.UsageError("--private, --revision and --create-pr need --push-to-hub")
    if push_repo is not None:
        if dry_run:
            raise click.UsageError("--push-to-hub cannot be combined with --dry-run")
        from weightspace.hub import check_push

        check_push(push_repo, revision=revision, create_pr=create_pr)  # before the merge, not after
    if out is not None and not dry_run:
        from weightspace.sink import check_output

        check_output(out, overwrite)
    s = load_spec(spec)
    searched = None
    if search is not None:
        from weightspace.zoo.search import parse_search, search_merge, with_value

        if dry_run:
            raise click.UsageError("--search merges every candidate; it cannot be combined with --dry-run")
        if data is None:
            raise click.UsageError("--search needs --data (the validation data that scores each candidate)")
        param, values = parse_search(search)
        searched = search_merge(s, param, values, data=data, split=split, spec_dir=spec.parent)
        if not as_json:
            for v, score in searched.scores.items():
                mark = "  <- best" if v == searched.best else ""
                click.echo(f"{param}={v:g}: accuracy {score:.4f} on {data} ({split}){mark}")
        s = with_value(s, param, searched.best)
    elif data is not None:
        raise click.UsageError("--data is only used with --search")
    s = _with_random_seed(s, mk.random_seed)
    plan = plan_merge(s, spec_dir=spec.parent, out_dtype=out_dtype, allow_crimes=mk.allow_crimes)
    summary = plan.summary(shard_size)
    if dry_run:
        if as_json:
            summary["steps"] = [
                {"name": st.name, "shape": None if st.shape is None else list(st.shape),
                 "dtype": str(st.dtype).replace("torch.", ""),
                 "read_bytes": st.read_bytes, "t": st.info.get("t")}
                for st in plan.steps
            ]
            click.echo(json.dumps(summary, indent=2))
            return
        _print_plan(summary, plan)
        return
    for n in plan.notes:  # e.g. a path found only relative to the working directory
        click.echo(f"note: {n}", err=True)
    progress = not no_progress and not mk.quiet and sys.stderr.isatty()
    t0 = time.perf_counter()
    stats = run_plan(plan, out, device=device, shard_size=shard_size, overwrite=overwrite,
                     allow_nonfinite=allow_nonfinite, progress=progress,
                     copy_tokenizer=mk.copy_tokenizer, write_card=mk.write_model_card)
    dt = time.perf_counter() - t0
    if as_json:
        extra = {} if searched is None else {"search": {"param": searched.param, "best": searched.best,
                                                        "scores": {str(k): v for k, v in searched.scores.items()}}}
        pushed = {} if push_repo is None else {"hub_url": _push(out, push_repo, private, revision, create_pr)}
        click.echo(json.dumps({**summary, **stats, "wall_seconds": dt, **extra, **pushed}, indent=2))
        return
    if not mk.quiet:
        click.echo(
            f"{plan.method.name}: {summary['tensors']} tensors, {summary['parameters']:,} parameters, "
            f"read {human_bytes(stats['read_bytes'])}, wrote {human_bytes(stats['written_bytes'])} "
            f"in {stats['shards']} shard(s) to {out} in {dt:.2f} s"
        )
    if push_repo is not None:
        url = _push(out, push_repo, private, revision, create_pr)
        click.echo(f"{'opened pull request' if create_pr else 'pushed'} {out} to {push_repo}: {url}")


def _mergekit_device_and_shards(ctx: click.Context, mk: MergekitFlags, device: str,
                                shard_size: int) -> tuple[str, int]:
    """--cuda and --out-shard-size (mergekit's spellings) in place of --device and --shard-size;
    giving both spellings of one setting is a usage error. Also -j and --transformers-cache."""
    given = {p: ctx.get_parameter_source(p) == click.core.ParameterSource.COMMANDLINE
             for p in ("device", "shard_size")}
    if mk.cuda is not None:
        if given["device"]:
            raise click.UsageError("give --device or mergekit's --cuda/--no-cuda, not both")
        from weightspace.executor import resolve_device

        device = str(resolve_device("cuda" if mk.cuda else "cpu"))
    if mk.out_shard_size is not None:
        if given["shard_size"]:
            raise click.UsageError("give --shard-size or mergekit's --out-shard-size, not both")
        shard_size = mk.out_shard_size
    if mk.num_threads is not None:
        import torch

        torch.set_num_threads(mk.num_threads)
    if mk.transformers_cache is not None:
        os.environ["HF_HUB_CACHE"] = mk.transformers_cache
    return device, shard_size


def _with_random_seed(spec, seed: int | None):
    """mergekit's --random-seed as the spec's `seed` parameter (DARE and DELLA read it); the
    other methods draw nothing, so for them it changes nothing, as in mergekit."""
    from weightspace.methods import get_method

    if seed is None or not get_method(spec.merge_method).randomized:
        return spec
    if "seed" in (spec.parameters or {}):
        raise click.UsageError(f"the spec sets parameters.seed ({spec.parameters['seed']}); "
                               f"drop it or --random-seed")
    from weightspace.zoo.search import with_value

    return with_value(spec, "seed", seed)


def _one_out(argument: Path | None, option: Path | None) -> Path | None:
    """`run SPEC OUT` and `run SPEC -o OUT` are the same; both naming different places is an error."""
    if argument is not None and option is not None and os.path.abspath(argument) != os.path.abspath(option):
        raise click.UsageError(f"OUT {argument} and -o/--out {option} name different directories; "
                               f"give the output once")
    return argument if argument is not None else option


def _push(out: Path, repo: str, private: bool, revision: str | None, create_pr: bool) -> str:
    from weightspace.hub import push_to_hub

    return push_to_hub(out, repo, private=private, revision=revision, create_pr=create_pr)


def _print_plan(summary: dict, plan) -> None:
    click.echo(f"merge_method   {summary['merge_method']}")
    if summary["base_model"]:
        click.echo(f"base_model     {summary['base_model']}")
    click.echo(f"models         {', '.join(summary['models'])}")
    click.echo(f"tensors        {summary['tensors']} ({summary['parameters']:,} parameters)")
    if summary["num_layers"]:
        click.echo(f"layers         {summary['num_layers']}")
    click.echo(f"compute dtype  {summary['compute_dtype']}; output dtypes {summary['out_dtypes']}")
    click.echo(f"will read      {human_bytes(summary['read_bytes'])}")
    click.echo(f"will write     {human_bytes(summary['write_bytes'])} in {summary['shards']} shard(s)")
    click.echo(f"peak memory    about {human_bytes(summary['estimated_peak_tensor_bytes'])} of tensors "
               f"(plus the Python/torch runtime, ~0.3-0.5 GiB)")
    for n in summary["notes"]:
        click.echo(f"note           {n}")
    if _debug():
        for st in plan.steps:
            dt = str(st.dtype).replace("torch.", "")
            shape = "statistics pass" if st.shape is None else list(st.shape)
            click.echo(f"  {st.name}  {shape} {dt}  t={st.info.get('t', 0):.3f}")


@wsmerge.command()
@click.argument("model")
@click.option("--vs", "other", default=None, help="Compare with this model, tensor by tensor.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--top", default=10, show_default=True, help="With --vs: list the N most-changed tensors.")
@click.option("--plot", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="aTLAS coefficient files: write the heat map (task vector x block).")
def inspect(model: str, other: str | None, as_json: bool, top: int, plot: Path | None) -> None:
    """Describe MODEL: parameters, dtypes, shards, layer structure.

    With --vs OTHER, also per-tensor cosine similarity and relative
    difference ||a-b||/||a|| (streamed; one tensor pair in memory at a time).

    \b
    Examples (from the repository root):
      wsmerge inspect examples/models/base
      wsmerge inspect runs/ties --vs examples/models/base
      wsmerge inspect examples/digits/atlas.coeffs.safetensors --plot runs/atlas-coeffs.png
    """
    from weightspace.inspect import compare, summarize
    from weightspace.sources import load_space

    if model.endswith(".safetensors") and Path(model).is_file():
        from weightspace.merges.atlas import is_coefficients_file

        if is_coefficients_file(model):            # aTLAS coefficients: a table and a heat map
            from weightspace.cli.atlas import show

            click.get_current_context().invoke(show, coefficients=Path(model), plot=plot, as_json=as_json)
            return
    if plot is not None:
        raise click.UsageError("--plot draws aTLAS coefficient files; MODEL is not one")

    a = load_space(model)
    info = summarize(a)
    cmp = compare(a, load_space(other)) if other else None
    if as_json:
        click.echo(json.dumps({"model": info, "comparison": cmp}, indent=2))
        return
    click.echo(f"{info['source']}  ({info['format']}{', ' + info['model_type'] if info['model_type'] else ''})")
    click.echo(f"  tensors     {info['tensors']}")
    click.echo(f"  parameters  {info['parameters']:,} ({human_bytes(info['bytes'])})")
    click.echo("  dtypes      " + ", ".join(f"{k}: {v:,}" for k, v in info["dtypes"].items()))
    if info["files"]:
        click.echo(f"  files       {len(info['files'])}: " + ", ".join(
            f"{f['name']} ({human_bytes(f['bytes'])})" for f in info["files"][:6])
            + (" ..." if len(info["files"]) > 6 else ""))
    stacks = ", ".join(f"{p}.N x {n}" for p, n in info["layer_stacks"].items()) or "none"
    click.echo(f"  layers      {stacks}")
    click.echo(f"  non-layer   {len(info['non_layer_tensors'])} tensors")
    if cmp is None:
        return
    click.echo(f"\nvs {cmp['b']}")
    click.echo(f"  overall relative diff  {cmp['overall_rel_diff']:.6g}")
    if cmp["min_cosine"] is not None:
        click.echo(f"  min cosine             {cmp['min_cosine']:.6f}")
    for key, label in (("only_in_a", "only in MODEL"), ("only_in_b", "only in OTHER")):
        if cmp[key]:
            click.echo(f"  {label}: {len(cmp[key])} tensors, e.g. {cmp[key][0]}")
    for m in cmp["shape_mismatch"][:5]:
        click.echo(f"  shape mismatch {m['name']}: {m['shape_a']} vs {m['shape_b']}")
    rows = sorted(cmp["tensors"], key=lambda r: -r["rel_diff"])[:top]
    if rows:
        w = max(len(r["name"]) for r in rows)
        click.echo(f"\n  {'tensor':<{w}}  {'cosine':>9}  {'rel diff':>10}")
        for r in rows:
            click.echo(f"  {r['name']:<{w}}  {r['cosine']:>9.5f}  {r['rel_diff']:>10.4g}")


@wsmerge.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.argument("name", required=False)
def methods(as_json: bool, name: str | None) -> None:
    """List every merge method with its parameters and defaults (or one, by NAME).

    \b
    Examples:
      wsmerge methods
      wsmerge methods ties
    """
    from weightspace.methods import all_methods, get_method

    ms = {name: get_method(name)} if name else all_methods()

    def pinfo(p) -> dict:
        return {"name": p.name, "type": p.kind.__name__, "default": p.default,
                "required": p.required and p.default is None, "range": p.range_text() or None,
                "doc": p.doc}

    data = [
        {"name": m.name, "pretty_name": m.pretty_name, "paper": m.paper, "url": m.reference_url,
         "base_model": m.uses_base, "models": [m.min_models, m.max_models],
         "global_parameters": [pinfo(p) for p in m.all_global_params()],
         "model_parameters": [pinfo(p) for p in m.model_params],
         "companions": list(m.companions)}
        for m in ms.values()
    ]
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    for d in data:
        base = {"required": "base model required", "optional": "base model optional",
                "none": "no base model"}[d["base_model"]]
        lo, hi = d["models"]
        count = f"{lo}+" if hi is None else (str(lo) if lo == hi else f"{lo}-{hi}")
        click.echo(f"{d['name']}  -  {d['pretty_name'] or d['name']} ({base}; {count} model(s))")
        if d["paper"]:
            click.echo(f"    {d['paper']}" + (f"  {d['url']}" if d["url"] else ""))
        for kind in ("global_parameters", "model_parameters"):
            for p in d[kind]:
                where = "global" if kind == "global_parameters" else "per model"
                req = "required" if p["required"] else f"default {p['default']!r}"
                allowed = f"; {p['range']}" if p["range"] else ""
                doc = f"  {p['doc']}" if p["doc"] else ""
                click.echo(f"    {p['name']:<18} {p['type']:<5} {where:<9} {req}{allowed}{doc}")
        click.echo("")


@wsmerge.command()
@click.argument("out", type=click.Path(file_okay=False, path_type=Path), default="wsmerge-demo")
@device_option
@click.option("--overwrite", is_flag=True, help="Replace OUT even if `wsmerge demo` did not write it.")
def demo(out: Path, device: str, overwrite: bool) -> None:
    """Build tiny checkpoints and merge them with several methods; needs no downloads.

    Writes a base model and three "fine-tunes" (base + seeded deltas) to
    OUT/models, merges them with linear, task_arithmetic, ties, dare_ties,
    slerp and model_stock into OUT/merges (specs in OUT/specs), and prints
    how far each merge lands from its inputs. A second run replaces the
    demo's own earlier output; any other existing OUT needs --overwrite.

    \b
    Examples:
      wsmerge demo
      wsmerge demo runs/demo --device cpu
    """
    from weightspace.cli.demo import run_demo

    run_demo(out, device=device, overwrite=overwrite, echo=click.echo)


from weightspace.cli.align import align  # noqa: E402

wsmerge.add_command(align)
from weightspace.cli.zoo import zoo  # noqa: E402

wsmerge.add_command(zoo)
from weightspace.cli.stats import fisher, gram  # noqa: E402

wsmerge.add_command(fisher)
wsmerge.add_command(gram)
from weightspace.cli.atlas import atlas  # noqa: E402

wsmerge.add_command(atlas)
from weightspace.cli.rws import rws  # noqa: E402

wsmerge.add_command(rws)
from weightspace.cli.learngene import learngene  # noqa: E402

wsmerge.add_command(learngene)
from weightspace.cli.generate import generate  # noqa: E402

wsmerge.add_command(generate)
from weightspace.cli.hub import upload  # noqa: E402

wsmerge.add_command(upload)


def show_click_error(e: click.ClickException) -> None:
    """Click's own errors in our style: its usage line and hint, then `error: ...` like every other error."""
    if isinstance(e, click.exceptions.NoArgsIsHelpError):  # `wsmerge zoo` alone: the help, not an error
        e.show()
        return
    ctx = getattr(e, "ctx", None)
    if isinstance(e, click.UsageError) and ctx is not None:
        hint = ""
        if ctx.command.get_help_option(ctx) is not None:
            names = ctx.command.get_help_option_names(ctx)
            hint = f"Try '{ctx.command_path} {max(names, key=len)}' for help.\n"
        click.echo(f"{ctx.get_usage()}\n{hint}", err=True, color=ctx.color)
    click.echo(f"error: {e.format_message()}", err=True)


def main(argv: list[str] | None = None) -> int:
    """Entry point with our exit codes and error style."""

    def _term(signum, frame):  # turn SIGTERM into a clean, atomic abort
        raise KeyboardInterrupt

    old_debug = os.environ.get(DEBUG_ENV)
    try:
        old_term = signal.signal(signal.SIGTERM, _term)
    except ValueError:  # not the main thread (tests)
        old_term = None
    try:
        # standalone_mode=False: click returns the code of a `ctx.exit(code)` / Exit(code) instead of
        # exiting, and the command's return value (None) otherwise
        rv = wsmerge.main(args=argv, prog_name="wsmerge", standalone_mode=False)
        return rv if isinstance(rv, int) and not isinstance(rv, bool) else 0
    except click.exceptions.Exit as e:
        return e.exit_code
    except click.ClickException as e:
        show_click_error(e)
        return e.exit_code
    except Interrupted as e:
        click.echo(e.message, err=True)
        return e.exit_code
    except (click.exceptions.Abort, KeyboardInterrupt):
        click.echo("interrupted; nothing was written", err=True)
        return Interrupted.exit_code
    except WeightspaceError as e:
        if _debug():
            import traceback

            traceback.print_exc()
        click.echo(f"error: {e}", err=True)
        return e.exit_code
    except Exception as e:  # noqa: BLE001 - last resort, keep the one-line style
        if _debug():
            import traceback

            traceback.print_exc()
        click.echo(f"error: {type(e).__name__}: {e} (set {DEBUG_ENV}=1 for a traceback)", err=True)
        return 1
    finally:
        if old_term is not None:
            signal.signal(signal.SIGTERM, old_term)
        if old_debug is None:
            os.environ.pop(DEBUG_ENV, None)
        else:
            os.environ[DEBUG_ENV] = old_debug


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry()
