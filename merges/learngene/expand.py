"""Growing a network of any depth from a gene: `expand` (lazy), `save_expanded` (to disk).

    space = expand(gene, 12)                       # TLEG: layer l = A + (l/12) B
    space = expand(sws_gene, 7, stages=[2, 3, 2])  # SWS: layers 0-1 <- stage 0, 2-4 <- 1, 5-6 <- 2
    save_expanded(gene, 12, "minilm-x12")          # a checkpoint directory, config.json depth rewritten
    check_compatible(gene, load_space("vit-small"))   # refuses a gene for another architecture or width

Expansion reads nothing up front: every layer tensor is an ExprRef over the gene
tensors, so a sink streams the network tensor by tensor.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from pathlib import Path

import torch

from weightspace.errors import InputError, SpecError
from weightspace.ir import ExprRef, TensorRef, WeightSpace
from weightspace.merges.learngene.config_depth import config_with_depth
from weightspace.merges.learngene.gene import (
    FORMAT,
    METADATA_KEY,
    Gene,
    _check_gene,
    _dtype_of,
    gene_name,
)
from weightspace.merges.learngene.layout import (
    _check_depth,
    layer_position,
    layer_stages,
    stage_sizes,
)
from weightspace.merges.learngene.stack import _read_stack, _space, _where
from weightspace.structure import LayerName, is_pre_stack


def _line(a: torch.Tensor, b: torch.Tensor, *, x: float) -> torch.Tensor:
    return a + x * b if x else a.clone()


def _same(t: torch.Tensor) -> torch.Tensor:
    return t


def expansion_stages(gene: Gene, depth: int, stages: int | Sequence[int] | None = None) -> list[int] | None:
    """The stage list an expansion to `depth` uses (None for TLEG): `stages` checked against
    the gene's stage count, or the depth split evenly over it."""
    if gene.mode == "tleg":
        if stages is not None:
            raise SpecError("stages apply to sws genes; a tleg gene expands every layer as A + x_l B")
        return None
    S = gene.num_stages or 0
    if stages is None:
        return stage_sizes(depth, S)
    if isinstance(stages, int) and not isinstance(stages, bool):
        if stages != S:
            raise SpecError(f"stages: the gene has {S} stages, not {stages}")
        return stage_sizes(depth, S)
    sizes = stage_sizes(depth, stages)
    if len(sizes) != S:
        raise SpecError(f"stages {','.join(map(str, sizes))} name {len(sizes)} stages, but the gene has {S}; "
                        f"give {S} layer counts adding up to {depth}")
    return sizes


def expand(gene: Gene, depth: int, *, stages: int | Sequence[int] | None = None) -> WeightSpace:
    """The weights of a `depth`-layer network initialized from `gene`, lazily.

        space = expand(gene, 12)                       # TLEG: layer l = A + (l/12) B
        space = expand(sws_gene, 7, stages=[2, 3, 2])  # SWS: layers 0-1 <- stage 0, 2-4 <- 1, 5-6 <- 2
        space.meta["config"]["num_hidden_layers"]     # 12

    One ExprRef per layer tensor (nothing is read until a sink pulls it), written in
    the source layers' dtype; non-layer tensors pass through. `meta["config"]` is the
    source config with the depth key set to `depth`; `meta["files"]` the carried
    tokenizer files.
    """
    _check_gene(gene)
    depth = _check_depth(depth)
    sizes = expansion_stages(gene, depth, stages)
    m = gene.meta
    refs: dict[str, TensorRef] = {}
    pre = [n for n in m["non_layer"] if is_pre_stack(n)]
    post = [n for n in m["non_layer"] if n not in pre]
    for n in pre:
        refs[n] = gene.space[n]
    owner = layer_stages(sizes) if sizes is not None else None
    for i in range(depth):
        for suffix in m["suffixes"]:
            name = LayerName(m["prefix"], i, suffix).with_index(i)
            dtype = _dtype_of(m["dtypes"][suffix], "gene")
            if owner is None:
                a, b = gene.space[gene_name("A", suffix)], gene.space[gene_name("B", suffix)]
                x = layer_position(i, depth, m["denominator"])
                refs[name] = ExprRef(name, functools.partial(_line, x=x), [a, b], a.shape, dtype)
            else:
                g = gene.space[gene_name(owner[i], suffix)]
                refs[name] = ExprRef(name, _same, [g], g.shape, dtype)
    for n in post:
        refs[n] = gene.space[n]
    config = config_with_depth(m.get("config"), m.get("depth_key"), depth, gene.source_depth)
    how = f"stages {','.join(map(str, sizes))}" if sizes is not None else f"x_l = l/{m['denominator']}"
    meta = {
        "source": f"{gene.space.source} expanded to {depth} layers ({how})",
        "format": "memory", "config": config, "files": dict(gene.space.meta.get("files") or {}),
        "learngene": {"mode": m["mode"], "depth": depth, "stages": sizes, "denominator": m.get("denominator"),
                      "source_depth": gene.source_depth, "gene": str(m.get("provenance", {}).get("source"))},
    }
    return WeightSpace(refs, meta)


