"""`wsmerge lora ...`: LoRA adapters from and for weight spaces (peft's format)."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import click

from weightspace.cli.lora_merge import merge
from weightspace.cli.options import Group, check_plot, device_option


@click.group(cls=Group)
def lora() -> None:
    """LoRA adapters in peft's format (adapter_config.json + adapter_model.safetensors).

    \b
    merge: combine adapters of one base in adapter space (peft's add_weighted_adapter
    combination types) from a YAML spec, one module at a time.

    \b
    extract: a fine-tune's task vector, per linear layer, factored by a truncated SVD
    into a peft LoRA adapter: dW = W_ft - W_base ~ B @ A with B = U_k sqrt(S_k) and
    A = sqrt(S_k) V_k^T, lora_alpha = r (scale 1), so peft's W + B @ A * alpha / r is
    the best rank-k approximation of the fine-tune. Load it back as BASE+ADAPTER in any
    spec or command, or with peft's PeftModel.from_pretrained.

    \b
    Examples (from the repository root):
      wsmerge lora extract examples/models/ft_a --base examples/models/base --rank 8 \\
          -o runs/ft_a-lora
      wsmerge inspect ./examples/models/base+runs/ft_a-lora --vs examples/models/ft_a
      wsmerge lora merge examples/lora/merge.yaml -o runs/lora-merged
    """


lora.add_command(merge)


_SAVE_HELP = ("Changed tensors that are not factored (embeddings, norms, ...) to store whole as "
              "peft modules_to_save: none, or a comma list of kinds (embed, norm, other, all) "
              "and module names (a name also takes a linear layer out of the factoring).")


@lora.command()
@click.argument("finetuned")
@click.option("--base", required=True, help="The model FINETUNED was fine-tuned from.")
@click.option("-o", "--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Output adapter directory, written atomically (required unless --dry-run).")
@click.option("--rank", type=click.IntRange(min=1), default=None,
              help="Rank of every module (a layer with min(out, in) below it gets that, exactly, "
                   "with a warning).")
@click.option("--energy", type=click.FloatRange(0, 1, min_open=True), default=None,
              help="Instead of --rank: per module, the smallest rank keeping this share of "
                   "||dW||_F^2 (e.g. 0.9).")
@click.option("--max-rank", type=click.IntRange(min=1), default=None,
              help="With --energy: the largest rank a module may get (default: min(out, in)).")
@click.option("--save-modules", default="none", show_default=True, help=_SAVE_HELP)
@click.option("--embed-lora", is_flag=True,
              help="Factor the input embeddings too (peft's lora_embedding_A/B) instead of "
                   "reporting them.")
@click.option("--svd", type=click.Choice(["auto", "full", "randomized"]), default="auto",
              show_default=True,
              help="full: torch.linalg.svd; randomized: torch.svd_lowrank (rank + 16 columns, 4 "
                   "power iterations); auto: randomized where rank + 16 <= min(out, in) / 4 and "
                   "min(out, in) >= 512, else full.")
@click.option("--dtype", "out_dtype", type=click.Choice(["float32", "bfloat16", "float16"]),
              default=None, help="dtype of the factors (default: the fine-tune's).")
@device_option
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the randomized SVD.")
@click.option("--plot", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also draw rank and reconstruction error by depth to this image (plot extra).")
@click.option("--dry-run", is_flag=True,
              help="Check both models and print the plan (modules, ranks, SVD kind); read no "
                   "tensor data, write nothing.")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists (atomically, at the end).")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
def extract(finetuned: str, base: str, out: Path | None, rank: int | None, energy: float | None,
            max_rank: int | None, save_modules: str, embed_lora: bool, svd: str,
            out_dtype: str | None, device: str, seed: int, plot: Path | None, dry_run: bool,
            overwrite: bool, no_progress: bool) -> None:
    """Extract a peft LoRA adapter from FINETUNED against --base.

    Each linear layer's delta (2-D .weight tensors outside embeddings, lm_head included)
    gets a truncated SVD at --rank, or at the smallest rank keeping --energy of its
    squared norm. A changed bias of a factored layer goes into lora_B.bias (peft's
    lora_bias). Other changed tensors are listed, and stored whole with --save-modules.
    OUT gets adapter_config.json (r, lora_alpha = r, target_modules, rank_pattern and
    alpha_pattern where ranks differ), adapter_model.safetensors with peft's names
    (base_model.model.<module>.lora_A.weight / lora_B.weight) and
    extraction_report.json: per module the rank, ||dW - BA|| / ||dW|| and the share
    of ||dW||^2 kept. Tensors stream one at a time; OUT never lies in an input.

    \b
    Examples (from the repository root):
      wsmerge lora extract examples/models/ft_a --base examples/models/base --rank 8 --dry-run
      wsmerge lora extract examples/models/ft_b --base examples/models/base --energy 0.9 \\
          --max-rank 16 --save-modules embed,norm -o runs/ft_b-lora-e90
      wsmerge lora extract examples/models/ft_c --base examples/models/base --rank 4 \\
          --plot runs/ft_c-lora.png -o runs/ft_c-lora
    """
    from weightspace.errors import SpecError
    from weightspace.files import check_disjoint, check_output
    from weightspace.lora.extract import plan_extraction, plot_report, run_extraction
    from weightspace.sources import load_space
    from weightspace.spec import parse_dtype

    if out is None and not dry_run:
        raise click.UsageError("missing -o OUT (the adapter directory); or pass --dry-run")
    if rank is None and energy is None:
        raise click.UsageError("give --rank R (e.g. --rank 32) or --energy E (e.g. --energy 0.9)")
    if rank is not None and energy is not None:
        raise click.UsageError("--rank and --energy are two ways to pick the rank: give one")
    if max_rank is not None and energy is None:
        raise click.UsageError("--max-rank caps the rank --energy picks; with --rank, leave it out")
    if plot is not None and dry_run:
        raise click.UsageError("--plot draws the extraction's errors; it cannot be combined with --dry-run")
    check_plot(plot)
    if out is not None and not dry_run:
        check_output(out, overwrite, inputs=[finetuned, base])
    if plot is not None:
        check_disjoint(plot, [finetuned, base])
    ft, bs = load_space(finetuned), load_space(base)
    try:
        plan = plan_extraction(ft, bs, rank=rank, energy=energy, max_rank=max_rank,
                               save_modules=save_modules, embed_lora=embed_lora, svd=svd)
    except SpecError as e:
        raise click.UsageError(str(e)) from None
    for note in plan.notes:
        warnings.warn(note, stacklevel=1)
    if dry_run:
        _print_plan(plan.summary())
        return
    dtype = parse_dtype(out_dtype) if out_dtype else None
    report = run_extraction(plan, out, overwrite=overwrite, device=device, dtype=dtype,
                            progress=not no_progress and sys.stderr.isatty(),
                            inputs=[finetuned, base], seed=seed)
    _print_report(out, report)
    if plot is not None:
        plot_report(report, plot)
        click.echo(f"plot: {plot}")


def _print_plan(s: dict) -> None:
    click.echo(f"plan: LoRA of {s['finetuned']} against {s['base']}, {s['rule']}")
    for m in s["modules"]:
        click.echo(f"  {m['module']}  {m['shape']}  {m['kind']}  rank <= {m['rank']}  {m['svd']} SVD")
    click.echo(f"{len(s['modules'])} modules to factor; {s['compared_whole']} other tensors compared "
               f"(reported, or saved with --save-modules); adapter at most "
               f"{s['adapter_values_at_most']:,} values. Dry run: nothing read or written.")


def _print_report(out: Path, r: dict) -> None:
    mods = r["modules"]
    ranks = [m["rank"] for m in mods]
    errs = [m["rel_error"] for m in mods]
    click.echo(f"{out}: LoRA of {r['finetuned']} against {r['base']} ({r['rule']}): "
               f"{len(mods)} modules, rank {min(ranks)}-{max(ranks)}, "
               f"{r['adapter_values']:,} values, {r['seconds']:.1f} s on {r['device']}")
    by_kind: dict[str, list[dict]] = {}
    for m in mods:
        by_kind.setdefault(m["module"].rsplit(".", 1)[-1], []).append(m)
    click.echo("module      n  rank     ||dW-BA||/||dW||   energy kept")
    for kind, rows in by_kind.items():
        rk = sorted({m["rank"] for m in rows})
        er = [m["rel_error"] for m in rows]
        en = [m["energy_kept"] for m in rows]
        rank_text = str(rk[0]) if len(rk) == 1 else f"{rk[0]}-{rk[-1]}"
        click.echo(f"{kind:<10} {len(rows):>2}  {rank_text:<7}  {min(er):.4f}-{max(er):.4f}    "
                   f"{min(en):.4f}-{max(en):.4f}")
    click.echo(f"overall: mean relative error {sum(errs) / len(errs):.4f}")
    if r["unchanged_modules"]:
        click.echo(f"unchanged (not in the adapter): {', '.join(r['unchanged_modules'])}")
    if r["bias_deltas"]:
        click.echo(f"changed biases stored as lora_B.bias (lora_bias): {len(r['bias_deltas'])}")
    changed = r["changed_not_factored"]
    saved = [c for c in changed if c["saved"]]
    left = [c for c in changed if not c["saved"]]
    if saved:
        mods = sorted({c["module"] for c in saved})
        click.echo(f"saved whole (modules_to_save): {', '.join(mods[:6])}"
                   + (f", ... ({len(mods)} in all)" if len(mods) > 6 else ""))
    if left:
        names = ", ".join(c["tensor"] for c in left[:6]) + (f", ... ({len(left)} in all)"
                                                            if len(left) > 6 else "")
        click.echo(f"warning: changed but not in the adapter (use --save-modules, see --help): {names}",
                   err=True)
    click.echo(f"report: {out / 'extraction_report.json'}")
    click.echo(f"use it as a model: {r['base']}+{out}")
