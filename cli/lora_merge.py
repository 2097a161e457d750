"""`wsmerge lora merge`: combine peft LoRA adapters in adapter space (peft's add_weighted_adapter)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import click

from weightspace.cli.options import Command, device_option


@click.command(cls=Command)
@click.argument("spec", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("-o", "--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="The output adapter directory (adapter_config.json, adapter_model.safetensors).")
@click.option("--dry-run", is_flag=True, help="Check the spec and the adapters' headers and print the "
                                              "plan; read no tensor data.")
@device_option
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists (atomically, at the end).")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@click.option("--json", "as_json", is_flag=True, help="Print the plan or the run's stats as JSON.")
def merge(spec: Path, out: Path | None, dry_run: bool, device: str, overwrite: bool, no_progress: bool,
          as_json: bool) -> None:
    """Combine the peft LoRA adapters SPEC names into one adapter, written to OUT.

    The combinations are peft's add_weighted_adapter, computed the same way
    (the tensors equal peft's): linear, cat, svd (the default), ties,
    ties_svd, dare_linear, dare_ties, dare_linear_svd, dare_ties_svd,
    magnitude_prune, magnitude_prune_svd. No full weight matrix of the model
    is built: the factor-wise types combine A's and B's, the *_svd ones the
    delta B@A of one layer at a time, factored again to svd_rank.

    \b
    SPEC (YAML; paths relative to its folder, or Hub ids):
      combination_type: ties_svd
      base_model: ../models/base       # optional: adapters are checked against it
      adapters:
        - adapter: ./adapters/sql
          parameters: {weight: 0.7}
        - adapter: ./adapters/math
          parameters: {weight: 0.3}
      parameters: {density: 0.5, majority_sign_method: total, svd_rank: 8}
    parameters (peft's names and defaults): density (ties, dare, magnitude
    types), majority_sign_method total|frequency (ties types), svd_rank
    (default: the largest r), svd_clamp, svd_full_matrices, svd_driver; seed
    (dare types, default 0); dtype (of the output, default float32).

    OUT loads with peft's PeftModel.from_pretrained, and in specs as
    BASE+OUT. It is written beside OUT and renamed into place when complete.

    \b
    Examples (from the repository root):
      wsmerge lora merge examples/lora/merge.yaml --dry-run
      wsmerge lora merge examples/lora/merge.yaml -o runs/lora-merged
    """
    from weightspace.cli.display import human_bytes
    from weightspace.files import check_output
    from weightspace.lora.combine import load_lora_merge_spec, plan_lora_merge, write_lora_merge

    if out is None and not dry_run:
        raise click.UsageError("missing -o OUT (the output adapter directory); or pass --dry-run")
    if out is not None and not dry_run:
        check_output(out, overwrite, inputs=[spec])
    plan = plan_lora_merge(load_lora_merge_spec(spec), spec_dir=spec.parent, spec_path=spec)
    summary = plan.summary()
    if dry_run:
        if as_json:
            click.echo(json.dumps(summary, indent=2))
            return
        click.echo(f"{plan.kind}: {len(plan.sources)} adapters -> r {plan.rank}, lora_alpha "
                   f"{plan.config['lora_alpha']}, {summary['modules']} modules, target_modules "
                   f"{summary['target_modules']}")
        for i, s in enumerate(summary["adapters"]):
            click.echo(f"  adapters[{i}] {s['adapter']}: weight {s['weight']}, r {s['r']}, "
                       f"{s['modules']} modules")
        click.echo(f"reads {human_bytes(summary['read_bytes'])} of factors, writes "
                   f"{human_bytes(summary['write_bytes'])} ({summary['dtype']})")
        for n in plan.notes:
            click.echo(f"note: {n}")
        return
    for n in plan.notes:
        click.echo(f"note: {n}", err=True)
    t0 = time.perf_counter()
    stats = write_lora_merge(plan, out, overwrite=overwrite, device=device,
                             progress=not no_progress and sys.stderr.isatty())
    dt = time.perf_counter() - t0
    if as_json:
        click.echo(json.dumps({**summary, **stats, "wall_seconds": dt}, indent=2))
        return
    click.echo(f"{plan.kind}: {stats['modules']} modules, r {plan.rank}, wrote "
               f"{human_bytes(stats['written_bytes'])} to {out} in {dt:.2f} s")
