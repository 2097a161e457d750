"""`wsmerge moe`: dense experts -> a sparse mixture-of-experts checkpoint (mergekit-moe's config).

    wsmerge moe examples/moe.yaml runs/moe
    wsmerge moe examples/moe.yaml --dry-run
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import click

from weightspace.cli.display import human_bytes
from weightspace.cli.options import Command, device_option
from weightspace.cli.run import SizeType, _one_out


@click.command(cls=Command)
@click.argument("spec", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("out", type=click.Path(file_okay=False, path_type=Path), required=False)
@click.option("-o", "--out", "out_option", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="The output directory (the same as OUT; give either).")
@click.option("--dry-run", is_flag=True, help="Check the spec and the models' headers and print the "
                                               "plan; compute no router and write nothing.")
@device_option
@click.option("--random-seed", "seed", type=int, default=0, show_default=True,
              help="Seed of gate_mode random/uniform_random and of experts' noise_scale.")
@click.option("--shard-size", "--out-shard-size", type=SizeType(), default="5G", show_default=True,
              help="Largest output shard, in bytes or with K/M/G suffix.")
@click.option("--i-understand-this-is-not-useful-without-training", "allow_all_same", is_flag=True,
              help="Build it even when every expert is the same model (mergekit-moe's flag).")
@click.option("--copy-tokenizer/--no-copy-tokenizer", default=True, show_default=True,
              help="Copy the tokenizer files of the base model (or tokenizer_source) into OUT.")
@click.option("--write-model-card/--no-write-model-card", default=True, show_default=True,
              help="Write a README.md model card.")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists (atomically, at the end).")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@click.option("--json", "as_json", is_flag=True, help="Print the plan or the run's stats as JSON.")
def moe(spec: Path, out: Path | None, out_option: Path | None, dry_run: bool, device: str, seed: int,
        shard_size: int, allow_all_same: bool, copy_tokenizer: bool, write_model_card: bool,
        overwrite: bool, no_progress: bool, as_json: bool) -> None:
    """Build a sparse mixture of experts from a base model and dense fine-tunes of it.

    SPEC is a mergekit-moe config: base_model, experts (source_model,
    positive_prompts, negative_prompts, noise_scale, residual_scale),
    gate_mode (hidden, hidden_avg, cheap_embed, random, uniform_random),
    experts_per_token, dtype, shared_experts, architecture; plus
    tokenizer_source (a folder with the prompts' tokenizer, when the base has
    none). Llama/Mistral experts become a MixtralForCausalLM; one shared expert
    (or Qwen2 experts) a Qwen2MoeForCausalLM. Attention, norms, embeddings and
    lm_head come from the base; each layer's MLP of expert E becomes expert E.

    The routers: random (seeded) needs nothing; cheap_embed averages the base's
    embedding rows of each expert's prompts; hidden runs the base model on
    them (on --device) and takes each layer's input hidden state at the last
    token. Both need transformers and a tokenizer.

    OUT is written tensor by tensor beside OUT and renamed into place when
    complete; transformers' from_pretrained loads it.

    \b
    Examples (from the repository root):
      wsmerge moe examples/moe.yaml runs/moe
      wsmerge moe examples/moe.yaml --dry-run
      wsmerge moe examples/moe.yaml runs/moe-seed1 --random-seed 1 --shard-size 100K
    """
    from weightspace.files import check_output
    from weightspace.merges.moe import load_moe_spec, plan_moe, run_moe
    from weightspace.yaml_io import read_yaml_file

    out = _one_out(out, out_option)
    if out is None and not dry_run:
        raise click.UsageError("missing OUT (the output directory: SPEC OUT or -o OUT); or pass --dry-run")
    if out is not None and not dry_run:
        check_output(out, overwrite, inputs=[spec])
    s = load_moe_spec(spec)
    plan = plan_moe(s, spec_dir=spec.parent, source=str(spec), allow_all_same=allow_all_same, seed=seed,
                    spec_path=spec)
    summary = plan.summary()
    if dry_run:
        if as_json:
            click.echo(json.dumps(summary, indent=2))
            return
        click.echo(f"{summary['architecture']}: {summary['experts']} experts "
                   f"({summary['experts_per_token']} per token"
                   + (f", {summary['shared_experts']} shared" if summary["shared_experts"] else "")
                   + f"), {summary['layers']} layers, gate_mode {summary['gate_mode']}")
        click.echo(f"{summary['tensors']} tensors, {summary['parameters']:,} parameters; read "
                   f"{human_bytes(summary['read_bytes'])}, write {human_bytes(summary['write_bytes'])}, "
                   f"peak memory about {human_bytes(summary['peak_bytes'])}"
                   + (" (plus the base model, run on the prompts)" if s.gate_mode.startswith("hidden") else ""))
        return
    assert out is not None
    progress = not no_progress and sys.stderr.isatty()
    t0 = time.perf_counter()
    stats = run_moe(plan, out, device=device, shard_size=shard_size, overwrite=overwrite,
                    progress=progress, copy_tokenizer=copy_tokenizer, write_card=write_model_card,
                    recipe=read_yaml_file(spec), warn=lambda m: click.echo(f"warning: {m}", err=True))
    dt = time.perf_counter() - t0
    if as_json:
        click.echo(json.dumps({**summary, **stats, "wall_seconds": dt}, indent=2))
        return
    click.echo(f"{summary['architecture']}: {summary['experts']} experts, {summary['tensors']} tensors, "
               f"{summary['parameters']:,} parameters, wrote {human_bytes(stats['written_bytes'])} in "
               f"{stats['shards']} shard(s) to {out} in {dt:.2f} s")
