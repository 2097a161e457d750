"""`wsmerge generate ...`: train a weight generator on a zoo, sample models from it, evaluate them."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import click

from weightspace.cli.options import GreedyOption, Group


@click.group(cls=Group)
def generate() -> None:
    """Weight generators: learn a zoo's weights, then sample new models for a dataset.

    \b
    d2nwg  latent diffusion conditioned on a dataset embedding (Soro et al., ICLR 2025):
           weights -> chunks -> VAE latents -> DDPM over them, given an embedding of
           the dataset's examples; an unseen dataset with seen classes gets weights too
    kde    kernel densities on the VAE latents of the zoo's best 30 % (Schurholt et al.,
           NeurIPS 2022); per task when the zoo has several
    One generator per architecture. Samples are zoo checkpoints: inspect, merge,
    fine-tune or open them like any other model.

    \b
    Examples (from the repository root; the zoo has one architecture, 16-wide MLPs, on 6 tasks):
      wsmerge zoo build examples/zoo/digits-tasks.yaml -o runs/zoo-tasks     a zoo to learn from
      wsmerge generate train runs/zoo-tasks -o runs/gen --tasks digits digits:rotate=90   d2nwg
      wsmerge generate train runs/zoo-tasks -o runs/gen-kde --method kde --subset 'head.*'
      wsmerge generate sample runs/gen --data digits:rotate=90 -n 20 -o runs/samples
      wsmerge generate eval runs/samples --data digits:rotate=90 --zoo runs/zoo-tasks --epochs 0,1
    """


def _progress(no_progress: bool) -> bool:
    return not no_progress and sys.stderr.isatty()


def _int_list(text: str, option: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"expected integers separated by commas, got {text!r}",
                                 param_hint=option) from None
    if not values or any(v < 0 for v in values):
        raise click.BadParameter(f"expected integers >= 0, got {text!r}", param_hint=option)
    return values


@generate.command()
@click.argument("zoo_dir", metavar="ZOO", type=click.Path(file_okay=False, path_type=Path))
@click.option("-o", "--out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="The generator directory to write (atomically).")
@click.option("--method", type=click.Choice(["d2nwg", "kde"]), default="d2nwg", show_default=True,
              help="d2nwg: conditional latent diffusion; kde: kernel densities on the best models' latents.")
@click.option("--subset", default=None, metavar="PATTERN",
              help="Generate only tensors matching this glob ('head.*', 'layers.0.*'); the rest come "
                   "from the best zoo model of the task.")
@click.option("--tasks", cls=GreedyOption, multiple=True, metavar="REF",
              help="Train on these dataset references only (--tasks A B, or repeat the option). "
                   "Default: every dataset of the zoo.")
@click.option("--checkpoints", type=click.Choice(["final", "all"]), default="final", show_default=True,
              help="Learn from each model's last checkpoint, or from every trained checkpoint.")
@click.option("--epochs", default="500,1000", show_default=True, metavar="VAE[,DIFFUSION]",
              help="Training epochs of the VAE and of the diffusion model (one number: both).")
@click.option("--chunk", type=click.IntRange(min=1), default=64, show_default=True,
              help="Values per chunk (each tensor is cut into chunks; its last one padded).")
@click.option("--latent-dim", type=click.IntRange(min=1), default=16, show_default=True,
              help="VAE latent size per chunk.")
@click.option("--fraction", type=click.FloatRange(0, 1, min_open=True), default=0.3, show_default=True,
              help="kde: the share of the zoo (best by validation accuracy) the densities are fitted on.")
@click.option("--contrastive-epochs", type=click.IntRange(min=0), default=0, show_default=True,
              help="d2nwg: align the dataset encoder with the weight latents first (CLIP-style); "
                   "0 keeps it a seeded random feature map.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seeds every stage.")
@click.option("--overwrite", is_flag=True, help="Replace the generator directory if it exists.")
@click.option("--no-progress", is_flag=True, help="No progress bars.")
@click.option("--json", "as_json", is_flag=True, help="Print the generator's description as JSON.")
def train(zoo_dir: Path, out: Path, method: str, subset: str | None, tasks: tuple[str, ...], checkpoints: str,
          epochs: str, chunk: int, latent_dim: int, fraction: float, contrastive_epochs: int, seed: int,
          overwrite: bool, no_progress: bool, as_json: bool) -> None:
    """Train a weight generator on the checkpoints of ZOO.

    Every checkpoint is flattened per tensor, normalized with the zoo's
    per-tensor mean and std, and cut into chunks; a VAE compresses the chunks.
    d2nwg then trains a DDPM on the models' latents conditioned on an
    embedding of each model's dataset; kde fits per-dimension kernel densities
    to the latents of the best models. The zoo must hold one architecture.

    \b
    Examples (after `wsmerge zoo build examples/zoo/digits-tasks.yaml -o runs/zoo-tasks`):
      wsmerge generate train runs/zoo-tasks -o runs/gen-all --epochs 500,1000
      wsmerge generate train runs/zoo-tasks -o runs/gen-flips --tasks digits:flip=h --tasks digits:flip=v
    """
    from weightspace.zoo.gen.generator import train_generator

    values = _int_list(epochs, "--epochs")
    if len(values) > 2 or 0 in values:
        raise click.BadParameter(f"expected VAE[,DIFFUSION] epochs >= 1, got {epochs!r}", param_hint="--epochs")
    vae_epochs, diffusion_epochs = values[0], values[-1]
    t0 = time.perf_counter()
    path = train_generator(zoo_dir, out, method=method, subset=subset, tasks=list(tasks) or None,
                           checkpoints=checkpoints, chunk=chunk, latent_dim=latent_dim, vae_epochs=vae_epochs,
                           diffusion_epochs=diffusion_epochs, contrastive_epochs=contrastive_epochs,
                           fraction=fraction, seed=seed, overwrite=overwrite, progress=_progress(no_progress))
    meta = json.loads((path / "generator.json").read_text())
    if as_json:
        click.echo(json.dumps({k: v for k, v in meta.items() if k != "tokenizer"}, indent=2))
        return
    tok = meta["tokenizer"]
    n_chunks = sum(-(-_numel(s) // tok["chunk"]) for s in tok["shapes"])
    click.echo(f"{path}: {method} generator for {meta['arch']} on {meta['settings']['models']} checkpoints "
               f"of {len(meta['tasks'])} task(s) ({time.perf_counter() - t0:.1f} s)")
    click.echo(f"  tensors    {len(tok['names'])} generated"
               + (f", {len(meta['kept_tensors'])} kept from the best zoo model" if meta["kept_tensors"] else "")
               + f"; {n_chunks} chunks of {tok['chunk']} -> latent {n_chunks * meta['settings']['latent_dim']}")
    h = meta["history"]
    click.echo(f"  vae        loss {h['vae_loss'][0]:.4g} -> {h['vae_loss'][-1]:.4g}; reconstruction MSE "
               f"{h['vae_reconstruction_mse']:.3g} (normalized weights)")
    if method == "d2nwg":
        pca = meta["diffusion"]["pca"]
        click.echo(f"  diffusion  loss {h['diffusion_loss'][0]:.4g} -> {h['diffusion_loss'][-1]:.4g} on "
                   f"{pca['components']} principal coordinates ({pca['variance_kept']:.1%} of latent variance)")
    else:
        for key, s in meta["kde"]["samplers"].items():
            click.echo(f"  kde        {key}: {s['anchors']} of {s['of']} models, median bandwidth "
                       f"{s['median_bandwidth']:.3g}")
    for t in meta["tasks"]:
        acc = t["best_val_acc"]
        best = f", best val acc {acc:.3f}" if acc is not None else ""
        click.echo(f"  task       {t['dataset']}: {t['checkpoints']} checkpoints, "
                   f"classes {_ranges(t['classes'])}{best}")


def _numel(shape: list[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _ranges(values: list[int]) -> str:
    from weightspace.zoo.gen.generator import _ranges as ranges

    return ranges(values)


@generate.command()
@click.argument("gen_dir", metavar="GEN", type=click.Path(file_okay=False, path_type=Path))
@click.option("--data", required=True, help="The dataset to generate for (a zoo dataset reference).")
@click.option("-n", "n", type=click.IntRange(min=1), default=20, show_default=True, help="How many models.")
@click.option("-o", "--out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Directory for the samples (sample-000, sample-001, ...), written atomically.")
@click.option("--seed", type=int, default=0, show_default=True, help="The same seed gives the same samples.")
@click.option("--steps", type=click.IntRange(min=1), default=None,
              help="d2nwg: DDIM with this many steps. Default: the full ancestral DDPM chain (best samples).")
@click.option("--eta", type=click.FloatRange(min=0), default=1.0, show_default=True,
              help="d2nwg with --steps: DDIM noise (1: DDPM-like, 0: deterministic).")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
@click.option("--json", "as_json", is_flag=True, help="Print the sample paths as JSON.")
def sample(gen_dir: Path, data: str, n: int, out: Path, seed: int, steps: int | None, eta: float,
           overwrite: bool, as_json: bool) -> None:
    """Generate N models for DATA with the generator GEN.

    Each sample is a zoo checkpoint (model.safetensors + config.json with
    `generated_by`). DATA must have the generator's input shape and only
    classes some training task had; a dataset the generator was not trained on
    (a rotation, a corruption) is embedded (d2nwg) or served by the pooled
    sampler (kde), with a note.

    \b
    Examples (after the `wsmerge generate --help` examples):
      wsmerge generate sample runs/gen --data digits -n 20 -o runs/samples-digits
      wsmerge generate sample runs/gen --data digits:rotate=180 -n 20 -o runs/samples-rot180 --seed 1
    """
    from weightspace.zoo.gen.generator import sample as sample_models

    t0 = time.perf_counter()
    paths = sample_models(gen_dir, data, n, out, seed=seed, steps=steps, eta=eta, overwrite=overwrite,
                          note=lambda m: click.echo(f"note: {m}", err=True))
    if as_json:
        click.echo(json.dumps({"samples": [str(p) for p in paths]}, indent=2))
        return
    click.echo(f"{out}: {len(paths)} models for {data} ({time.perf_counter() - t0:.2f} s); "
               f"evaluate them with `wsmerge generate eval {out} --data {data}`")


@generate.command(name="eval")
@click.argument("samples", type=click.Path(exists=True, path_type=Path))
@click.option("--data", required=True, help="The dataset to score on (test split).")
@click.option("--zoo", "zoo_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Compare with this zoo (its models on DATA, nearest models for memorization). "
                   "Default: the zoo the generator was trained on, if it is still there.")
@click.option("--epochs", default="0,1", show_default=True, metavar="K,K,...",
              help="Fine-tuning epochs to report (0: zero-shot).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seeds fine-tuning and random inits.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@click.option("--json", "as_json", is_flag=True, help="The full report as JSON.")
def eval_(samples: Path, data: str, zoo_dir: Path | None, epochs: str, seed: int, no_progress: bool,
          as_json: bool) -> None:
    """Score generated models on DATA against random init and the zoo; check memorization.

    Accuracy on DATA's test split, zero-shot and after K epochs of fine-tuning
    with the zoo's training settings, for the samples and for as many random
    inits trained the same way. Memorization: each sample's nearest zoo model
    (RMS distance in units of the zoo's per-tensor std) and the overlap of
    their errors (Jaccard), next to the same numbers between zoo neighbours.

    \b
    Example (after the `wsmerge generate --help` examples):
      wsmerge generate eval runs/samples --data digits:rotate=90 --epochs 0,1,5
    """
    from weightspace.zoo.gen.evaluate import evaluate_samples

    ks = _int_list(epochs, "--epochs")
    report = evaluate_samples(samples, data, zoo_dir=zoo_dir, finetune_epochs=ks, seed=seed,
                              progress=_progress(no_progress))
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    keys = [str(k) for k in report["epochs"]]
    click.echo(f"{data}: {len(report['samples'])} samples, test accuracy (chance {report['chance']:.2f}); "
               f"fine-tuning: {report['finetune']['optimizer']} lr {report['finetune']['lr']:g}")
    head = "".join(f"{'epoch ' + k:>24}" for k in keys)
    click.echo(f"{'':<14}{head}")
    click.echo(f"{'':<14}" + "".join(f"{'best':>8}{'mean':>8}{'median':>8}" for _ in keys))

    def line(label: str, table: dict) -> None:
        cells = "".join(_cells(table.get(k)) for k in keys)
        click.echo(f"{label:<14}{cells}")

    line("generated", report["generated"])
    line("random init", report["random_init"])
    z = report["zoo"]
    if z is not None:
        if any(z["at_epoch"][k]["n"] for k in keys):
            line("zoo", z["at_epoch"])
        click.echo(f"zoo final ({'/'.join(map(str, z['trained_epochs']))} epochs, {z['n']} models): best "
                   f"{z['best']:.3f}  mean {z['mean']:.3f}  median {z['median']:.3f}")
    elif report.get("zoo_dir"):
        click.echo(f"zoo: no models trained on {data} in {report['zoo_dir']}")
    m = report["memorization"]
    if m is None:
        click.echo("memorization: no zoo to compare with (pass --zoo)")
        return
    ref = m["zoo_reference"]
    click.echo(f"memorization vs {m['zoo_models']} zoo models:")
    click.echo(f"  nearest-model distance  median {m['distance']['median']:.3f}  min {m['distance']['min']:.3f}"
               + (f"   (zoo neighbours: median {ref['distance_median']:.3f})" if ref["distance_median"] is not None
                  else ""))
    click.echo(f"  error overlap (Jaccard) median {m['jaccard']['median']:.3f}  max {m['jaccard']['max']:.3f}"
               + (f"   (zoo neighbours: median {ref['jaccard_median']:.3f})" if ref["jaccard_median"] is not None
                  else ""))
    click.echo("  distance: RMS in units of each tensor's std over the zoo (0 = a copy); smaller than "
               "between zoo neighbours, with a higher error overlap, means near-copies")


def _cells(s: dict | None) -> str:
    if not s or not s.get("n"):
        return f"{'-':>8}{'-':>8}{'-':>8}"
    return f"{s['best']:>8.3f}{s['mean']:>8.3f}{s['median']:>8.3f}"
