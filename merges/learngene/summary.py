"""What a gene holds, per suffix, for `wsmerge learngene inspect`: norms of the gene tensors
and of every layer of an expansion, computed without expanding.

    rows = gene_summary(load_gene("minilm.gene"), depth=12)
    rows[0]["suffix"], rows[0]["norm_B"], rows[0]["layer_norms"][:2]
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from weightspace.merges.learngene.expand import expansion_stages
from weightspace.merges.learngene.fit import _norm, _ratio
from weightspace.merges.learngene.gene import Gene, _check_gene
from weightspace.merges.learngene.layout import _check_depth, layer_position, layer_stages


def gene_summary(gene: Gene, depth: int | None = None,
                 stages: int | Sequence[int] | None = None) -> list[dict[str, Any]]:
    """Per suffix: shape, the gene tensors' norms, and the norm of every layer of a
    `depth`-layer expansion (default: the source depth) computed from them.

    TLEG: ||A + x B||^2 = ||A||^2 + 2x<A, B> + x^2 ||B||^2, so each suffix is read once.
    """
    _check_gene(gene)
    depth = gene.source_depth if depth is None else _check_depth(depth)
    if gene.mode == "sws" and stages is None and depth == gene.source_depth:
        stages = gene.meta["stages"]
    sizes = expansion_stages(gene, depth, stages)
    out = []
    for suffix in gene.suffixes:
        names = gene.tensor_names(suffix)
        ts = [gene.space[n].load("cpu", torch.float64) for n in names]
        row: dict[str, Any] = {"suffix": suffix, "shape": list(ts[0].shape), "numel": ts[0].numel()}
        if gene.mode == "tleg":
            a, b = ts
            aa, bb, ab = float((a * a).sum()), float((b * b).sum()), float((a * b).sum())
            xs = [layer_position(i, depth, gene.meta["denominator"]) for i in range(depth)]
            row.update(norm_A=math.sqrt(aa), norm_B=math.sqrt(bb),
                       relative_B=_ratio(math.sqrt(bb), math.sqrt(aa)),
                       layer_norms=[math.sqrt(max(0.0, aa + 2 * x * ab + x * x * bb)) for x in xs])
        else:
            norms = [_norm(t) for t in ts]
            assert sizes is not None
            row.update(stage_norms=norms, layer_norms=[norms[s] for s in layer_stages(sizes)])
        out.append(row)
    return out
