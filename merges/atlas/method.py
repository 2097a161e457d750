"""The `atlas` merge method: base + sum_i lambda_(i,b) tau_i, with the coefficients from a file.

    merge_method: atlas
    base_model: ./base
    models: [{model: ./ft_a}, {model: ./ft_b}]          # the coefficient file's task order
    parameters: {coefficients: coeffs.safetensors}

`apply_coefficients` computes the same merge in memory, for small models.

The spec must list the fine-tuned models in the file's task order (`wsmerge atlas show`
prints it). A file `learn_coefficients` wrote records each task vector's model (resolved
path and content fingerprint, merges/atlas/identity.py); `wsmerge run` (through the
planner's `check_models` hook, before any tensor is merged) and `apply_coefficients` refuse
models that differ from those, or come in another order, naming both lists.
`check_models: false` skips that check (the same models saved again in another dtype).
Files without fingerprints (older ones, or built by hand) are checked by number only, and
by absolute path where they name one (`check_task_order`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from weightspace.ir import WeightSpace
from weightspace.merges.atlas.blocks import compose, partition_ids, partition_ids_range
from weightspace.merges.atlas.coefficients import (
    Coefficients,
    cached_coefficients,
    check_fits,
    check_task_order,
)
from weightspace.merges.atlas.identity import check_identities
from weightspace.merges.atlas.task_vectors import as_space
from weightspace.methods import Blocked, MergeMethod, Param, TensorParams, register


def apply_coefficients(c: Coefficients, base: WeightSpace | Mapping[str, torch.Tensor],
                       finetuned: Sequence[WeightSpace | Mapping[str, torch.Tensor]], *,
                       device: str | torch.device = "cpu", check_models: bool = True) -> dict[str, torch.Tensor]:
    """The merged model's tensors, in memory: what `merge_method: atlas` writes.

        params = apply_coefficients(c, load_space("base"), [load_space("ft0"), load_space("ft1")])
        adapter.logits(params, batch)                 # evaluate learned coefficients directly

    For small models (everything is held at once); large ones stream through `wsmerge run`.
    Non-floating tensors are the base's. The fine-tunes must be the models the coefficients
    were learned for, in their order: by fingerprint where `c.models` records them, else by
    absolute path where the task names are such paths (`check_task_order`);
    `check_models=False` skips this.
    """
    base_ws = as_space(base, "the base tensors")
    fts = [as_space(f, f"fine-tuned model {i}") for i, f in enumerate(finetuned)]
    if check_models:
        _check_models(c, fts, "the coefficients")
    out = {}
    for n, ref in base_ws.items():
        b = ref.load(device)
        if not ref.dtype.is_floating_point:
            out[n] = b
            continue
        check_fits(c, n, len(fts), "the coefficients")
        ids = partition_ids(n, b.shape, c.partitions, c.seed, device) if c.partitions > 1 else None
        out[n] = compose(b, [f[n].load(device) for f in fts],
                         [c.lambda_for(i, n) for i in range(len(fts))], ids)
    return out


def _check_models(c: Coefficients, models: Sequence[WeightSpace], where: str) -> None:
    """The fine-tunes must be c's task vectors in c's order: by fingerprint where the file
    records them, else by absolute path where the task names are such paths. Another number of
    models is left to `check_fits`, which names the tensor."""
    if len(c.tasks) != len(models):
        return
    if c.models is not None:
        check_identities(c.models, models, where)
    else:
        check_task_order(c, [m.meta.get("location") for m in models], where)


@register
class Atlas(MergeMethod):
    name = "atlas"
    pretty_name = "aTLAS"
    paper = ("Zhang et al. 2024, Knowledge Composition using Task Vectors with Learned "
             "Anisotropic Scaling")
    reference_url = "https://arxiv.org/abs/2407.02880"
    uses_base = "required"
    global_params = (
        Param("coefficients", required=True, kind=str, path=True,
              doc="learned coefficients (learn_coefficients + save_coefficients, or `wsmerge atlas "
                  "learn`); the models are the fine-tunes in the file's task order"),
        Param("check_models", default=True, kind=bool,
              doc="refuse models other than the ones the file was learned for, or in another "
                  "order (by content fingerprint); false skips the check"),
    )

    def check_models(self, params: TensorParams, base, models, where) -> None:
        """The spec's fine-tunes must be the file's task vectors, in its order (fingerprints)."""
        if not params["check_models"]:
            return
        path = params["coefficients"]
        _check_models(cached_coefficients(path), models, f"coefficients file {path!r}")

    def _coefficients(self, name: str, n_models: int, params: TensorParams) -> Coefficients:
        path = params["coefficients"]
        c = cached_coefficients(path)
        check_fits(c, name, n_models, f"coefficients file {path!r}")
        return c

    def merge(self, name: str, base: torch.Tensor | None, tensors: list[torch.Tensor],
              params: TensorParams, companions: dict[str, list[torch.Tensor]]) -> torch.Tensor:
        c = self._coefficients(name, len(tensors), params)
        lambdas = [c.lambda_for(i, name) for i in range(len(tensors))]
        ids = None
        if c.partitions > 1:
            ids = partition_ids(name, base.shape, c.partitions, c.seed, device=base.device)
        return compose(base, tensors, lambdas, ids)

    def blocked(self, name: str, params: TensorParams, n_models: int) -> Blocked | None:
        """Large tensors stream in row blocks; partition ids are drawn for each block's range."""
        c = self._coefficients(name, n_models, params)
        lambdas = [c.lambda_for(i, name) for i in range(n_models)]

        def prepare(numel, sample, blocks):
            return {"numel": numel, "offset": 0}

        def merge_block(state, base_rows, model_rows):
            ids = None
            if c.partitions > 1:  # row blocks arrive in order: track the flat offset
                n = base_rows.numel()
                ids = partition_ids_range(name, state["numel"], c.partitions, c.seed, state["offset"],
                                          state["offset"] + n, base_rows.device).view(base_rows.shape)
                state["offset"] += n
            return compose(base_rows, model_rows, lambdas, ids)

        return Blocked(prepare=prepare, merge_block=merge_block)
