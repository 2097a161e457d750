"""Tiny synthetic layer stacks and genes shared by the tests/test_learngene_*.py files.

    gene, A, B = _tleg_gene("L", source_depth=4)     # fit_gene of an exact A + x_l B stack
"""

from __future__ import annotations

import torch

from weightspace.ir import WeightSpace
from weightspace.merges.learngene import Gene, fit_gene, layer_position

SUFFIXES = {"fc1.weight": (6, 4), "fc1.bias": (6,), "norm.weight": (4,)}


def _model(layers: dict[str, list[torch.Tensor]], config: dict | None = None, *, width: int = 4,
           dtype: torch.dtype = torch.float64) -> WeightSpace:
    """A zoo-like model: stem, blocks.{l}.<suffix>, norm, head."""
    g = torch.Generator().manual_seed(99)
    t = {"stem.weight": torch.randn(width, 3, generator=g, dtype=dtype)}
    for suffix, per_layer in layers.items():
        for i, x in enumerate(per_layer):
            t[f"blocks.{i}.{suffix}"] = x
    t["head.weight"] = torch.randn(2, width, generator=g, dtype=dtype)
    return WeightSpace.from_tensors(t, {"source": "synthetic", "config": config})


def _random_stack(L: int, seed: int = 0, dtype: torch.dtype = torch.float64) -> dict[str, list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return {s: [torch.randn(shape, generator=g, dtype=dtype) for _ in range(L)] for s, shape in SUFFIXES.items()}


def _zoo_config(depth: int) -> dict:
    return {"model_type": "weightspace-zoo", "arch": {"arch": "resmlp", "width": 4, "depth": depth},
            "input_shape": [3], "num_classes": 2}


def _tleg_gene(denominator: str = "L", source_depth: int = 4) -> tuple[Gene, dict, dict]:
    g = torch.Generator().manual_seed(7)
    A = {s: torch.randn(shape, generator=g) for s, shape in SUFFIXES.items()}
    B = {s: torch.randn(shape, generator=g) for s, shape in SUFFIXES.items()}
    x = [layer_position(i, source_depth, denominator) for i in range(source_depth)]
    model = _model({s: [A[s] + x[i] * B[s] for i in range(source_depth)] for s in SUFFIXES},
                   _zoo_config(source_depth), dtype=torch.float32)
    return fit_gene(model, denominator=denominator), A, B
