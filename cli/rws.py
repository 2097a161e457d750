"""`wsmerge rws ...`: extract robust weight signatures, patch them into models, take them off."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import click

from weightspace.cli.options import Group, check_plot


@click.group(cls=Group)
def rws() -> None:
    """Robust weight signatures: robustness as a patch added to a model's weights.

    \b
    With PRE the shared starting point, STD fine-tuned on clean data and ROBUST_c
    fine-tuned on corruption c, per tensor (flattened):
      d_c = ROBUST_c - PRE,  d_s = STD - PRE
      RWS_c = d_c - (<d_c, d_s> / <d_s, d_s>) d_s      (the part orthogonal to d_s)
    Patching adds  theta + sum_c alpha_c RWS_c  on the few shallow tensors a signature
    keeps; unpatching subtracts it again (Cai et al., ICML 2023). --scaling authors adds
    (alpha_c / n)^2 RWS_c for n signatures instead, as the authors' model_patching.py does.

    \b
    Examples (from the repository root, with the digit fine-tunes standing in for fine-tunes
    on corrupted data; examples/rws_digits.py makes real ones):
      wsmerge rws extract --pretrained examples/digits/base --clean examples/digits/ft0 \\
          --robust examples/digits/ft1 -o runs/ft1.rws.safetensors --bits 4
      wsmerge rws extract --pretrained examples/digits/base --clean examples/digits/ft0 \\
          --robust examples/digits/ft2 -o runs/ft2.rws.safetensors
      wsmerge rws inspect runs/ft1.rws.safetensors --plot runs/ft1-rws.png
      wsmerge rws patch examples/digits/ft0 runs/ft1.rws.safetensors runs/ft2.rws.safetensors:0.5 \\
          -o runs/ft0+ft1+ft2
      wsmerge rws unpatch runs/ft0+ft1+ft2 runs/ft2.rws.safetensors:0.5 -o runs/ft0+ft1
    """


@rws.command()
@click.option("--pretrained", required=True, help="theta_pre: the model both fine-tunes started from.")
@click.option("--clean", required=True, help="theta_std: fine-tuned on clean data.")
@click.option("--robust", required=True, help="theta_c: fine-tuned on corruption c (same start, same recipe).")
@click.option("-o", "--out", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="Output signature file (*.rws.safetensors), written atomically.")
@click.option("--layers", default="auto", show_default=True,
              help="Tensors to keep: auto (the shallowest layers holding --share of the squared RWS "
                   "norm), first:K (embeddings/stem + layers 0..K-1), all, a glob on names "
                   "('blocks.0.*') or re:REGEX.")
@click.option("--share", type=click.FloatRange(0, 1, min_open=True), default=0.5, show_default=True,
              help="For --layers auto: the share of the total squared RWS norm to keep.")
@click.option("--bits", type=int, default=None,
              help="Quantize to 2..8 bits per value, packed (default: float32, no loss).")
@click.option("--scheme", type=click.Choice(["uniform", "log", "minmax"]), default="uniform",
              show_default=True,
              help="uniform: affine with 0 exact, error <= scale/2; log: sign + log2|x| on a uniform "
                   "grid (bounded relative error); minmax: the authors' linear quantization, 2^bits "
                   "levels from min to max (their --quantization 2^bits --quantization_type linear).")
@click.option("--per-row", is_flag=True, help="One scale per row (dim 0) instead of per tensor.")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
def extract(pretrained: str, clean: str, robust: str, out: Path, layers: str, share: float,
            bits: int | None, scheme: str, per_row: bool, overwrite: bool) -> None:
    """Extract the robust weight signature of ROBUST against CLEAN, both fine-tuned from PRETRAINED.

    \b
    Examples (from the repository root):
      wsmerge rws extract --pretrained examples/digits/base --clean examples/digits/ft0 \\
          --robust examples/digits/ft1 -o runs/ft1-first2.rws.safetensors \\
          --layers first:2 --bits 4 --scheme log --per-row
    """
    from weightspace.errors import SpecError
    from weightspace.files import check_output_file
    from weightspace.merges.signatures import (
        extract_signature,
        layer_summary,
        save_signature,
        signature_size_report,
    )
    from weightspace.sink import inputs_of
    from weightspace.sources import load_space

    if out.suffix != ".safetensors":
        raise SpecError(f"-o {out}: a signature is a .safetensors file; name it *.rws.safetensors")
    check_output_file(out, overwrite, inputs=[pretrained, clean, robust])
    pre, std, rob = load_space(pretrained), load_space(clean), load_space(robust)
    check_output_file(out, overwrite, inputs=[*inputs_of(pre), *inputs_of(std), *inputs_of(rob)])
    sig = extract_signature(pre, std, rob, layers=layers, share=share, bits=bits, scheme=scheme,
                            granularity="row" if per_row else "tensor")
    save_signature(sig, out)
    size = signature_size_report(out)
    kept = sig.kept
    how = f"{bits}-bit {scheme}{', per row' if per_row else ''}" if bits else "float32"
    click.echo(f"{out}: {len(kept)} tensors ({size['kept_params']:,} values, {how}), layers {layers!r}")
    for name in kept:
        click.echo(f"  {name}  {list(sig.meta['shapes'][name])}")
    click.echo(f"size: {_size_line(size)}")
    _print_layers(layer_summary(sig.meta["report"], kept))


def _parse_sig_args(args: tuple[str, ...]) -> list[tuple[str, float]]:
    """SIG[:ALPHA] -> (path, alpha), split at the last colon so paths with colons still work;
    an argument that names an existing file is a path as a whole (alpha 1.0)."""
    from weightspace.errors import SpecError

    out = []
    for a in args:
        path, sep, tail = a.rpartition(":")
        if sep and path and not Path(a).is_file():
            try:
                alpha = float(tail)
            except ValueError:
                out.append((a, 1.0))
                continue
            if not math.isfinite(alpha):
                raise SpecError(f"{a}: alpha must be a finite number")
            out.append((path, alpha))
        else:
            out.append((a, 1.0))
    return out


def _write(model: str, sigs: tuple[str, ...], out: Path, overwrite: bool, *, undo: bool,
           scaling: str = "linear", force: bool = False) -> None:
    from weightspace.files import check_output
    from weightspace.merges.signatures import RECORD_KEY, patch, save_patched, unpatch
    from weightspace.merges.signatures.patching import APPLIED_KEY
    from weightspace.sink import inputs_of
    from weightspace.sources import load_space

    pairs = _parse_sig_args(sigs)
    check_output(out, overwrite, inputs=[model, *(p for p, _ in pairs)])
    space = load_space(model)
    check_output(out, overwrite, inputs=inputs_of(space))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = (unpatch(space, pairs, scaling=scaling, force=force) if undo
                  else patch(space, pairs, scaling=scaling))
    for w in caught:
        click.echo(f"warning: {w.message}", err=True)
    save_patched(result, out, overwrite=overwrite)
    done = result.meta[APPLIED_KEY]
    click.echo(f"{out}: {model} " + " ".join(
        f"{e['sign']} {e['coefficient']:g} x {Path(p).name}"
        + ("" if e["scaling"] == "linear" else f" (alpha {e['alpha']:g}, {e['scaling']} scaling)")
        for (p, _), e in zip(pairs, done)))
    record = result.meta[RECORD_KEY]
    if record:
        click.echo(f"patch record ({RECORD_KEY} in the safetensors metadata): " + ", ".join(
            f"{e['coefficient']:g} x {e['signature']} [{e['fingerprint'][:12]}]"
            + ("" if e["scaling"] == "linear" else f" (alpha {e['alpha']:g}, {e['scaling']} scaling)")
            for e in record))
    else:
        click.echo("patch record: empty (no signature applied)")


_SIG_HELP = "SIG[:ALPHA]: a signature file, optionally with its strength (default 1.0)."
_SCALING = click.option(
    "--scaling", type=click.Choice(["linear", "authors"]), default="linear", show_default=True,
    help="linear: add alpha x RWS per signature. authors: add (alpha / n)^2 x RWS for n signatures, "
         "what the authors' model_patching.py does with --alpha (1 signature at alpha 1: once; "
         "2 at alpha 1: a quarter each).")


@rws.command("patch")
@click.argument("model")
@click.argument("signatures", nargs=-1, required=True, metavar="SIG[:ALPHA]...")
@click.option("-o", "--out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Output checkpoint directory, written atomically.")
@_SCALING
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists (atomically, at the end).")
def patch_cmd(model: str, signatures: tuple[str, ...], out: Path, scaling: str, overwrite: bool) -> None:
    """Add signatures to MODEL: theta + sum_c alpha_c RWS_c on the tensors they keep.

    Each SIG[:ALPHA] is a signature file and its strength (default 1.0; the text after
    the last colon, so paths with colons work). With --scaling authors each signature is
    added (alpha / n)^2 times instead, n the number of signatures, as the authors' code
    does. Tensors no signature keeps are copied unchanged. What was added (fingerprint,
    file name, alpha, scaling, coefficient) is appended to the patch record in the
    output's safetensors metadata, which `rws unpatch` checks.

    \b
    Examples (after the `wsmerge rws --help` extract examples):
      wsmerge rws patch examples/digits/ft0 runs/ft1.rws.safetensors -o runs/ft0+ft1-only
      wsmerge rws patch examples/digits/ft0 runs/ft1.rws.safetensors:0.8 runs/ft2.rws.safetensors:0.5 \\
          -o runs/ft0+ft1-0.8+ft2-0.5
      wsmerge rws patch examples/digits/ft0 runs/ft1.rws.safetensors:2 runs/ft2.rws.safetensors:2 \\
          --scaling authors -o runs/ft0+ft1+ft2-as-the-authors
    """
    _write(model, signatures, out, overwrite, undo=False, scaling=scaling)


@rws.command("unpatch")
@click.argument("model")
@click.argument("signatures", nargs=-1, required=True, metavar="SIG[:ALPHA]...")
@click.option("-o", "--out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Output checkpoint directory, written atomically.")
@_SCALING
@click.option("--force", is_flag=True, help="Subtract signatures the patch record does not list (warns).")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists (atomically, at the end).")
def unpatch_cmd(model: str, signatures: tuple[str, ...], out: Path, scaling: str, force: bool,
                overwrite: bool) -> None:
    """Take signatures off MODEL again: theta - sum_c alpha_c RWS_c.

    Each SIG[:ALPHA] must be in MODEL's patch record with the same alpha and --scaling (it
    was added by `rws patch`), and the coefficient recorded there is subtracted; otherwise
    it is refused unless --force. Removed entries leave the record; once it is empty the
    model equals the unpatched one up to float rounding.

    \b
    Example (after the `wsmerge rws --help` examples):
      wsmerge rws unpatch runs/ft0+ft1+ft2 runs/ft2.rws.safetensors:0.5 -o runs/ft0+ft1-again
    """
    _write(model, signatures, out, overwrite, undo=True, scaling=scaling, force=force)


@rws.command("inspect")
@click.argument("signature", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--plot", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write a bar chart per layer (relative change, RWS norm; kept layers highlighted) "
                   "as PNG/PDF/SVG.")
@click.option("--json", "as_json", is_flag=True, help="Print the metadata and per-layer summary as JSON.")
def inspect_cmd(signature: Path, plot: Path | None, as_json: bool) -> None:
    """Where a signature lives, layer by layer, from the report stored in it.

    Per layer (tensors at one depth; "pre" = embeddings/stem, "post" = final norm/head):
    relative change of the robust and clean fine-tunes (||d|| / ||theta_pre||), their
    cosine, the share of the robust change orthogonal to the clean one (||RWS|| / ||d_c||),
    the layer's share of the total squared RWS norm, and whether the signature keeps it.

    \b
    Example (after the `wsmerge rws --help` examples):
      wsmerge rws inspect runs/ft2.rws.safetensors --json
    """
    check_plot(plot)
    from weightspace.merges.signatures import layer_summary, load_signature, signature_size_report

    sig = load_signature(signature)
    meta = sig.meta
    summary = layer_summary(meta["report"], sig.kept)
    size = signature_size_report(signature)
    if as_json:
        click.echo(json.dumps({"meta": meta, "layers": summary, "size": size}, indent=2, default=str))
    else:
        prov = meta.get("provenance", {})
        how = (f"{meta['bits']}-bit {meta['scheme']} (per {meta['granularity']})" if meta["bits"]
               else "float32")
        click.echo(f"signature    {signature}")
        click.echo(f"fingerprint  {sig.fingerprint[:16]}")
        click.echo(f"kept         {len(sig.kept)} tensors, {size['kept_params']:,} values, {how}; "
                   f"layers {meta.get('layers')!r}" + (f", share {meta.get('share')}"
                                                       if meta.get("layers") == "auto" else ""))
        if size["model_bytes"]:
            click.echo(f"size         {_size_line(size)}")
        for role in ("pretrained", "clean", "robust"):
            if role in prov:
                click.echo(f"{role:<12} {prov[role]}")
        _print_layers(summary)
    if plot is not None:
        plot_layers(summary, plot, title=signature.name)
        click.echo(f"plot: {plot}", err=as_json)


def _human(n: float) -> str:
    from weightspace.cli.display import human_bytes as human

    return human(n)


def _size_line(size: dict) -> str:
    """The signature file against the robust checkpoint's file(s), or its tensor bytes when
    the signature was extracted from models in memory."""
    what = "file" if size["model_bytes_are"] == "file" else "tensor bytes"
    return (f"{_human(size['bytes'])} file vs {_human(size['model_bytes'])} for the robust checkpoint's "
            f"{what} ({_pct(size['fraction'])}, {size['times_smaller']:.1f}x smaller; tensors "
            f"{_human(size['payload_bytes'])}, header with report and provenance "
            f"{_human(size['header_bytes'])})")


def _pct(x: float | None) -> str:
    return "?" if x is None else f"{100 * x:.2f}% of it"


def _fmt(x: float | None, spec: str = ".4f") -> str:
    return "-" if x is None else format(x, spec)


def _print_layers(summary: list[dict]) -> None:
    w = max([len(u["label"]) for u in summary] + [5])
    click.echo(f"{'layer'.ljust(w)}  tensors  rel.robust  rel.clean  cos(dc,ds)  rws/dc  rws^2 share  kept")
    for u in summary:
        click.echo(f"{u['label'].ljust(w)}  {u['tensors']:>7}  {_fmt(u['rel_change_robust']):>10}  "
                   f"{_fmt(u['rel_change_clean']):>9}  {_fmt(u['cos_robust_clean'], '+.3f'):>10}  "
                   f"{_fmt(u['rws_share'], '.3f'):>6}  {_fmt(u['rws_fraction'], '.1%'):>11}  {u['kept']}")


def plot_layers(summary: list[dict], path: Path, title: str = "") -> Path:
    """Two bar charts per layer: relative change (robust, clean) and ||RWS||; kept layers highlighted."""
    from weightspace.extras import pyplot

    plt = pyplot()
    labels = [u["label"] for u in summary]
    xs = list(range(len(summary)))
    kept = [u["kept"] != "none" for u in summary]
    fig, (ax1, ax2) = plt.subplots(2, 1, sharex=True, figsize=(max(4.5, 0.5 * len(xs) + 2), 5.2))
    rob = [u["rel_change_robust"] or 0.0 for u in summary]
    cln = [u["rel_change_clean"] or 0.0 for u in summary]
    ax1.bar([x - 0.2 for x in xs], rob, width=0.4, label="robust  ||d_c|| / ||theta_pre||", color="#c0392b")
    ax1.bar([x + 0.2 for x in xs], cln, width=0.4, label="clean  ||d_s|| / ||theta_pre||", color="#7f8c8d")
    ax1.set_ylabel("relative change")
    ax1.legend(fontsize=8)
    colors = ["#2c6fbb" if k else "#c8d3df" for k in kept]
    ax2.bar(xs, [u["rws_norm"] for u in summary], color=colors, edgecolor="black",
            linewidth=[1.2 if k else 0.0 for k in kept])
    ax2.set_ylabel("||RWS|| (dark: kept)")
    ax2.set_xticks(xs, labels, rotation=45, ha="right", fontsize=8)
    for x, k in zip(xs, kept):
        if k:
            ax1.axvspan(x - 0.5, x + 0.5, color="#2c6fbb", alpha=0.08, linewidth=0)
    fig.suptitle(f"robust weight signature{': ' + title if title else ''}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
