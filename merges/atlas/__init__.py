"""aTLAS: task vectors composed with learned, per-block (anisotropic) coefficients.

    adapter = ClassifierAdapter(model)                          # runs the base's architecture
    coeffs = learn_coefficients(adapter, base, [ft_a, ft_b], batches, objective="supervised")
    save_coefficients(coeffs, "coeffs.safetensors")

    merge_method: atlas
    base_model: ./base
    models: [{model: ./ft_a}, {model: ./ft_b}]          # the coefficient file's task order
    parameters: {coefficients: coeffs.safetensors}

The merged model is

    theta = theta_0 + sum_i sum_b lambda_(i,b) tau_(i,b),    tau_i = theta_i - theta_0,

with one coefficient per task vector i and block b, a block being one floating-point
parameter tensor (weights and biases apart), named as in the IR. With `partitions`
P > 1 each tensor's entries are split into P seeded groups (`partition_ids`), each
with its own coefficient (aTLAS x P). Only the coefficients are trained: every step
rebuilds theta from the fixed task vectors and runs it through the adapter
(`torch.func.functional_call`); the backbone is never modified.

Zhang et al. 2024, "Knowledge Composition using Task Vectors with Learned Anisotropic
Scaling" (NeurIPS 2024, arXiv:2407.02880; github.com/fredzzhang/atlas).

Choices (the authors' code where it is explicit):
- AdamW on the coefficients only (weight decay 0.1), gradient-norm clipping at 1.0, a
  cosine learning-rate decay without warm-up. The learning rate is 1e-3 by default and
  1e-1 with `few_shot=True` (the authors' few-shot runs), since a few labelled examples
  give few steps.
- Objectives: `supervised` (cross-entropy on labels), `entropy` (mean Shannon entropy of
  the predictions, AdaMerging's test-time objective) and `pseudo-label` (cross-entropy on
  the model's own argmax, counted only where its probability reaches `threshold`;
  unlike the authors' code, low-confidence samples are really left out).
- `budget`: |dL/dlambda| summed over one pass over the data at lambda = 0 scores each
  coefficient; the best `budget` task vectors (mean score over blocks) or, per block,
  the best `budget` task vectors are kept, the others fixed at 0 (and their task
  vectors freed).
- `gradient_free=True`: a seeded (1+1) evolution strategy with the 1/5th success rule.
  Each step perturbs every free coefficient by sigma * N(0, 1) and keeps the candidate
  when its objective on the step's batch is lower than the current one's on the same
  batch (two forward passes, no backward); sigma starts at `lr` (default 0.1), grows by
  e^(1/3) on a success and shrinks by e^(-1/12) on a failure.
- A task vector from another base is refused: ||theta_i - theta_0|| / ||theta_0|| (over
  all floating tensors) above `max_relative_norm` (1.0). Two unrelated models of one
  shape sit near sqrt(2) ~ 1.4; a fine-tune moves far less (about 0.01-0.1 for
  pre-trained transformers, 0.5 for a digits MLP fine-tuned hard from a weak base).
- Memory: the task vectors are held once in `tv_dtype` (default: the model's dtype when
  it is 16-bit, so bf16 for a bf16 LM; float16 for a float32 model) and the base in the
  model's compute dtype, shared with the module's own tensors where they hold it; the
  merged parameters of a step are in the compute dtype and transient. Only the
  coefficients, their gradients and optimizer state are float32. `meta["memory"]` reports
  the bytes.

Where things are: `coefficients` (the Coefficients type and its file), `blocks` (partition
ids and the composition a block takes), `task_vectors` (the fixed task vectors on the
device), `objectives`, `data` (few-shot selection, batch checks), `budget`, `optimizers`
(AdamW, (1+1)-ES), `learn` (learn_coefficients) and `method` (the registered `atlas`
merge method, apply_coefficients).
"""

from __future__ import annotations

from weightspace.merges.atlas.blocks import compose, partition_ids, partition_ids_range
from weightspace.merges.atlas.coefficients import (
    Coefficients,
    cached_coefficients,
    load_coefficients,
    save_coefficients,
)
from weightspace.merges.atlas.coefficients import is_coefficients_file as is_coefficients_file
from weightspace.merges.atlas.data import few_shot
from weightspace.merges.atlas.learn import learn_coefficients
from weightspace.merges.atlas.method import Atlas, apply_coefficients  # registers `atlas`
from weightspace.merges.atlas.objectives import (
    entropy_loss,
    pseudo_label_loss,
    supervised_loss,
    ufm_loss,
)

# is_coefficients_file (how `wsmerge inspect` recognises a coefficients file) is reachable
# here too, outside __all__
__all__ = [
    "Atlas",
    "Coefficients",
    "apply_coefficients",
    "cached_coefficients",
    "compose",
    "entropy_loss",
    "few_shot",
    "learn_coefficients",
    "load_coefficients",
    "partition_ids",
    "partition_ids_range",
    "pseudo_label_loss",
    "save_coefficients",
    "supervised_loss",
    "ufm_loss",
]
