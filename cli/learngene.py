"""`wsmerge learngene ...`: fit or train a learngene, expand it to any depth, inspect it."""

from __future__ import annotations

import json
import math
import sys
import time
import warnings
from pathlib import Path

import click

from weightspace.bounds import MAX_DEPTH
from weightspace.cli.options import Group, check_plot, device_option


@click.group(cls=Group)
def learngene() -> None:
    """Learngene: a few layer-shaped tensors that initialize networks of any depth.

    \b
    TLEG (linear expansion, Xia et al., AAAI 2024): two tensors A, B per layer tensor,
      theta_l = A + (l / L) B,   l = 0 .. L-1,   L = the depth being built
      (--denominator L-1: theta_l = A + l/(L-1) B, the last layer at A + B).
    SWS (stage-wise weight sharing, Xia et al., IJCAI 2024): S stage tensors; the layers
      are assigned to stages in order (--stages 2,3,2) and every layer of stage s is G_s.
      Without --stages the depth is split evenly, earlier stages taking the extra layers
      (7 layers over 3 stages: 3,2,2; 2 layers over 3 stages: 1,0,1, the middle one skipped).
    Embeddings, final norm and head are kept as they are.

    \b
    Examples (from the repository root):
      wsmerge learngene fit examples/models/base -o runs/base.gene     # training-free: least squares
      wsmerge learngene expand runs/base.gene --depth 8 -o runs/base-x8   # config.json depth rewritten
      wsmerge learngene inspect runs/base.gene --plot runs/base-gene.png  # residual per layer, tensor
      wsmerge learngene train --teacher examples/digits/base --data digits --aux-depth 4 --epochs 1 \\
          -o runs/digits.gene                                          # distilled from a teacher
    """


def _stages(text: str | None):
    from weightspace.merges.learngene import parse_stages

    return parse_stages(text)


def _check_out(out: Path, overwrite: bool, *inputs: str | Path | None) -> None:
    from weightspace.files import check_output

    check_output(out, overwrite, inputs=inputs)


@learngene.command()
@click.argument("model")
@click.option("-o", "--out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Output gene directory, written atomically.")
@click.option("--mode", type=click.Choice(["tleg", "sws"]), default="tleg", show_default=True,
              help="tleg: A, B by least squares over depth; sws: the mean of each stage's layers.")
@click.option("--denominator", type=click.Choice(["L", "L-1"]), default="L", show_default=True,
              help="tleg: x_l = l/L (the authors' code) or l/(L-1).")
@click.option("--stages", default=None,
              help="sws: a stage count (3, split evenly) or layer counts per stage adding up to the "
                   "depth (2,3,2). Default: 3 stages.")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
def fit(model: str, out: Path, mode: str, denominator: str, stages: str | None, overwrite: bool) -> None:
    """Fit a gene to a trained MODEL, without training.

    \b
    TLEG: per tensor entry, the least-squares line over depth
      theta_l ~ A + x_l B,  x_l = l/L   (closed form, float64)
    SWS: stage s's tensor is the mean of the layers assigned to stage s.
    The residual ||theta - fit|| / ||theta|| (overall, per layer, per tensor) is
    stored in the gene and printed; expanding the gene to MODEL's depth gives the fit.
    Streams one per-layer tensor name at a time (two passes over its layers).

    \b
    Examples (from the repository root; the tiny Llama has 4 layers):
      wsmerge learngene fit examples/models/base -o runs/base.gene
      wsmerge learngene fit examples/models/base -o runs/base-sws.gene --mode sws --stages 1,2,1
    """
    from weightspace.merges.learngene import fit_gene, save_gene
    from weightspace.sources import load_space

    _check_out(out, overwrite, model)
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gene = fit_gene(load_space(model), mode=mode, denominator=denominator, stages=_stages(stages))
    for w in caught:
        click.echo(f"warning: {w.message}", err=True)
    save_gene(gene, out, overwrite=overwrite)
    rep = gene.meta["report"]
    click.echo(f"{out}: {_describe(gene)} fitted to {model} in {time.perf_counter() - t0:.1f} s")
    click.echo(f"relative residual ||theta - fit|| / ||theta||: {_fmt(rep['relative_residual'])} overall")
    click.echo("per layer: " + " ".join(_fmt(r, ".3f") for r in rep["per_layer"]))
    worst = sorted(rep["suffixes"], key=lambda r: -(r["relative_residual"] or 0.0))[:5]
    click.echo("worst fitted tensors: " + ", ".join(f"{r['suffix']} {_fmt(r['relative_residual'], '.3f')}"
                                                    for r in worst))


