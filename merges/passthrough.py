"""Passthrough: copy one model's tensor, optionally scaled. With `slices` it
stacks layers from several models (frankenmerges).

    merge_method: passthrough
    slices:
      - sources: [{model: ./a, layer_range: [0, 16]}]
      - sources: [{model: ./b, layer_range: [8, 24], parameters: {scale: 0.5}}]
"""

from __future__ import annotations

import torch

from weightspace.methods import MergeMethod, Param, TensorParams, register


@register
class Passthrough(MergeMethod):
    elementwise = True
    name = "passthrough"
    pretty_name = "Passthrough"
    paper = None
    reference_url = None
    uses_base = "none"
    model_params = (Param("scale", default=1.0, doc="multiply this model's tensor by this"),)
    min_models = 1
    max_models = 1
    layer_stacking = True

    def merge(
        self,
        name: str,
        base: torch.Tensor | None,
        tensors: list[torch.Tensor],
        params: TensorParams,
        companions: dict[str, list[torch.Tensor]],
    ) -> torch.Tensor:
        scale = params.model_values("scale")[0]
        if scale is None or scale == 1:
            return tensors[0]
        return tensors[0] * scale
