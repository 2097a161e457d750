"""`wsmerge generate ...`: train a weight generator on a zoo, sample models from it, evaluate them."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import click

from weightspace.bounds import MAX_SAMPLES
from weightspace.cli.options import GreedyOption, Group


@click.group(cls=Group)
def generate() -> None:
    """Weight generators: learn a zoo's weights, then sample new models for a dataset.

    \b
    d2nwg  latent diffusion conditioned on a dataset embedding (Soro et al., ICLR 2025):
           weights -> chunks -> VAE latents -> DDPM over them, given an embedding of
           the dataset's examples by an encoder trained with it; an unseen dataset
           with seen classes gets weights too
    kde    samples next to the VAE latents of the zoo's best 30 % (Schurholt et al.,
           NeurIPS 2022, their sampler); per task when the zoo has several
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
@click.option("--chunk", type=click.IntRange(min=1, max=65_536), default=64, show_default=True,
              help="Values per chunk (each tensor is cut into chunks; its last one padded).")
@click.option("--latent-dim", type=click.IntRange(min=1, max=4096), default=16, show_default=True,
              help="VAE latent size per chunk.")
@click.option("--fraction", type=click.FloatRange(0, 1, min_open=True), default=0.3, show_default=True,
              help="kde: the share of the zoo (best by validation accuracy) the densities are fitted on.")
@click.option("--encoder", "encoder_mode", type=click.Choice(["joint", "random"]), default="joint",
              show_default=True,
              help="d2nwg: train the dataset encoder with the diffusion loss (the authors' setting), or "
                   "keep it a seeded random feature map.")
@click.option("--contrastive-epochs", type=click.IntRange(min=0), default=0, show_default=True,
              help="d2nwg: align the dataset encoder with the weight latents first (CLIP-style).")
@click.option("--kde-sampler", type=click.Choice(["anchor", "independent"]), default="anchor", show_default=True,
              help="kde: next to one anchor, all dimensions together (the authors' sampler), or every "
                   "latent dimension on its own.")
@click.option("--bandwidth", default=None, metavar="H|scott|silverman",
              help="kde: kernel bandwidth in latent units, or a rule. Default: 0.002 (the authors') for "
                   "anchor, scott for independent.")
@click.option("--vae-from", type=click.Path(file_okay=False, path_type=Path), default=None, metavar="GEN",
              help="Reuse the chunk VAE of this generator (trained on the same zoo, tasks and subset).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seeds every stage.")