@learngene.command()
@click.option("--teacher", required=True, help="A trained zoo checkpoint (model_type weightspace-zoo).")
@click.option("--data", required=True, help="Zoo dataset reference (digits, digits:classes=0-4, ...).")
@click.option("-o", "--out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Output gene directory, written atomically.")
@click.option("--mode", type=click.Choice(["tleg", "sws"]), default="tleg", show_default=True)
@click.option("--preset", type=click.Choice(["default", "authors"]), default="default", show_default=True,
              help="The recipe of every option below left unset: default (ours, for a short run) or "
                   "authors (TLEG's and SWS's code: T 1, alpha 1, KL / every logit, 150 epochs, "
                   "lr 5e-4 x batch/512, 5 warm-up epochs, min lr 1e-5, no decay on 1-D tensors, no "
                   "clipping, 12 layers (tleg) or 16 in stages 3,3,4,3,3 (sws)).")
@click.option("--aux-depth", type=click.IntRange(min=1, max=MAX_DEPTH), default=None,
              help="Layers of the auxiliary network the gene is trained in (default 6; authors 12 tleg, 16 sws).")
@click.option("--stages", default=None,
              help="sws: stage count or layer counts per stage adding up to --aux-depth "
                   "(default 3 stages; authors 3,3,4,3,3 at 16 layers, else 5).")
@click.option("--denominator", type=click.Choice(["L", "L-1"]), default="L", show_default=True)
@click.option("--init", type=click.Choice(["random", "fit"]), default="random", show_default=True,
              help="random: the architecture's seeded init; fit: start from a fit of the teacher.")
@click.option("--epochs", type=click.IntRange(min=1), default=None,
              help="Passes over the data (default 10; authors 150).")
@click.option("--steps", type=click.IntRange(min=1), default=None, help="Optimizer steps instead of --epochs.")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Peak learning rate (default 1e-3; authors 5e-4 x batch size / 512).")
@click.option("--warmup-epochs", type=click.FloatRange(min=0), default=None,
              help="Linear warm-up, in passes over the data (default 0; authors 5, from 1e-6).")
@click.option("--weight-decay", type=click.FloatRange(min=0), default=None,
              help="AdamW weight decay (default 0.05 on every tensor; authors 0.05, none on 1-D tensors).")
