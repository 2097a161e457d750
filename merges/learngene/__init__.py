"""Learngene: a few layer-shaped tensors that initialize networks of any depth.

    gene = fit_gene(load_space("minilm"), mode="tleg")          # training-free, streamed
    save_gene(gene, "minilm.gene")
    save_expanded(load_gene("minilm.gene"), 12, "minilm-x12")   # a 12-layer BERT, config.json updated
    expand(gene, 3)["encoder.layer.2.output.dense.weight"]      # lazy: A + (2/3) B, read when pulled

Two forms of the gene, for a stack of L identical layers theta_0 .. theta_(L-1)
(every per-layer tensor, named `<prefix>.<l>.<suffix>`, on its own):

- TLEG, linear expansion (Xia et al., "Transformer as Linear Expansion of
  Learngene", AAAI 2024, arXiv:2312.05614)::

      theta_l = A + x_l B,     x_l = l / L          (denominator "L", the authors' code)
                               x_l = l / (L - 1)    (denominator "L-1": the last layer sits at A + B)

  L is the depth of the network being built, so (A, B) initialize any depth:
  a 3-layer descendant takes x = 0, 1/3, 2/3 and a 12-layer one x = 0, 1/12, ...
  With "L-1" a 1-layer network takes x = 0 (theta_0 = A).

- SWS, stage-wise weight sharing (Xia et al., "Exploring Learngene via
  Stage-wise Weight Sharing for Initializing Variable-sized Models", IJCAI
  2024, arXiv:2404.16897): S stage tensors G_0 .. G_(S-1); the layers of a
  network are assigned to stages in order (`stages`, e.g. 2,3,2 for 7 layers)
  and every layer of stage s is G_s. Without an explicit list the depth is
  split over the S stages as evenly as possible, earlier stages taking the
  extra layers (`stage_sizes`: 7 over 3 -> 3,2,2; 12 over 3 -> 4,4,4); with
  fewer layers than stages the first and last stages are kept and the ones
  between skipped evenly (2 layers over 3 stages -> 1,0,1).

Non-layer tensors (embeddings, final norm, head) are kept as they are.

Where a gene comes from:

- `fit_gene(model)`: training-free, from a trained network. TLEG fits A, B per
  tensor entry by least squares over depth (closed form, float64); SWS takes
  the mean of each stage's layers. Streamed one suffix at a time in two passes
  over its L tensors (sums, then residuals): memory is a few tensors of one
  suffix, never the stack. `meta["report"]` holds the fit residuals.
- `train_gene(...)`: the papers' method. An auxiliary network of `aux_depth`
  layers whose per-layer tensors are *computed* from the gene (A + x_l B, or
  the stage tensor) is trained by soft distillation from a teacher; only the
  gene and the non-layer tensors are parameters. `preset="authors"` runs the
  recipe of the authors' code (pure distillation at T = 1, 150 epochs, warm-up,
  no weight decay on 1-D tensors; `PRESETS`); the default is a shorter recipe
  of ours.

The gene on disk (`save_gene`, `load_gene`) is a checkpoint directory with
model.safetensors, gene.json, the source's config and its tokenizer files
(the layout is in gene.py).

Expansions rewrite the depth in the config: `num_hidden_layers` (BERT, Llama),
`n_layer` (GPT-2), `num_layers`/`n_layers`, or `arch.depth` for zoo models;
a per-layer `layer_types` list is resampled to the new depth.

Limits: one layer stack per model (an encoder-decoder with two stacks is
refused), every layer holding the same floating tensors with the same shapes.

The package, a file per job (each imports only files above it):

    layout.py        layer positions x_l, stage sizes, the shared argument checks
    config_depth.py  the depth key of config.json and a copy set to another depth
    stack.py         reading a model's one stack of identical layers
    gene.py          Gene, gene tensor names, the gene directory (save_gene, load_gene)
    fit.py           fit_gene, fit_line and the residual report
    expand.py        expand, save_expanded, check_compatible
    summary.py       gene_summary (for `wsmerge learngene inspect`)
    distill.py       distillation_loss, the teacher and its data, accuracy against chance
    recipe.py        the presets (ours, the authors'), the checked recipe, lr_at's schedule
    train.py         train_gene, in named steps
"""

from weightspace.merges.learngene.config_depth import config_with_depth, find_depth_key
from weightspace.merges.learngene.distill import distillation_loss
from weightspace.merges.learngene.expand import (
    check_compatible,
    expand,
    expansion_stages,
    save_expanded,
)
from weightspace.merges.learngene.fit import fit_gene, fit_line
from weightspace.merges.learngene.gene import (
    FORMAT,
    Gene,
    gene_name,
    is_gene_dir,
    load_gene,
    save_gene,
)
from weightspace.merges.learngene.layout import (
    DENOMINATORS,
    MODES,
    layer_position,
    layer_stages,
    parse_stages,
    stage_sizes,
)
from weightspace.merges.learngene.recipe import PRESETS, lr_at
from weightspace.merges.learngene.summary import gene_summary
from weightspace.merges.learngene.train import train_gene

__all__ = [
    "DENOMINATORS",
    "FORMAT",
    "MODES",
    "PRESETS",
    "Gene",
    "check_compatible",
    "config_with_depth",
    "distillation_loss",
    "expand",
    "expansion_stages",
    "find_depth_key",
    "fit_gene",
    "fit_line",
    "gene_name",
    "gene_summary",
    "is_gene_dir",
    "layer_position",
    "layer_stages",
    "load_gene",
    "lr_at",
    "parse_stages",
    "save_expanded",
    "save_gene",
    "stage_sizes",
    "train_gene",
]
