"""RegMean: merge linear layers by solving the regression their inputs define.

    grams = gram_matrices(HFCausalLMAdapter(model), batches)     # in memory, small models
    save_gram(grams, "ft_a.gram.safetensors")
    write_grams(adapter, batches, "ft_a-gram")                   # streamed to a sharded directory

    merge_method: regmean
    models:
      - {model: ./ft_a, parameters: {gram: ./ft_a.gram.safetensors}}
      - {model: ./ft_b, parameters: {gram: ./ft_b-gram}}
    parameters: {alpha: 0.1}

For a linear layer y = x W^T + b with weights W_i (out, in) in model i and the
inputs X_i that layer saw on model i's data, RegMean picks the W that best
reproduces every model's outputs on its own inputs,

    W* = argmin_W  sum_i w_i ||X_i W^T - X_i W_i^T||^2 / N_i
       = (sum_i w_i G~_i)^-1  sum_i w_i G~_i W_i^T           (transposed back to (out, in))

with G_i = X_i^T X_i / N_i the layer's input Gram matrix (a mean over tokens,
padding excluded) and G~_i = alpha G_i + (1 - alpha) diag(G_i) the Gram with
its off-diagonal entries shrunk. alpha = 1 is the exact regression; alpha = 0
is a per-input-feature weighted average (feature j of model i weighted by
w_i G_i[j, j]). Every other tensor (biases, norms, embeddings) is the
`weight`-weighted average.

Jin et al. 2023, "Dataless Knowledge Fusion by Merging Weights of Language
Models" (ICLR 2023, arXiv:2212.09849).

Authors' code: github.com/bloomberg/dataless-model-merging. `alpha` is their
`regmean_reduce_nondiag` (src/model_merge/avg_merger.py, `reduce_non_diag`: off-diagonal
entries times alpha, the diagonal kept), 0.1 in their emotion and NER configs (0.9 in
DeBERTa NER; unset, i.e. 1, in the GLUE ones); the Grams are their `compute_grams`
(src/model_merge/local_trainer.py), a running X^T X / N over every token the layer sees,
padding included, which `padding="include"` reproduces (the default leaves padding out).

Linear kinds: `nn.Linear`, transformers' GPT-2 `Conv1D` (weight (in, out)) and
`nn.Conv1d/2d` (Gram of the unfolded patches), see `layers`. Tied layers (an lm_head
sharing the input embedding), grouped, transposed and 3-D convolutions get no Gram and are
averaged; the Gram file lists them under `skipped`, `wsmerge gram` prints them and a RegMean
merge names them in its notes.

Files: `layers` (which layers, their rows), `grams` (accumulation in passes), `files`
(Gram files and directories), `method` (the solve and the registered method).
"""

from __future__ import annotations

from weightspace.merges.regmean.files import GRAM_INFO, gram_info, save_gram, write_grams
from weightspace.merges.regmean.grams import GRAM_DTYPES, GRAM_KIND, GramRun, gram_matrices
from weightspace.merges.regmean.layers import FALLBACK_REASONS, describe_skipped, find_layers
from weightspace.merges.regmean.method import RegMean, regmean_solve, shrink_off_diagonal

__all__ = ["FALLBACK_REASONS", "GRAM_DTYPES", "GRAM_INFO", "GRAM_KIND", "GramRun", "RegMean",
           "describe_skipped", "find_layers", "gram_info", "gram_matrices", "regmean_solve",
           "save_gram", "shrink_off_diagonal", "write_grams"]