def save_expanded(gene: Gene, depth: int, out: str | Path, *, stages: int | Sequence[int] | None = None,
                  overwrite: bool = False, tokenizer_from: str | Path | None = None,
                  dtype: torch.dtype | None = None, shard_size: int | str = "5G") -> Path:
    """Stream `expand(gene, depth)` to a checkpoint directory, atomically.

        save_expanded(load_gene("minilm.gene"), 12, "minilm-x12")
        transformers.AutoModel.from_pretrained("minilm-x12")          # a 12-layer BERT

    Writes config.json with the new depth (when the gene's source had a config),
    the tokenizer files carried by the gene (or those in `tokenizer_from`, a model
    directory), and the expansion recipe in the safetensors metadata.
    """
    from weightspace.sink import save_space
    from weightspace.sources import TOKENIZER_FILES, tokenizer_files

    space = expand(gene, depth, stages=stages)
    if tokenizer_from is not None:
        d = Path(tokenizer_from)
        if not d.is_dir():
            raise InputError(f"tokenizer_from {d}: no such directory")
        found = tokenizer_files(d)  # checked like any carried file when save_space copies them
        if not found:
            raise InputError(f"tokenizer_from {d}: no tokenizer files ({', '.join(TOKENIZER_FILES[:4])}, ...)")
        space.meta["files"] = found
    recipe = {**space.meta["learngene"], "format": FORMAT}
    return save_space(space, out, overwrite=overwrite, dtype=dtype, shard_size=shard_size,
                      metadata={METADATA_KEY: json.dumps(recipe)}, config=space.meta.get("config"))


def check_compatible(gene: Gene, model: WeightSpace | str | Path) -> None:
    """Refuse a gene whose tensors do not fit `model`'s architecture (any depth).

        check_compatible(gene, load_space("vit-small"))   # InputError: a gene for another width

    The model's layer container, per-layer suffixes and non-layer tensors must be the
    gene's, with the same shapes (layer 0 of the model against the gene tensors).
    """
    _check_gene(gene)
    space = _space(model)
    where = _where(space)
    stack = _read_stack({n: (r.shape, r.dtype) for n, r in space.items()}, where)
    src = gene.meta.get("provenance", {}).get("source") or gene.space.source
    if stack.prefix != gene.prefix:
        raise InputError(f"{where} stacks its layers under {stack.prefix!r}, the gene ({src}) under "
                         f"{gene.prefix!r}; a gene for another architecture?")
    for suffix in gene.suffixes:
        name = LayerName(stack.prefix, 0, suffix).with_index(0)
        if suffix not in stack.shapes:
            raise InputError(f"the gene ({src}) has per-layer tensor {suffix!r}, which {where} does not "
                             f"have ({name!r}); a gene for another architecture?")
        g = tuple(gene.space[gene.tensor_names(suffix)[0]].shape)
        if g != stack.shapes[suffix]:
            raise InputError(f"tensor {name!r} has shape {list(stack.shapes[suffix])} in {where}, but the "
                             f"gene ({src}) gives it {list(g)}; a gene for another width?")
    extra = [s for s in stack.suffixes if s not in gene.meta["suffixes"]]
    if extra:
        raise InputError(f"{where} has per-layer tensor {extra[0]!r}, which the gene ({src}) does not; "
                         f"a gene for another architecture?")
    for n in gene.meta["non_layer"]:
        if n not in space:
            raise InputError(f"the gene ({src}) has tensor {n!r}, which {where} does not; "
                             f"a gene for another architecture?")
        if tuple(space[n].shape) != tuple(gene.space[n].shape):
            raise InputError(f"tensor {n!r} has shape {list(space[n].shape)} in {where}, but "
                             f"{list(gene.space[n].shape)} in the gene ({src}); a gene for another width?")
    missing = [n for n in stack.non_layer if n not in gene.meta["non_layer"]]
    if missing:
        raise InputError(f"{where} has tensor {missing[0]!r}, which the gene ({src}) does not; "
                         f"a gene for another architecture?")
