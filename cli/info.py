"""`wsmerge inspect` and `wsmerge methods`: what a checkpoint holds, what each merge method takes.

    wsmerge inspect runs/ties --vs examples/models/base   # structure, dtypes, cosine per tensor
    wsmerge methods ties                                   # a method's parameters and defaults
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from weightspace.cli.display import human_bytes
from weightspace.cli.options import Command


@click.command(cls=Command)
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
    _print_summary(info)
    if cmp is not None:
        _print_comparison(cmp, top)


def _print_summary(info: dict) -> None:
    """What MODEL holds: tensors, parameters, dtypes, files, layer stacks."""
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


def _print_comparison(cmp: dict, top: int) -> None:
    """--vs: the overall difference, the tensors only one side has, and the `top` most changed."""
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


@click.command(cls=Command)
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