@click.option("--temperature", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Distillation temperature T (default 2; authors 1).")
@click.option("--alpha", type=click.FloatRange(0, 1), default=None,
              help="Weight of the distillation term; 1 - alpha on cross-entropy with the labels "
                   "(default 0.5; authors 1).")
@click.option("--kd-reduction", type=click.Choice(["batchmean", "mean"]), default=None,
              help="Divide the summed KL by the predictions (batchmean, the default) or by every logit "
                   "(mean, the authors': C times smaller).")
@click.option("--split", type=click.Choice(["train", "val", "test"]), default="train", show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--n-examples", type=click.IntRange(min=1), default=None, help="Use at most this many examples.")
@device_option
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
def train(teacher: str, data: str, out: Path, mode: str, preset: str, aux_depth: int | None, stages: str | None,
          denominator: str, init: str, epochs: int | None, steps: int | None, lr: float | None,
          warmup_epochs: float | None, weight_decay: float | None, temperature: float | None,
          alpha: float | None, kd_reduction: str | None, split: str, batch_size: int,
          n_examples: int | None, device: str, seed: int, overwrite: bool, no_progress: bool) -> None:
    """Train a gene by distillation: an auxiliary network built from it learns from TEACHER.

    \b
    The auxiliary network has the teacher's architecture at --aux-depth layers; its
    layer tensors are computed from the gene every step (TLEG: A + (l/L) B; SWS: the
    stage's tensor), and only the gene and the non-layer tensors are trained, with
      loss = alpha T^2 KL(softmax(teacher/T) || softmax(student/T)) + (1 - alpha) CE(student, y)
    (AdamW, warm-up then cosine decay). Then expand the gene to any depth.
    --preset authors runs the recipe of the TLEG and SWS code (pure distillation at T 1,
    150 epochs, ...; their data augmentation is not reproduced).

    \b
    Examples (from the repository root; any zoo checkpoint can teach):
      wsmerge learngene train --teacher examples/digits/base --data digits \\
          --mode sws --aux-depth 3 --epochs 1 -o runs/digits-sws.gene
      wsmerge learngene expand runs/digits-sws.gene --depth 6 -o runs/digits-x6
      wsmerge learngene train --teacher examples/digits/base --data digits --preset authors \\
          --aux-depth 4 --epochs 8 -o runs/digits-authors.gene
    """
    from weightspace.errors import SpecError
    from weightspace.merges.learngene import save_gene, train_gene
    from weightspace.sources import load_space
    from weightspace.zoo.arch import build_model
    from weightspace.zoo.bind import open_batches, open_model

    _check_out(out, overwrite, teacher, data)
    cfg = load_space(teacher).meta.get("config") or {}
    if cfg.get("model_type") != "weightspace-zoo":
        raise SpecError(f"--teacher {teacher}: `learngene train` takes a zoo checkpoint (config.json with "
                        f"model_type weightspace-zoo); for transformers models call "
                        f"weightspace.merges.learngene.train_gene with a student_factory, or use `learngene fit`")
    adapter = open_model(teacher)
    arch, shape, classes = dict(cfg["arch"]), tuple(cfg["input_shape"]), int(cfg["num_classes"])

    def factory(depth: int):
        return build_model({**arch, "depth": depth}, shape, classes)

    batches = open_batches(data, adapter, split=split, batch_size=batch_size, n_examples=n_examples)
    from weightspace.merges.learngene.recipe import preset_setting

    depth = aux_depth if aux_depth is not None else preset_setting(preset, "aux_depth", mode)
    with warnings.catch_warnings():  # said below as a warning line, from the report
        warnings.filterwarnings("ignore", message="train_gene: the warm-up")
        gene = train_gene(factory, adapter, batches, mode=mode, preset=preset, aux_depth=depth, stages=_stages(stages),
                          denominator=denominator, temperature=temperature, alpha=alpha, kd_reduction=kd_reduction,
                          epochs=epochs, steps=steps, lr=lr, warmup_epochs=warmup_epochs, weight_decay=weight_decay,
                          seed=seed, init=init, config={**cfg, "arch": {**arch, "depth": depth}}, device=device,
                          progress=not no_progress and sys.stderr.isatty())
    gene.meta["provenance"].update({"teacher": teacher, "data": data, "split": split})
    save_gene(gene, out, overwrite=overwrite)
    r = gene.meta["report"]
    click.echo(f"{out}: {_describe(gene)} trained in {r['seconds']:.1f} s ({r['steps']} steps, "
               f"{r['examples']} examples; preset {r['preset']}: lr {r['lr']:.3g}, T {r['temperature']:g}, "
               f"alpha {r['alpha']:g}, KL {r['kd_reduction']}, {r['warmup_steps']} warm-up steps)")
    click.echo(f"loss {_fmt(r['loss_start'])} -> {_fmt(r['loss_end'])}   distillation {_fmt(r['kd_start'])} -> "
               f"{_fmt(r['kd_end'])}   cross-entropy {_fmt(r['ce_start'])} -> {_fmt(r['ce_end'])}")
    click.echo(f"accuracy {_fmt(r['acc_start'], '.3f')} -> {_fmt(r['acc_end'], '.3f')} on the training "
               f"data (chance {_fmt(r['chance'], '.3f')})")
    if r.get("warmup_covers_run"):
        click.echo(f"warning: the warm-up ({r['warmup_steps']} steps) is as long as the whole run "
                   f"({r['steps']} steps), so the learning rate never reached {r['lr']:.3g}; give more "
                   f"--epochs than the preset's warm-up, or a smaller --warmup-epochs", err=True)
    if r["at_chance"]:
        click.echo(f"warning: the auxiliary network is still at chance after {r['steps']} steps "
                   f"(accuracy {r['acc_end']:.3f}, chance {r['chance']:.3f}), so this gene will not "
                   f"initialize a working network; train longer (--epochs) or with a larger --lr "
                   f"(now {r['lr']:g})", err=True)


@learngene.command()
@click.argument("gene", type=click.Path(file_okay=False, path_type=Path))
@click.option("--depth", type=click.IntRange(min=1, max=MAX_DEPTH), required=True,
              help=f"Layers of the network to build (at most {MAX_DEPTH:,}).")
@click.option("-o", "--out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Output checkpoint directory, written atomically.")
@click.option("--stages", default=None,
              help="sws: layer counts per stage adding up to --depth (2,3,2; zeros skip a stage); "
                   "default: split evenly, earlier stages taking the extra layers.")
@click.option("--like", "like", default=None,
              help="Check first that the gene fits this model's architecture and width (any depth).")
@click.option("--tokenizer-from", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Copy tokenizer files from this directory (default: those the gene carries).")
@click.option("--out-dtype", type=click.Choice(["float32", "float16", "bfloat16"]), default=None,
              help="Output dtype (default: the source layers' dtype).")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists (atomically, at the end).")
def expand(gene: Path, depth: int, out: Path, stages: str | None, like: str | None,
           tokenizer_from: Path | None, out_dtype: str | None, overwrite: bool) -> None:
    """Build a DEPTH-layer checkpoint from GENE (streamed; config.json depth rewritten).

    \b
    TLEG: layer l = A + (l / DEPTH) B  (or l / (DEPTH-1) for an L-1 gene)
    SWS:  layer l = the tensor of the stage l falls in
    The output loads like the source (transformers.AutoModel.from_pretrained, or a zoo
    checkpoint) and is meant to be fine-tuned.

    \b
    Examples (after the `learngene fit` examples):
      wsmerge learngene expand runs/base.gene --depth 12 -o runs/base-x12
      wsmerge learngene expand runs/base-sws.gene --depth 7 --stages 2,3,2 -o runs/base-sws-x7
    """
    import torch

    from weightspace.merges.learngene import (
        check_compatible,
        expansion_stages,
        load_gene,
        save_expanded,
    )

    _check_out(out, overwrite, gene, like, tokenizer_from)
    g = load_gene(gene)
    if like is not None:
        check_compatible(g, like)
    st = _stages(stages)
    sizes = expansion_stages(g, depth, st)
    save_expanded(g, depth, out, stages=st, overwrite=overwrite, tokenizer_from=tokenizer_from,
                  dtype=getattr(torch, out_dtype) if out_dtype else None)
    how = (f"stages {','.join(map(str, sizes))}" if sizes is not None
           else f"layer l = A + (l/{depth if g.meta['denominator'] == 'L' else depth - 1}) B")
    key = g.meta.get("depth_key")
    click.echo(f"{out}: {depth} layers from {gene} ({how}); "
               + (f"config.json {key} = {depth}" if key else
                  ("config.json copied unchanged (no depth key found)" if g.meta.get("config") else
                   "no config.json (the source had none)")))


@learngene.command("inspect")
@click.argument("gene", type=click.Path(file_okay=False, path_type=Path))
@click.option("--plot", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write a figure (PNG/PDF/SVG): the fit residual per layer and tensor, and the "
                   "layer norms against the fitted ones (a trained gene: loss curve and layer norms).")
@click.option("--json", "as_json", is_flag=True, help="Print the gene's metadata and per-tensor summary as JSON.")
def inspect_cmd(gene: Path, plot: Path | None, as_json: bool) -> None:
    """How well GENE describes its source, tensor by tensor and layer by layer.

    \b
    A fitted gene: ||theta_l - fit_l|| / ||theta_l|| per layer and per tensor, with the
    norms of A and B (or of the stage tensors). A trained gene: the distillation run.

    \b
    Example (after `wsmerge learngene fit examples/models/base -o runs/base.gene`):
      wsmerge learngene inspect runs/base.gene --json
    """
    check_plot(plot)
    from weightspace.merges.learngene import gene_summary, load_gene

    g = load_gene(gene)
    summary = gene_summary(g)
    rep = g.meta.get("report") or {}
    fit_rows = {r["suffix"]: r for r in rep.get("suffixes", [])} if rep.get("kind") == "fit" else {}
    if as_json:
        meta = {k: v for k, v in g.meta.items() if k != "config"}
        click.echo(json.dumps({"meta": meta, "config": g.meta.get("config"), "tensors": summary},
                              indent=2, default=str))
    else:
        per_layer = sum(r["numel"] for r in summary)
        parts = 2 if g.mode == "tleg" else (g.num_stages or 0)
        non_layer = sum(g.space[n].numel for n in g.meta["non_layer"])
        click.echo(f"gene         {gene}")
        click.echo(f"form         {_describe(g)}")
        prov = g.meta.get("provenance", {})
        click.echo(f"source       {prov.get('source')} ({prov.get('method')}; {g.source_depth} layers "
                   f"under {g.prefix!r})" + (f", teacher {prov['teacher']}" if prov.get("teacher") else ""))
        click.echo(f"tensors      {len(g.suffixes)} per layer, {len(g.meta['non_layer'])} non-layer "
                   f"({non_layer:,} values, kept as they are)")
        click.echo(f"size         {parts * per_layer:,} gene values for the layers ({parts} x {per_layer:,}), "
                   f"vs {g.source_depth * per_layer:,} in {g.source_depth} layers")
        click.echo(f"config       depth key {g.meta.get('depth_key') or '-'}")
        if rep.get("kind") == "fit":
            click.echo(f"residual     {_fmt(rep['relative_residual'])} (||theta - fit|| / ||theta||, all layers)")
            click.echo("per layer    " + " ".join(_fmt(r, ".3f") for r in rep["per_layer"]))
        elif rep.get("kind") == "train":
            click.echo(f"training     {rep['steps']} steps, loss {_fmt(rep['loss_start'])} -> "
                       f"{_fmt(rep['loss_end'])}, distillation {_fmt(rep['kd_start'])} -> {_fmt(rep['kd_end'])}")
        w = max([len(r["suffix"]) for r in summary] + [6])
        if g.mode == "tleg":
            click.echo(f"{'tensor'.ljust(w)}  {'shape':>14}  {'||A||':>9}  {'||B||':>9}  {'resid':>7}")
            for r in summary:
                fr = fit_rows.get(r["suffix"], {})
                click.echo(f"{r['suffix'].ljust(w)}  {str(r['shape']):>14}  {r['norm_A']:>9.4f}  "
                           f"{r['norm_B']:>9.4f}  {_fmt(fr.get('relative_residual'), '.4f'):>7}")
        else:
            click.echo(f"{'tensor'.ljust(w)}  {'shape':>14}  stage norms{'':<6}  resid")
            for r in summary:
                fr = fit_rows.get(r["suffix"], {})
                norms = " ".join(f"{n:.3f}" for n in r["stage_norms"])
                click.echo(f"{r['suffix'].ljust(w)}  {str(r['shape']):>14}  {norms}  "
                           f"{_fmt(fr.get('relative_residual'), '.4f')}")
    if plot is not None:
        plot_gene(g, summary, plot, title=gene.name)
        click.echo(f"plot: {plot}", err=as_json)


def _describe(g) -> str:
    if g.mode == "tleg":
        return f"tleg gene, theta_l = A + (l/{g.meta['denominator']}) B"
    return f"sws gene, {g.num_stages} stages ({','.join(map(str, g.meta['stages']))} at depth {g.source_depth})"


def _fmt(x: float | None, spec: str = ".4f") -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def plot_gene(g, summary: list[dict], path: Path, title: str = "") -> Path:
    """Fit: residual per layer (one line per tensor) and ||theta_l|| vs ||fit_l|| (normalized per
    tensor). Trained: loss per step and the layer norms of the expansion at the source depth."""
    from weightspace.extras import pyplot

    plt = pyplot()
    rep = g.meta.get("report") or {}
    L = g.source_depth
    xs = list(range(L))
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(max(5.0, 0.45 * L + 3) + 2.6, 6.4))
    cmap = plt.get_cmap("tab20")
    if rep.get("kind") == "fit":
        for i, r in enumerate(rep["suffixes"]):
            ax1.plot(xs, [v if v is not None else float("nan") for v in r["per_layer"]], marker="o",
                     markersize=3, linewidth=1, color=cmap(i % 20), label=r["suffix"])
        ax1.plot(xs, [v if v is not None else float("nan") for v in rep["per_layer"]], color="black",
                 linewidth=2.2, label="all tensors")
        ax1.set_ylabel("||theta_l - fit_l|| / ||theta_l||")
        ax1.set_title("fit residual per layer", fontsize=9)
        for i, r in enumerate(rep["suffixes"]):
            scale = (sum(r["norms"]) / len(r["norms"])) or 1.0
            ax2.plot(xs, [n / scale for n in r["norms"]], "o", markersize=3, color=cmap(i % 20))
            ax2.plot(xs, [n / scale for n in r["fit_norms"]], "-", linewidth=1, color=cmap(i % 20))
        ax2.set_ylabel("||theta_l|| (dots), ||fit_l|| (lines)\n/ mean ||theta_l|| per tensor", fontsize=8)
    else:
        hist = g.meta.get("history") or []
        ax1.plot(range(1, len(hist) + 1), hist, color="#2c6fbb", linewidth=1)
        ax1.set_xlabel("step")
        ax1.set_ylabel("training loss")
        ax1.set_title("distillation run", fontsize=9)
        for i, r in enumerate(summary):
            scale = (sum(r["layer_norms"]) / len(r["layer_norms"])) or 1.0
            ax2.plot(xs, [n / scale for n in r["layer_norms"]], "-o", markersize=3, linewidth=1,
                     color=cmap(i % 20), label=r["suffix"])
        ax2.set_ylabel("||theta_l|| of the expansion\n/ its mean per tensor", fontsize=8)
    ax2.set_xlabel(f"layer l (source depth {L})")
    ax2.set_xticks(xs)
    legend_ax = ax1 if rep.get("kind") == "fit" else ax2
    legend_ax.legend(fontsize=6, ncol=1 if len(summary) <= 20 else 2, loc="upper left",
                     bbox_to_anchor=(1.01, 1.0), frameon=False)
    form = (f"A + (l/{g.meta['denominator']}) B" if g.mode == "tleg"
            else f"stages {','.join(map(str, g.meta['stages']))}")
    fig.suptitle(f"learngene {g.mode} ({form}){': ' + title if title else ''}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
