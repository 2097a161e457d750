"""`wsmerge run`: run a YAML merge spec (mergekit's schema) and write the checkpoint.

    wsmerge run examples/ties.yaml runs/ties
    wsmerge run examples/ties.yaml --dry-run          # the plan only; no tensor is read

mergekit-yaml's flags (weightspace.cli.mergekit_flags) work too, with mergekit's meaning.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import click

from weightspace.cli.display import human_bytes
from weightspace.cli.mergekit_flags import MergekitFlags, mergekit_flags
from weightspace.cli.options import DEBUG_ENV, Command, device_option
from weightspace.errors import WeightspaceError


class SizeType(click.ParamType):
    name = "size"

    def convert(self, value, param, ctx):
        from weightspace.sink import parse_size

        try:
            return parse_size(value)
        except WeightspaceError as e:
            self.fail(str(e), param, ctx)



@click.command(cls=Command)
@click.argument("spec", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("out", type=click.Path(file_okay=False, path_type=Path), required=False)
@click.option("-o", "--out", "--out-path", "out_option", type=click.Path(file_okay=False, path_type=Path),
              default=None, help="The output directory, as with every other command (the same as OUT; "
                                 "give either; --out-path is mergekit-multi's name).")
@click.option("--dry-run", is_flag=True, help="Validate and print the plan; read no tensor data.")
@device_option
@click.option("--shard-size", type=SizeType(), default="5G", show_default=True,
              help="Largest output shard, in bytes or with K/M/G suffix (decimal; KiB/MiB/GiB binary). "
                   "A bare B (1B) is refused as ambiguous; mergekit's --out-shard-size reads B as a billion.")
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
@click.option("--data", default=None, help="Validation data for --search: a zoo dataset reference (zoo "
                                           "models, by accuracy), or for transformers models a text file "
                                           "(perplexity, lower is better) or a JSONL file (accuracy; see "
                                           "wsmerge eval --help).")
@click.option("--metric", default=None, help="With --search on a file: the score that picks the best "
                                             "(perplexity, nll, bits_per_byte; acc, acc_norm, acc_bytes) "
                                             "[default: perplexity for text, acc for JSONL].")
@click.option("--split", type=click.Choice(["train", "val", "test"]), default="val", show_default=True,
              help="Split of a zoo dataset scored by --search.")
@click.option("--push-to-hub", "push_repo", default=None, metavar="ORG/NAME",
              help="After a successful merge, upload OUT to this Hub model repo (token: HF_TOKEN).")
@click.option("--private", is_flag=True, help="With --push-to-hub: create the repo as private.")
@click.option("--revision", default=None, help="With --push-to-hub: the branch to commit to.")
@click.option("--create-pr", is_flag=True, help="With --push-to-hub: open a pull request instead.")
@click.option("-I", "--intermediate-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Multi-stage SPEC: keep the stages' results here (default: a hidden folder beside "
                   "OUT, removed at the end).")
@click.option("--lazy/--no-lazy", default=True, show_default=True,
              help="Multi-stage SPEC with --intermediate-dir: reuse a stage's result already there.")
@mergekit_flags
def run(spec: Path, out: Path | None, out_option: Path | None, dry_run: bool, device: str, shard_size: int,
        out_dtype: str | None, overwrite: bool, allow_nonfinite: bool, no_progress: bool,
        as_json: bool, search: str | None, data: str | None, metric: str | None, split: str,
        push_repo: str | None = None, private: bool = False, revision: str | None = None,
        create_pr: bool = False, intermediate_dir: Path | None = None, lazy: bool = True) -> None:
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
      wsmerge run examples/eval/linear.yaml runs/linear-best --search target_weight=0:1:3 \\
          --data examples/eval/val.txt           # lowest perplexity (wsmerge eval --help)
      wsmerge run examples/ties.yaml runs/ties-mk --out-shard-size 1B --no-copy-tokenizer --quiet
      wsmerge run examples/stages.yaml runs/stages     # two stages, one file

    A SPEC of several YAML documents (separated by ---) is a multi-stage merge, as
    mergekit-multi runs it: documents named by `name:` are stages that later ones
    read by that name; the unnamed one (else the last) is written to OUT.

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
    _check_outputs(out, dry_run, overwrite, push_repo, private, revision, create_pr, spec)
    from weightspace.multi import is_multi_stage

    if is_multi_stage(spec):
        if search is not None:
            raise click.UsageError("--search runs one merge; it cannot be used on a multi-stage SPEC")
        _run_stages(spec, out, dry_run, as_json, mk, intermediate_dir, lazy, device=device,
                    shard_size=shard_size, allow_nonfinite=allow_nonfinite,
                    copy_tokenizer=mk.copy_tokenizer, write_card=mk.write_model_card,
                    overwrite=overwrite)
        if push_repo is not None and not dry_run:
            url = _push(out, push_repo, private, revision, create_pr)
            click.echo(f"{'opened pull request' if create_pr else 'pushed'} {out} to {push_repo}: {url}")
        return
    if intermediate_dir is not None:
        raise click.UsageError("--intermediate-dir is for a multi-stage SPEC (several YAML documents)")
    s, searched = _searched(load_spec(spec), spec.parent, search, data, split, dry_run, as_json, out, metric)
    s = _with_random_seed(s, mk.random_seed)
    plan = plan_merge(s, spec_dir=spec.parent, out_dtype=out_dtype, allow_crimes=mk.allow_crimes)
    summary = plan.summary(shard_size)
    if dry_run:
        _show_plan(summary, plan, as_json)
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
                                                        "metric": searched.metric,
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


def _run_stages(spec: Path, out: Path | None, dry_run: bool, as_json: bool, mk: MergekitFlags,
                intermediate_dir: Path | None, lazy: bool, **run_kwargs) -> None:
    """A multi-stage SPEC: its stages checked, then (unless --dry-run) run in order into OUT."""
    from weightspace.multi import load_stages, run_stages

    stages = load_stages(spec)
    if dry_run:
        order = [{"stage": s.name, "document": s.document, "reads": s.needs} for s in stages]
        if as_json:
            click.echo(json.dumps({"stages": order}, indent=2))
            return
        for s in order:
            reads = f", reading {', '.join(map(repr, s['reads']))}" if s["reads"] else ""
            name = repr(s["stage"]) if s["stage"] else "the output"
            click.echo(f"stage {name} (document {s['document']}){reads}")
        return
    t0 = time.perf_counter()
    echo = None if (mk.quiet or as_json) else click.echo
    stats = run_stages(stages, out, spec_dir=spec.parent, intermediate_dir=intermediate_dir, lazy=lazy,
                       echo=echo, progress=False, **run_kwargs)
    if as_json:
        click.echo(json.dumps({**stats, "wall_seconds": time.perf_counter() - t0}, indent=2, default=str))
    elif not mk.quiet:
        click.echo(f"{len(stages)} stages in {time.perf_counter() - t0:.2f} s; the output is {out}")


def _check_outputs(out: Path | None, dry_run: bool, overwrite: bool, push_repo: str | None,
                   private: bool, revision: str | None, create_pr: bool, spec: Path) -> None:
    """Before the spec is read: OUT is given (unless --dry-run), is not the spec nor holds it,
    and may be written, and the Hub push, if asked for, can be made. (What the spec reads is
    checked against OUT once the merge is planned, before anything is written.)"""
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
        from weightspace.files import check_output

        check_output(out, overwrite, inputs=[spec])


def _searched(s, spec_dir: Path, search: str | None, data: str | None, split: str, dry_run: bool,
              as_json: bool, out: Path | None, metric: str | None = None):
    """--search: the spec with the best value on --data (each candidate's score printed), and
    the search's result; without --search the spec as it is and None."""
    if search is None:
        if data is not None:
            raise click.UsageError("--data is only used with --search")
        if metric is not None:
            raise click.UsageError("--metric is only used with --search")
        return s, None
    from weightspace.zoo.search import is_file_data, parse_search, search_merge, with_value

    if dry_run:
        raise click.UsageError("--search merges every candidate; it cannot be combined with --dry-run")
    if data is None:
        raise click.UsageError("--search needs --data (the validation data that scores each candidate)")
    param, values = parse_search(search)
    from weightspace.files import temp_sibling

    work = temp_sibling(out, kind="search") if out is not None else None
    searched = search_merge(s, param, values, data=data, split=split, spec_dir=spec_dir, work=work,
                            metric=metric)
    if not as_json:
        where = data if is_file_data(data) else f"{data} ({split})"
        for v, score in searched.scores.items():
            mark = "  <- best" if v == searched.best else ""
            click.echo(f"{param}={v:g}: {searched.metric} {score:.4f} on {where}{mark}")
    return with_value(s, param, searched.best), searched


def _show_plan(summary: dict, plan, as_json: bool) -> None:
    """--dry-run's output: the plan's summary, as text or JSON (with every step)."""
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
        # an elementwise merge computes with one thread unless OMP_NUM_THREADS says otherwise
        os.environ["OMP_NUM_THREADS"] = str(mk.num_threads)
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

    return with_value(spec, "seed", seed, option=f"--random-seed {seed}")


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


def _debug() -> bool:
    return os.environ.get(DEBUG_ENV, "") not in ("", "0")
