"""Fisher merging: a per-parameter average weighted by each model's diagonal Fisher.

    fisher = fisher_diagonal(ClassifierAdapter(model), loader, estimator="exact")
    save_fisher(fisher, "ft_a.fisher.safetensors")
    write_fisher(HFCausalLMAdapter(llama), batches, "llama-fisher", estimator="empirical",
                 max_stats_memory="2GiB")      # sharded, in parameter groups (stream.py)

    merge_method: fisher
    models:
      - {model: ./ft_a, parameters: {weight: 0.5, fisher: ./ft_a.fisher.safetensors}}
      - {model: ./ft_b, parameters: {weight: 0.5, fisher: ./ft_b.fisher.safetensors}}
    # the defaults, which are the authors' settings:
    parameters: {fisher_floor: 1.0e-6, floor_mode: max, normalize_fishers: true, favor_target: true}

Each entry of the result is

    theta* = sum_i c_i F~_i theta_i / sum_i c_i F~_i

with c_i the model's `weight`, divided by the L2 norm of model i's whole Fisher
(`normalize_fishers`), and F~_i model i's Fisher with the floor eps = `fisher_floor`:
max(F_i, eps) (`floor_mode: max`) or F_i + eps (`floor_mode: add`), for the first
model (the target) only (`favor_target`) or for every model.

Matena & Raffel 2022, "Merging Models with Fisher-Weighted Averaging" (NeurIPS 2022,
arXiv:2111.09832). The defaults follow the authors' code (github.com/mmatena/model_merging,
model_merging/merging.py, `_merge_with_coeffs`: `diag = tf.maximum(diag, fisher_floor)` for
the target only when `favor_target_model`, and `generate_merged_for_coeffs_set`: coefficients
divided by `_l2_norm_of_fisher`; scripts/merge_and_evaluate.py: fisher_floor 1e-6,
favor_target_model and normalize_fishers both True). `floor_mode: add, normalize_fishers:
false, favor_target: false` is the plain, symmetric variant (what this module did before).
Where the authors' code merges only the model body and keeps the target's head (their
heads are per task), compute the Fisher over the body and set `uncovered: first`.
"""

from weightspace.merges.fisher.estimate import (
    ESTIMATORS,
    MAX_EXACT_CLASSES,
    Estimator,
    fisher_diagonal,
)
from weightspace.merges.fisher.files import check_fisher, fisher_norms, save_fisher
from weightspace.merges.fisher.method import FLOOR_MODES, UNCOVERED, Fisher, fisher_weighted_average
from weightspace.merges.fisher.stream import output_names, write_fisher

__all__ = [
    "ESTIMATORS",
    "FLOOR_MODES",
    "MAX_EXACT_CLASSES",
    "UNCOVERED",
    "Estimator",
    "Fisher",
    "check_fisher",
    "fisher_diagonal",
    "fisher_norms",
    "fisher_weighted_average",
    "output_names",
    "save_fisher",
    "write_fisher",
]
