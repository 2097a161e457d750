"""`wsmerge align`: permute B's hidden units to match A's (Git Re-Basin weight matching)."""

from __future__ import annotations

from pathlib import Path

import click

from weightspace.cli.options import Command


@click.command(cls=Command)
@click.argument("a")
@click.argument("b")
@click.option("-o", "--out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Output directory for the aligned copy of B.")
@click.option("--arch", default=None,
              help="Architecture family (mlp, cnn, resmlp); default: arch.arch in B's config.json.")
@click.option("--max-iter", default=100, show_default=True, type=click.IntRange(min=1),
              help="Most coordinate-descent sweeps over the permutations.")
@click.option("--seed", default=0, show_default=True, help="Order in which permutations are visited.")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
def align(a: str, b: str, out: Path, arch: str | None, max_iter: int, seed: int,
          overwrite: bool) -> None:
    """Permute-align B to A by weight matching; the output computes the same function as B.

    Reorders B's hidden units (rows of one layer, columns of the next) so its
    weights are as similar to A's as a permutation can make them. Averaging
    A with the aligned B then stays much closer to both in loss than
    averaging A with B. Zoo architectures mlp, cnn and resmlp are supported.

    \b
    Example (from the repository root):
      wsmerge align examples/digits/ft0 examples/digits/ft1 -o runs/ft1-aligned
    """
    from weightspace.files import check_output
    from weightspace.merges.rebasin import align as align_spaces
    from weightspace.sink import inputs_of, save_space
    from weightspace.sources import load_space

    check_output(out, overwrite, inputs=[a, b])
    space_a, space_b = load_space(a), load_space(b)
    aligned, report = align_spaces(space_a, space_b, arch=arch, max_iter=max_iter, seed=seed)
    save_space(aligned, out, overwrite=overwrite, config=space_b.meta.get("config"),
               inputs=[*inputs_of(space_a), *inputs_of(space_b)])
    state = "converged" if report["converged"] else f"stopped at --max-iter {max_iter}"
    click.echo(f"aligned {b} to {a} ({report['arch']}): {report['iterations']} sweep(s), {state}")
    width = max(len("permutation"), *(len(p) for p in report["units"]))
    click.echo(f"  {'permutation':<{width}}  {'units':>5}  {'moved':>5}")
    for p, n in report["units"].items():
        click.echo(f"  {p:<{width}}  {n:>5}  {report['moved'][p]:>5}")
    click.echo(f"  similarity sum<A, B>: {report['similarity_before']:.6g} before, "
               f"{report['similarity_after']:.6g} after")
    click.echo(f"wrote {out}")