@click.option("--overwrite", is_flag=True, help="Replace the generator directory if it exists.")
@click.option("--no-progress", is_flag=True, help="No progress bars.")
@click.option("--json", "as_json", is_flag=True, help="Print the generator's description as JSON.")
def train(zoo_dir: Path, out: Path, method: str, subset: str | None, tasks: tuple[str, ...], checkpoints: str,
          epochs: str, chunk: int, latent_dim: int, fraction: float, encoder_mode: str, contrastive_epochs: int,
          kde_sampler: str, bandwidth: str | None, vae_from: Path | None, seed: int,
          overwrite: bool, no_progress: bool, as_json: bool) -> None:
    """Train a weight generator on the checkpoints of ZOO.

    Every checkpoint is flattened per tensor, normalized with the zoo's
    per-tensor mean and std, and cut into chunks; a VAE compresses the chunks.
    d2nwg then trains a DDPM on the models' latents conditioned on an
    embedding of each model's dataset (5 examples per class, redrawn every
    step), training the dataset encoder with it; kde keeps the latents of the
    best models and samples next to them. The zoo must hold one architecture.

    \b
    Examples (after `wsmerge zoo build examples/zoo/digits-tasks.yaml -o runs/zoo-tasks`):
      wsmerge generate train runs/zoo-tasks -o runs/gen-all --epochs 500,1000
      wsmerge generate train runs/zoo-tasks -o runs/gen-flips --tasks digits:flip=h --tasks digits:flip=v
    """
    from weightspace.zoo.gen.generator import train_generator

    values = _int_list(epochs, "--epochs")
    band: str | float | None = bandwidth
    if bandwidth is not None and bandwidth not in ("scott", "silverman"):
        try:
            band = float(bandwidth)
        except ValueError:
            raise click.BadParameter(f"expected a positive number, scott or silverman, got {bandwidth!r}",
                                     param_hint="--bandwidth") from None
        if not band > 0:
            raise click.BadParameter(f"expected a positive number, got {bandwidth!r}", param_hint="--bandwidth")
    if len(values) > 2 or 0 in values:
        raise click.BadParameter(f"expected VAE[,DIFFUSION] epochs >= 1, got {epochs!r}", param_hint="--epochs")
    vae_epochs, diffusion_epochs = values[0], values[-1]
    t0 = time.perf_counter()
    path = train_generator(zoo_dir, out, method=method, subset=subset, tasks=list(tasks) or None,
                           checkpoints=checkpoints, chunk=chunk, latent_dim=latent_dim, vae_epochs=vae_epochs,
                           diffusion_epochs=diffusion_epochs, encoder=encoder_mode,
                           contrastive_epochs=contrastive_epochs, fraction=fraction, kde_sampler=kde_sampler,
                           bandwidth=band, vae_from=vae_from, seed=seed, overwrite=overwrite,
                           progress=_progress(no_progress))
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
        click.echo(f"  encoder    {meta['encoder']['training']} ({meta['encoder']['k']} examples per class, "
                   f"redrawn every step)")
    else:
        click.echo(f"  kde        sampler {meta['kde']['sampler']}")
        for key, s in meta["kde"]["samplers"].items():
            click.echo(f"  kde        {key}: {s['anchors']} of {s['of']} models, median bandwidth "
                       f"{s['median_bandwidth']:.3g} (anchors' median std {s['median_anchor_std']:.3g})")
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
@click.option("-n", "n", type=click.IntRange(min=1, max=MAX_SAMPLES), default=20, show_default=True,
              help=f"How many models (at most {MAX_SAMPLES:,}).")
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
    inits trained the same way. Memorization: each sample's nearest training
    model (RMS distance in units of the zoo's per-tensor std) and how alike
    their errors are (error consistency normalized by chance and by the most
    the accuracies allow: 1 as alike as possible), next to the same between zoo
    neighbours and between a training model and its autoencoder copy.

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
        click.echo(f"memorization: the zoo at {report['zoo_dir']} holds none of the models the generator "
                   f"learned from (with these tensor shapes)" if report.get("zoo_dir")
                   else "memorization: no zoo to compare with (pass --zoo)")
        return
    ref, copy = m["zoo_reference"], m.get("autoencoder_copy")
    click.echo(f"memorization vs {m['zoo_models']} zoo models ({m['reference']}):")
    click.echo(f"{'':<29}{'distance':>10}{'consistency':>13}")

    def mem_line(label: str, dist: float | None, cons: float | None) -> None:
        cells = "".join(f"{'-' if v is None else f'{v:.3f}':>{w}}" for v, w in ((dist, 10), (cons, 13)))
        click.echo(f"  {label:<27}{cells}")

    mem_line("samples (median)", m["distance"]["median"], m["consistency"]["median"])
    mem_line("zoo neighbours (median)", ref["distance_median"], ref["consistency_median"])
    if copy is not None:
        mem_line("autoencoder copy (median)", copy["distance_median"], copy["consistency_median"])
    click.echo("  distance: to the nearest training model, in units of each tensor's std over the zoo (0: a copy)")
    click.echo("  consistency: of their errors on DATA (0: chance, 1: as alike as the accuracies allow)")
    click.echo("  near the autoencoder copy: copies; near zoo neighbours: as new as a retrained model")


def _cells(s: dict | None) -> str:
    if not s or not s.get("n"):
        return f"{'-':>8}{'-':>8}{'-':>8}"
    return f"{s['best']:>8.3f}{s['mean']:>8.3f}{s['median']:>8.3f}"
