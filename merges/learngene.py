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
- `train_gene(...)`: the papers' recipe. An auxiliary network of `aux_depth`
  layers whose per-layer tensors are *computed* from the gene (A + x_l B, or
  the stage tensor) is trained by soft distillation from a teacher; only the
  gene and the non-layer tensors are parameters.

The gene on disk (`save_gene`, `load_gene`) is a checkpoint directory:

    model.safetensors     gene.A.<suffix>, gene.B.<suffix>         (TLEG)
                          gene.stage<s>.<suffix>, s = 0 .. S-1      (SWS)
                          every non-layer tensor under its own name
    gene.json             mode, prefix, suffixes, source_depth, denominator, stages,
                          non_layer, dtypes, depth_key, provenance, report, history
    source_config.json    the source's config.json (rewritten on expansion), if it had one
    tokenizer files       carried from the source, copied into every expansion

Expansions rewrite the depth in the config: `num_hidden_layers` (BERT, Llama),
`n_layer` (GPT-2), `num_layers`/`n_layers`, or `arch.depth` for zoo models;
a per-layer `layer_types` list is resampled to the new depth.

Limits: one layer stack per model (an encoder-decoder with two stacks is
refused), every layer holding the same floating tensors with the same shapes.
"""

from __future__ import annotations

import copy
import functools
import json
import math
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from weightspace.binding import IGNORE_INDEX, Adapter, ClassifierAdapter
from weightspace.errors import InputError, NonFiniteError, SpecError
from weightspace.ir import ExprRef, MemoryRef, TensorRef, WeightSpace
from weightspace.structure import LayerName, is_pre_weight, parse_layer, structure_of

FORMAT = "weightspace-learngene"
FORMAT_VERSION = 1
MODES = ("tleg", "sws")
DENOMINATORS = ("L", "L-1")
DEFAULT_STAGES = 3  # SWS stage count when none is given (fewer for shallower models)
GENE_FILE = "gene.json"
SOURCE_CONFIG_FILE = "source_config.json"
METADATA_KEY = "weightspace.learngene"  # safetensors __metadata__ of genes and expansions
# config.json keys holding the depth of the stack, tried in this order
DEPTH_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")
ZOO_DEPTH_KEY = "arch.depth"


# ---------------------------------------------------------------------------------------------
# the gene


@dataclass
class Gene:
    """Gene tensors plus what is needed to expand them.

        gene = load_gene("minilm.gene")
        gene.mode, gene.source_depth, gene.suffixes[:2]     # 'tleg', 6, ['attention.self.query.weight', ...]
        gene.space["gene.B.output.dense.weight"].load()

    `space` holds the tensors (names in the module docstring; `space.meta["files"]`
    the tokenizer files to carry). `meta`: format, version, mode ("tleg" | "sws"),
    prefix (the layer container: "blocks", "encoder.layer", "model.layers", "h"),
    suffixes (per-layer tensor suffixes), dtypes (suffix -> dtype of the source
    layers, the dtype expansions are written in), source_depth, denominator
    ("L" | "L-1"; TLEG), stages (SWS: the stage list at source_depth; its length is
    the stage count), non_layer (names copied as they are), config (the source
    config.json or None), depth_key (where config stores the depth, or None),
    provenance, report (fit residuals or training summary), history (training loss
    per step).
    """

    space: WeightSpace
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def mode(self) -> str:
        return str(self.meta["mode"])

    @property
    def prefix(self) -> str:
        return str(self.meta["prefix"])

    @property
    def suffixes(self) -> list[str]:
        return list(self.meta["suffixes"])

    @property
    def source_depth(self) -> int:
        return int(self.meta["source_depth"])

    @property
    def num_stages(self) -> int | None:
        st = self.meta.get("stages")
        return len(st) if st else None

    def tensor_names(self, suffix: str) -> list[str]:
        """The gene tensors of one per-layer suffix: [A, B] (TLEG) or the S stage tensors (SWS)."""
        if self.mode == "tleg":
            return [gene_name("A", suffix), gene_name("B", suffix)]
        return [gene_name(s, suffix) for s in range(self.num_stages or 0)]

    def __repr__(self) -> str:
        how = (f"denominator {self.meta.get('denominator')}" if self.mode == "tleg"
               else f"stages {','.join(map(str, self.meta.get('stages') or []))}")
        return (f"Gene({self.mode}, {self.prefix}.*, {len(self.suffixes)} suffixes, source depth "
                f"{self.source_depth}, {how}, {self.space.num_params:,} params)")


def gene_name(part: str | int, suffix: str) -> str:
    """`gene.A.<suffix>` / `gene.B.<suffix>` for part "A"/"B"; `gene.stage<s>.<suffix>` for stage s."""
    head = f"gene.stage{part}" if isinstance(part, int) else f"gene.{part}"
    return f"{head}.{suffix}" if suffix else head


# ---------------------------------------------------------------------------------------------
# depth positions and stages


def _check_mode(mode: Any) -> str:
    if mode not in MODES:
        raise SpecError(f"mode: unknown {mode!r}; use tleg (linear expansion) or sws (stage-wise sharing)")
    return str(mode)


def _check_denominator(denominator: Any) -> str:
    if denominator not in DENOMINATORS:
        raise SpecError(f"denominator must be 'L' (x_l = l/L, the authors' code) or 'L-1' "
                        f"(x_l = l/(L-1)), got {denominator!r}")
    return str(denominator)


def _check_depth(depth: Any, what: str = "depth") -> int:
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
        raise SpecError(f"{what} must be a whole number >= 1, got {depth!r}")
    return depth


def layer_position(layer: int, depth: int, denominator: str = "L") -> float:
    """x_l of TLEG: l / L, or l / (L - 1) with denominator "L-1" (0 for a 1-layer network).

    >>> [layer_position(l, 4) for l in range(4)]
    [0.0, 0.25, 0.5, 0.75]
    >>> [layer_position(l, 4, "L-1") for l in range(4)]
    [0.0, 0.3333333333333333, 0.6666666666666666, 1.0]
    """
    d = depth if _check_denominator(denominator) == "L" else depth - 1
    return layer / d if d > 0 else 0.0


def stage_sizes(depth: int, stages: int | Sequence[int]) -> list[int]:
    """How many layers each stage gets: an explicit list (checked), or a count split evenly.

    >>> stage_sizes(7, 3), stage_sizes(12, 3), stage_sizes(7, [2, 3, 2]), stage_sizes(2, 3)
    ([3, 2, 2], [4, 4, 4], [2, 3, 2], [1, 0, 1])

    A count S splits `depth` as evenly as possible, the first depth % S stages taking
    one extra layer. With fewer layers than stages, layer l takes stage
    round(l (S-1) / (depth-1)): the first and last stages are kept and the ones between
    skipped evenly (2 layers over 3 stages: 1,0,1; 1 layer: stage 0). A list must add
    up to the depth (zeros allowed: a stage may be left out).
    """
    _check_depth(depth)
    if isinstance(stages, bool):
        raise SpecError(f"stages must be a count or a list of layer counts, got {stages!r}")
    if isinstance(stages, int):
        if stages < 1:
            raise SpecError(f"stages: the stage count must be >= 1, got {stages}")
        if stages > depth:
            sizes = [0] * stages
            for i in range(depth):
                sizes[math.floor(i * (stages - 1) / (depth - 1) + 0.5) if depth > 1 else 0] += 1
            return sizes
        base, extra = divmod(depth, stages)
        return [base + (1 if s < extra else 0) for s in range(stages)]
    sizes = list(stages)
    if not sizes or any(isinstance(n, bool) or not isinstance(n, int) or n < 0 for n in sizes):
        raise SpecError(f"stages {stages!r}: a list of whole layer counts >= 0 is needed, e.g. 2,3,2")
    if sum(sizes) != depth:
        raise SpecError(f"stages {','.join(map(str, sizes))} add up to {sum(sizes)} layers, but the "
                        f"network has {depth}; the stage list must cover every layer")
    return sizes


def _source_stages(depth: int, stages: int | Sequence[int] | None) -> list[int]:
    """The stage list a gene is fitted or trained with: every stage needs a layer."""
    sizes = stage_sizes(depth, stages if stages is not None else min(DEFAULT_STAGES, depth))
    if 0 in sizes:
        raise SpecError(f"stages {','.join(map(str, sizes))}: every stage needs at least one of the "
                        f"{depth} layers to fit or train its tensor; use at most {depth} stages")
    return sizes


def layer_stages(sizes: Sequence[int]) -> list[int]:
    """The stage of every layer: [2, 3, 2] -> [0, 0, 1, 1, 1, 2, 2]."""
    return [s for s, n in enumerate(sizes) for _ in range(n)]


def parse_stages(text: str | None) -> int | list[int] | None:
    """CLI form: "3" -> 3 (a count), "2,3,2" -> [2, 3, 2], None/"" -> None."""
    if text is None or not str(text).strip():
        return None
    parts = [p.strip() for p in str(text).split(",")]
    if not all(p.isdigit() for p in parts):
        raise SpecError(f"--stages {text!r}: give a stage count (3) or layer counts per stage (2,3,2)")
    return int(parts[0]) if len(parts) == 1 else [int(p) for p in parts]


# ---------------------------------------------------------------------------------------------
# config.json


def find_depth_key(config: Mapping[str, Any] | None, depth: int) -> str | None:
    """Where `config` stores the stack depth: "arch.depth" (zoo), or the first of DEPTH_KEYS
    whose value is `depth`; None when there is no such key."""
    if not isinstance(config, Mapping):
        return None
    arch = config.get("arch")
    if config.get("model_type") == "weightspace-zoo" and isinstance(arch, Mapping):
        return ZOO_DEPTH_KEY if arch.get("depth") == depth else None
    for k in DEPTH_KEYS:
        v = config.get(k)
        if isinstance(v, int) and not isinstance(v, bool) and v == depth:
            return k
    return None


def config_with_depth(config: Mapping[str, Any] | None, depth_key: str | None, depth: int,
                      source_depth: int) -> dict[str, Any] | None:
    """A copy of `config` for a `depth`-layer network: the depth key set, and a per-layer
    `layer_types` list (length source_depth) resampled by relative depth."""
    if config is None:
        return None
    cfg = copy.deepcopy(dict(config))
    if depth_key == ZOO_DEPTH_KEY:
        cfg["arch"] = {**cfg["arch"], "depth": depth}
    elif depth_key is not None:
        cfg[depth_key] = depth
    types = cfg.get("layer_types")
    if isinstance(types, list) and len(types) == source_depth and source_depth > 0:
        cfg["layer_types"] = [types[min(source_depth - 1, (i * source_depth) // depth)] for i in range(depth)]
    return cfg


# ---------------------------------------------------------------------------------------------
# reading a layer stack


@dataclass(frozen=True)
class _Stack:
    prefix: str
    depth: int
    suffixes: list[str]
    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, torch.dtype]
    non_layer: list[str]


def _space(x: WeightSpace | str | Path) -> WeightSpace:
    if isinstance(x, WeightSpace):
        return x
    if isinstance(x, (str, Path)):
        from weightspace.sources import load_space

        return load_space(x)
    raise SpecError(f"expected a WeightSpace or a model path, got {type(x).__name__}")


def _where(space: WeightSpace) -> str:
    return str(space.meta.get("location") or space.source)


def _read_stack(names_shapes: Mapping[str, tuple[tuple[int, ...], torch.dtype]], where: str) -> _Stack:
    """The one layer stack of a model: every layer must hold the same floating tensors."""
    st = structure_of(names_shapes)
    if not st.stacks:
        raise InputError(f"{where} has no layer stack the structure rules can read (per-layer tensors "
                         f"named like blocks.0.*, model.layers.0.*, encoder.layer.0.* or h.0.*); "
                         f"learngene needs one")
    if len(st.stacks) > 1:
        listed = ", ".join(f"{p} ({n} layers)" for p, n in st.stacks.items())
        raise InputError(f"{where} has {len(st.stacks)} layer stacks ({listed}); learngene expands a "
                         f"model with one stack of identical layers")
    prefix, depth = next(iter(st.stacks.items()))
    layers: list[dict[str, tuple[tuple[int, ...], torch.dtype]]] = [{} for _ in range(depth)]
    for name, spec in names_shapes.items():
        ln = parse_layer(name)
        if ln is not None:
            layers[ln.index][ln.suffix] = spec
    first = layers[0]
    if not first:
        raise InputError(f"{where}: layer 0 of {prefix} has no tensors (the stack starts at a later index)")
    for suffix, (_, dtype) in first.items():
        if not dtype.is_floating_point:
            raise InputError(f"{where}: per-layer tensor {prefix}.0.{suffix} is "
                             f"{str(dtype).replace('torch.', '')}; learngene fits floating tensors only")
    for i, layer in enumerate(layers[1:], 1):
        for suffix in first:
            if suffix not in layer:
                raise InputError(f"{where}: layer {i} of {prefix} has no tensor {suffix!r}, which layer 0 "
                                 f"has; learngene needs a stack of identical layers")
            if layer[suffix][0] != first[suffix][0]:
                raise InputError(f"{where}: tensor {prefix}.{i}.{suffix} has shape {list(layer[suffix][0])}, "
                                 f"but {list(first[suffix][0])} in layer 0; learngene needs identical layers")
        extra = [s for s in layer if s not in first]
        if extra:
            raise InputError(f"{where}: layer {i} of {prefix} has tensor {extra[0]!r}, which layer 0 does "
                             f"not have; learngene needs a stack of identical layers")
    non_layer = list(st.non_layer)
    clash = [n for n in non_layer if n == "gene" or n.startswith("gene.")]
    if clash:
        raise InputError(f"{where}: tensor {clash[0]!r} clashes with the gene's own tensor names (gene.*)")
    return _Stack(prefix, depth, list(first), {s: v[0] for s, v in first.items()},
                  {s: v[1] for s, v in first.items()}, non_layer)


def _gene_dtype(dtype: torch.dtype) -> torch.dtype:
    """Gene tensors are float32 (float64 for float64 models): B is a small difference."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _dt(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _dtype_of(name: str, where: str) -> torch.dtype:
    dt = getattr(torch, str(name), None)
    if not isinstance(dt, torch.dtype):
        raise InputError(f"{where}: unknown dtype {name!r}")
    return dt


# ---------------------------------------------------------------------------------------------
# fitting a gene to a trained network (training-free)


def fit_line(xs: Sequence[float], load: Callable[[int], torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Least squares over depth of theta_l ~ A + x_l B, per entry, in float64: (A, B).

    `load(l)` returns layer l's tensor; it is called once per layer, so only the sums
    are held. With xbar the mean of x and S = sum_l (x_l - xbar)^2::

        B = sum_l (x_l - xbar) theta_l / S,     A = mean_l theta_l - xbar B

    (the 2x2 normal equations solved in closed form, for every entry at once).
    """
    n = len(xs)
    if n < 2:
        raise InputError("a linear fit over depth needs at least two layers")
    xbar = sum(xs) / n
    sxx = sum((x - xbar) ** 2 for x in xs)
    total: torch.Tensor | None = None
    cross: torch.Tensor | None = None
    for i, x in enumerate(xs):
        t = load(i).to(torch.float64)
        if total is None:
            total, cross = t.clone(), t * (x - xbar)
        else:
            total.add_(t)
            cross.add_(t, alpha=x - xbar)
        del t
    assert total is not None and cross is not None
    b = cross.div_(sxx)
    a = total.div_(n).sub_(b, alpha=xbar)
    return a, b


def _norm(t: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(t.to(torch.float64)))


def _ratio(a: float, b: float) -> float | None:
    if b > 0:
        return a / b
    return 0.0 if a == 0 else None


def fit_gene(model: WeightSpace | str | Path, *, mode: str = "tleg", denominator: str = "L",
             stages: int | Sequence[int] | None = None) -> Gene:
    """Fit a gene to a trained network without training; the residuals are in `meta["report"]`.

        gene = fit_gene(load_space("minilm"))                          # TLEG, x_l = l/6
        gene = fit_gene(load_space("minilm"), mode="sws", stages=[2, 2, 2])
        gene.meta["report"]["relative_residual"]                       # ||theta - fit|| / ||theta||

    TLEG: A, B per suffix from `fit_line` with x_l = l/L (or l/(L-1)); needs L >= 2.
    SWS: stage s's tensor is the mean of the layers assigned to it (`stages`: a count,
    split evenly, or a list adding up to L, every stage with a layer; default min(3, L)
    stages).

    The report: `relative_residual` sqrt(sum_l ||theta_l - fit_l||^2 / sum_l ||theta_l||^2)
    over all layer tensors, `per_layer` the same per layer, and per suffix (`suffixes`,
    a list in layer order) its shape, relative_residual, per_layer residuals, and the
    per-layer norms of the layers (`norms`) and of their fits (`fit_norms`).
    """
    space = _space(model)
    mode = _check_mode(mode)
    where = _where(space)
    stack = _read_stack({n: (r.shape, r.dtype) for n, r in space.items()}, where)
    L = stack.depth
    den = _check_denominator(denominator) if mode == "tleg" else None
    if mode == "tleg":
        if stages is not None:
            raise SpecError("stages apply to sws genes; a tleg gene has none")
        if L < 2:
            raise InputError(f"{where} has {L} layer in {stack.prefix}; TLEG fits theta_l = A + x_l B "
                             f"and needs at least two layers")
        xs = [layer_position(i, L, den) for i in range(L)]
        sizes = None
    else:
        sizes = _source_stages(L, stages)
    config = space.meta.get("config")
    depth_key = find_depth_key(config, L)
    if isinstance(config, Mapping) and depth_key is None:
        warnings.warn(f"{where}: config.json has no depth key ({', '.join(DEPTH_KEYS)} or zoo arch.depth) "
                      f"equal to its {L} layers; expansions will copy it unchanged", stacklevel=2)

    refs: dict[str, TensorRef] = {}
    rows: list[dict[str, Any]] = []
    sq_layer = [0.0] * L
    sq_res_layer = [0.0] * L
    for suffix in stack.suffixes:
        names = [LayerName(stack.prefix, i, suffix).with_index(i) for i in range(L)]
        gdt = _gene_dtype(stack.dtypes[suffix])

        def load(i: int, _names: list[str] = names) -> torch.Tensor:
            return space[_names[i]].load("cpu", torch.float64)

        if mode == "tleg":
            a, b = fit_line(xs, load)
            parts = {gene_name("A", suffix): a, gene_name("B", suffix): b}

            def fitted(i: int, _a: torch.Tensor = a, _b: torch.Tensor = b) -> torch.Tensor:
                return _a + xs[i] * _b
        else:
            assert sizes is not None
            owner = layer_stages(sizes)
            means: list[torch.Tensor | None] = [None] * len(sizes)
            for i in range(L):
                t = load(i)
                s = owner[i]
                means[s] = t if means[s] is None else means[s].add_(t)
            parts = {}
            for s, n in enumerate(sizes):
                m = means[s]
                assert m is not None  # _source_stages: every stage has a layer
                parts[gene_name(s, suffix)] = m.div_(n)

            def fitted(i: int, _parts: dict = parts, _owner: list[int] = owner,
                       _suffix: str = suffix) -> torch.Tensor:
                return _parts[gene_name(_owner[i], _suffix)]

        norms, fit_norms, res = [], [], []
        for i in range(L):  # second pass: residuals
            t = load(i)
            f = fitted(i)
            nt, nr = _norm(t), _norm(t - f)
            norms.append(nt)
            fit_norms.append(_norm(f))
            res.append(nr)
            sq_layer[i] += nt * nt
            sq_res_layer[i] += nr * nr
            del t
        for n, t in parts.items():
            refs[n] = MemoryRef(n, t.to(gdt))
        del parts
        rows.append({
            "suffix": suffix, "shape": list(stack.shapes[suffix]),
            "relative_residual": _ratio(math.sqrt(sum(r * r for r in res)), math.sqrt(sum(x * x for x in norms))),
            "per_layer": [_ratio(r, x) for r, x in zip(res, norms)],
            "norms": norms, "fit_norms": fit_norms,
        })
    for n in stack.non_layer:
        refs[n] = space[n]
    report = {
        "kind": "fit",
        "relative_residual": _ratio(math.sqrt(sum(sq_res_layer)), math.sqrt(sum(sq_layer))),
        "per_layer": [_ratio(math.sqrt(r), math.sqrt(x)) for r, x in zip(sq_res_layer, sq_layer)],
        "suffixes": rows,
    }
    meta = _gene_meta(
        mode=mode, stack=stack, denominator=den, stages=sizes, config=config, depth_key=depth_key,
        provenance={"method": "fit", "source": where, "created": time.strftime("%Y-%m-%dT%H:%M:%S")},
        report=report,
    )
    files = dict(space.meta.get("files") or {})
    gspace = WeightSpace(refs, {"source": f"{mode} gene of {where}", "format": "memory", "files": files})
    return Gene(gspace, meta)


def _gene_meta(*, mode: str, stack: _Stack, denominator: str | None, stages: list[int] | None,
               config: Any, depth_key: str | None, provenance: dict, report: dict,
               history: list | None = None) -> dict[str, Any]:
    return {
        "format": FORMAT, "version": FORMAT_VERSION, "mode": mode, "prefix": stack.prefix,
        "suffixes": list(stack.suffixes), "dtypes": {s: _dt(d) for s, d in stack.dtypes.items()},
        "source_depth": stack.depth, "denominator": denominator,
        "stages": list(stages) if stages is not None else None,
        "non_layer": list(stack.non_layer), "config": copy.deepcopy(config) if config is not None else None,
        "depth_key": depth_key, "provenance": provenance, "report": report, "history": history or [],
    }


# ---------------------------------------------------------------------------------------------
# checking a gene


def _check_gene(gene: Gene, where: str = "gene") -> None:
    """The meta is complete and every tensor it names is there, with matching shapes."""
    if not isinstance(gene, Gene):
        raise SpecError(f"expected a Gene, got {type(gene).__name__}")
    m = gene.meta
    if m.get("mode") not in MODES:
        raise InputError(f"{where}: unknown mode {m.get('mode')!r} (tleg or sws)")
    for key, kind in (("prefix", str), ("suffixes", list), ("source_depth", int), ("non_layer", list),
                      ("dtypes", dict)):
        if not isinstance(m.get(key), kind) or isinstance(m.get(key), bool):
            raise InputError(f"{where}: {key!r} is missing or not a {kind.__name__}")
    if m["source_depth"] < 1:
        raise InputError(f"{where}: source_depth must be >= 1")
    if m["mode"] == "tleg" and m.get("denominator") not in DENOMINATORS:
        raise InputError(f"{where}: a tleg gene needs denominator 'L' or 'L-1', got {m.get('denominator')!r}")
    if m["mode"] == "sws":
        st = m.get("stages")
        if not (isinstance(st, list) and st and all(isinstance(n, int) and n >= 0 for n in st)
                and sum(st) == m["source_depth"]):
            raise InputError(f"{where}: a sws gene needs 'stages', a list of layer counts adding up to "
                             f"source_depth ({m['source_depth']}), got {st!r}")
    expected: set[str] = set()
    for suffix in m["suffixes"]:
        if suffix not in m["dtypes"]:
            raise InputError(f"{where}: no dtype for suffix {suffix!r}")
        names = gene.tensor_names(suffix)
        for n in names:
            if n not in gene.space:
                raise InputError(f"{where}: tensor {n!r} is missing")
        shapes = {tuple(gene.space[n].shape) for n in names}
        if len(shapes) > 1:
            raise InputError(f"{where}: the gene tensors of {suffix!r} differ in shape "
                             f"({', '.join(str(list(s)) for s in shapes)})")
        expected.update(names)
    for n in m["non_layer"]:
        if n not in gene.space:
            raise InputError(f"{where}: non-layer tensor {n!r} is missing")
        expected.add(n)
    extra = [n for n in gene.space if n not in expected]
    if extra:
        raise InputError(f"{where}: unexpected tensor {extra[0]!r} (neither a gene tensor nor a listed "
                         f"non-layer tensor)")


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


# ---------------------------------------------------------------------------------------------
# expanding a gene


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
    pre = [n for n in m["non_layer"] if is_pre_weight(n) or n.startswith("stem.")]
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
    from weightspace.sources import TOKENIZER_FILES

    space = expand(gene, depth, stages=stages)
    if tokenizer_from is not None:
        d = Path(tokenizer_from)
        if not d.is_dir():
            raise InputError(f"tokenizer_from {d}: no such directory")
        found = {n: d / n for n in TOKENIZER_FILES if (d / n).is_file()}
        if not found:
            raise InputError(f"tokenizer_from {d}: no tokenizer files ({', '.join(TOKENIZER_FILES[:4])}, ...)")
        space.meta["files"] = found
    recipe = {**space.meta["learngene"], "format": FORMAT}
    return save_space(space, out, overwrite=overwrite, dtype=dtype, shard_size=shard_size,
                      metadata={METADATA_KEY: json.dumps(recipe)}, config=space.meta.get("config"))


# ---------------------------------------------------------------------------------------------
# the gene on disk


def save_gene(gene: Gene, out_dir: str | Path, *, overwrite: bool = False) -> Path:
    """Write a gene directory atomically (layout in the module docstring).

        save_gene(fit_gene(load_space("minilm")), "minilm.gene")
    """
    from weightspace.sink import check_output, save_space

    _check_gene(gene)
    out = Path(out_dir)
    check_output(out, overwrite)
    meta = {k: v for k, v in gene.meta.items() if k != "config"}
    try:
        text = json.dumps(meta, indent=2, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise InputError(f"gene meta cannot be written as JSON: {e}") from None
    config = gene.meta.get("config")
    with tempfile.TemporaryDirectory(prefix=".wsmerge-gene-") as tmp:
        files = dict(gene.space.meta.get("files") or {})
        (Path(tmp) / GENE_FILE).write_text(text + "\n", encoding="utf-8")
        files[GENE_FILE] = Path(tmp) / GENE_FILE
        if config is not None:
            (Path(tmp) / SOURCE_CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
            files[SOURCE_CONFIG_FILE] = Path(tmp) / SOURCE_CONFIG_FILE
        space = WeightSpace({n: gene.space[n] for n in gene.space},
                            {"source": gene.space.source, "config": None, "files": files})
        marker = {"format": FORMAT, "version": FORMAT_VERSION, "mode": gene.mode}
        return save_space(space, out, overwrite=overwrite, metadata={METADATA_KEY: json.dumps(marker)})


def is_gene_dir(path: str | Path) -> bool:
    return (Path(path) / GENE_FILE).is_file()


def load_gene(path: str | Path) -> Gene:
    """Open a gene directory (tensors stay on disk until used); a malformed one raises
    InputError naming the file."""
    from weightspace.sources import load_local

    d = Path(path).expanduser()
    if not d.exists():
        raise InputError(f"{d}: no such gene directory")
    gf = d / GENE_FILE
    if not gf.is_file():
        raise InputError(f"{d}: not a learngene directory (no {GENE_FILE}); write one with save_gene or "
                         f"`wsmerge learngene fit` / `wsmerge learngene train`")
    try:
        meta = json.loads(gf.read_text(encoding="utf-8"))
    except (ValueError, OSError) as e:
        raise InputError(f"{gf}: not valid JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise InputError(f"{gf}: not a learngene file (format {FORMAT!r} expected)")
    if not isinstance(meta.get("version"), int) or meta["version"] > FORMAT_VERSION:
        raise InputError(f"{gf}: format version {meta.get('version')!r} is newer than this weightspace "
                         f"reads ({FORMAT_VERSION}); upgrade weightspace")
    cf = d / SOURCE_CONFIG_FILE
    config = None
    if cf.is_file():
        try:
            config = json.loads(cf.read_text(encoding="utf-8"))
        except (ValueError, OSError) as e:
            raise InputError(f"{cf}: not valid JSON ({e})") from None
        if not isinstance(config, dict):
            raise InputError(f"{cf}: expected a JSON object")
    meta["config"] = config
    space = load_local(d)
    space.meta["source"] = str(d)
    gene = Gene(space, meta)
    _check_gene(gene, str(gf))
    return gene


# ---------------------------------------------------------------------------------------------
# summaries (for inspect)


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


# ---------------------------------------------------------------------------------------------
# training a gene (the papers' recipe)


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor | None, *,
                      temperature: float = 2.0, alpha: float = 0.5
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """alpha * T^2 * KL(softmax(teacher/T) || softmax(student/T)) + (1 - alpha) * CE(student, labels).

    Logits (B, K, C) with labels (B, K) (IGNORE_INDEX positions left out); the KL is
    averaged over the predictions kept. Returns (loss, kd, ce); ce is None without labels
    (then alpha must be 1).
    """
    c = student.shape[-1]
    s, t = student.reshape(-1, c).float(), teacher.reshape(-1, c).float()
    y = None
    if labels is not None:
        y = labels.reshape(-1)
        keep = y != IGNORE_INDEX
        s, t, y = s[keep], t[keep], y[keep]
    T = temperature
    kd = F.kl_div(F.log_softmax(s / T, -1), F.log_softmax(t / T, -1), log_target=True,
                  reduction="sum") * (T * T) / max(1, s.shape[0])
    if y is None:
        return kd, kd, None
    ce = F.cross_entropy(s, y) if y.numel() else s.sum() * 0.0
    return alpha * kd + (1 - alpha) * ce, kd, ce


def _teacher_of(teacher: Any) -> tuple[Adapter, dict[str, torch.Tensor]]:
    params = None
    if isinstance(teacher, tuple) and len(teacher) == 2:
        teacher, params = teacher
    if isinstance(teacher, nn.Module):
        teacher = ClassifierAdapter(teacher)
    if not isinstance(teacher, Adapter):
        raise SpecError(f"teacher: expected an Adapter, a module, or (adapter or module, params), "
                        f"got {type(teacher).__name__}")
    p = dict(params) if params is not None else teacher.params()
    return teacher, {k: v.detach() for k, v in p.items()}


def _batches(batches: Iterable[Mapping[str, Any]], device: torch.device) -> list[dict[str, torch.Tensor]]:
    out = []
    for i, b in enumerate(batches):
        if not isinstance(b, Mapping):
            raise InputError(f"train_gene: batch {i} must be a dict of tensors, got {type(b).__name__}")
        t = {k: v.to(device) for k, v in b.items() if isinstance(v, torch.Tensor)}
        if not t:
            raise InputError(f"train_gene: batch {i} holds no tensors")
        out.append(t)
    if not out:
        raise InputError("train_gene: no data (the batches are empty)")
    return out


def _student_config(student: nn.Module, config: Mapping[str, Any] | None) -> dict | None:
    if config is not None:
        return copy.deepcopy(dict(config))
    cfg = getattr(student, "config", None)
    if cfg is not None and hasattr(cfg, "to_dict"):
        return cfg.to_dict()
    return None


def train_gene(
    student_factory: Callable[[int], nn.Module],
    teacher: Any,
    batches: Iterable[Mapping[str, Any]],
    *,
    mode: str = "tleg",
    aux_depth: int = 6,
    stages: int | Sequence[int] | None = None,
    denominator: str = "L",
    temperature: float = 2.0,
    alpha: float = 0.5,
    epochs: int | None = None,
    steps: int | None = None,
    lr: float = 1e-3,
    weight_decay: float = 0.05,
    clip: float | None = 1.0,
    seed: int = 0,
    init: str = "random",
    config: Mapping[str, Any] | None = None,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> Gene:
    """Train a gene the papers' way: an auxiliary network built from it, distilled from a teacher.

        teacher = open_model("zoo/.../epoch-0020")                       # a ClassifierAdapter
        factory = lambda d: build_model({**arch, "depth": d}, (1, 8, 8), 10)
        gene = train_gene(factory, teacher, open_batches("digits", teacher), mode="tleg",
                          aux_depth=6, epochs=5)
        save_expanded(gene, 12, "vit-x12")

    The auxiliary network is `student_factory(aux_depth)` (seeded with `seed`), run with
    `torch.func.functional_call`: each step its per-layer tensors are composed from the
    gene, A_s + x_l B_s (TLEG, x_l = l/aux_depth or l/(aux_depth-1)) or the tensor of the
    stage layer l belongs to (SWS, `stages` a count or list adding up to aux_depth;
    default min(3, aux_depth) stages split evenly). Trained: the gene tensors and the
    non-layer tensors; loss `distillation_loss` (soft distillation at `temperature`,
    weight `alpha` on it, 1 - alpha on cross-entropy with the labels); AdamW with a
    cosine decay over `steps` optimizer steps (or `epochs` passes, default 10), gradient
    norm clipped at `clip`. The student runs in eval mode (no dropout).

    `init`: "random" starts from the student's own seeded initialization (A and stage
    tensors from its layers 0, 1, ...; B from layer 1 where the architecture draws layers
    at random, 0 where it sets them to constants such as norm weights: the authors' code
    draws both A and B for weights and zeros B for norms); "fit" starts from
    `fit_gene` of the teacher's weights (same architecture and width).

    `config` is the auxiliary network's config.json (depth key rewritten on expansion;
    default: `student.config.to_dict()` for a transformers module; without one,
    expansions are written without a config.json). `teacher` is an
    Adapter, an nn.Module (a classifier: batches {"x", "y"}), or (either, params).
    Returns a Gene: source_depth = aux_depth, `meta["history"]` the loss per step,
    `meta["report"]` loss/kd/ce over all batches before and after training.
    """
    t_start = time.perf_counter()
    mode = _check_mode(mode)
    aux_depth = _check_depth(aux_depth, "aux_depth")
    den = _check_denominator(denominator) if mode == "tleg" else None
    if mode == "tleg" and aux_depth < 2:
        raise SpecError("aux_depth: TLEG's auxiliary network needs at least two layers (x_l must vary)")
    if mode == "tleg" and stages is not None:
        raise SpecError("stages apply to sws genes; a tleg gene has none")
    sizes = _source_stages(aux_depth, stages) if mode == "sws" else None
    if init not in ("random", "fit"):
        raise SpecError(f"init: unknown {init!r}; use random or fit")
    if not temperature > 0 or not math.isfinite(temperature):
        raise SpecError(f"temperature must be a positive number, got {temperature!r}")
    if not 0.0 <= alpha <= 1.0:
        raise SpecError(f"alpha must be in [0, 1], got {alpha!r}")
    if not lr > 0 or weight_decay < 0 or (clip is not None and clip <= 0):
        raise SpecError("lr must be > 0, weight_decay >= 0 and clip > 0 (or None)")
    if epochs is not None and steps is not None:
        raise SpecError("give epochs or steps, not both")
    for v, what in ((epochs, "epochs"), (steps, "steps")):
        if v is not None:
            _check_depth(v, what)

    device = torch.device(device)
    t_adapter, t_params = _teacher_of(teacher)
    t_params = {k: v.to(device) for k, v in t_params.items()}
    data = _batches(batches, device)
    if alpha < 1 and any(t_adapter.labels_or_none(b) is None for b in data):
        raise InputError("train_gene: a batch has no labels; use alpha=1 (distillation only) or labelled data")

    torch.manual_seed(seed)
    student = student_factory(aux_depth)
    if not isinstance(student, nn.Module):
        raise SpecError(f"student_factory must return an nn.Module, got {type(student).__name__}")
    student = student.to(device)
    s_adapter = copy.copy(t_adapter)
    s_adapter.module = student
    named = dict(student.named_parameters())
    where = f"student_factory({aux_depth}) ({type(student).__name__})"
    stack = _read_stack({n: (tuple(p.shape), p.dtype) for n, p in named.items()}, where)
    if stack.depth != aux_depth:
        raise InputError(f"{where} built {stack.depth} layers in {stack.prefix}, not {aux_depth}")
    buffer_names = [n for n in student.state_dict() if n not in dict(student.named_parameters(remove_duplicate=False))]
    layer_buffers = [n for n in buffer_names if parse_layer(n) is not None]
    if layer_buffers:
        raise InputError(f"{where}: per-layer buffer {layer_buffers[0]!r} is not supported; learngene "
                         f"trains parameter tensors")
    buffers = {n: t.detach().to("cpu").clone() for n, t in student.state_dict().items() if n in buffer_names}

    def layer(i: int, suffix: str) -> str:
        return LayerName(stack.prefix, i, suffix).with_index(i)

    # the gene tensors and the non-layer tensors: the only leaves that are trained
    gene_t: dict[str, torch.Tensor] = {}
    if init == "fit":
        tspace = WeightSpace.from_tensors({k: v.cpu() for k, v in t_params.items()},
                                          {"source": "the teacher", "format": "memory"})
        start = fit_gene(tspace, mode=mode, denominator=den or "L",
                         stages=len(sizes) if sizes is not None else None)
        sspace = WeightSpace({n: MemoryRef(n, p.detach()) for n, p in named.items()},
                             {"source": where, "format": "memory"})
        check_compatible(start, sspace)
        gene_t = {n: start.space[n].load("cpu", torch.float32) for s in stack.suffixes
                  for n in start.tensor_names(s)}
        nonlayer_t = {n: start.space[n].load("cpu", torch.float32) for n in stack.non_layer}
    else:
        with torch.no_grad():
            for s in stack.suffixes:
                if mode == "tleg":
                    t0, t1 = named[layer(0, s)].detach(), named[layer(1, s)].detach()
                    gene_t[gene_name("A", s)] = t0.float().cpu().clone()
                    gene_t[gene_name("B", s)] = (torch.zeros_like(t0) if torch.equal(t0, t1) else t1).float().cpu().clone()
                else:
                    assert sizes is not None
                    first = 0
                    for st, n_layers in enumerate(sizes):
                        src = layer(min(first, aux_depth - 1), s)
                        gene_t[gene_name(st, s)] = named[src].detach().float().cpu().clone()
                        first += n_layers
        nonlayer_t = {n: named[n].detach().float().cpu().clone() for n in stack.non_layer}
    leaves = {n: t.to(device).requires_grad_(True) for n, t in {**gene_t, **nonlayer_t}.items()}
    xs = [layer_position(i, aux_depth, den) for i in range(aux_depth)] if den else None
    owner = layer_stages(sizes) if sizes is not None else None
    s_dtypes = {n: p.dtype for n, p in named.items()}

    def compose() -> dict[str, torch.Tensor]:
        p = {n: leaves[n].to(s_dtypes[n]) for n in stack.non_layer}
        for s in stack.suffixes:
            for i in range(aux_depth):
                if xs is not None:
                    t = leaves[gene_name("A", s)] + xs[i] * leaves[gene_name("B", s)]
                else:
                    assert owner is not None
                    t = leaves[gene_name(owner[i], s)]
                p[layer(i, s)] = t.to(s_dtypes[layer(i, s)])
        return p

    def forward(params: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]):
        with torch.no_grad():
            t_logits = t_adapter.logits(t_params, batch)
        return s_adapter.logits(params, batch), t_logits, t_adapter.labels_or_none(batch)

    def losses(s_logits: torch.Tensor, t_logits: torch.Tensor, labels: torch.Tensor | None):
        return distillation_loss(s_logits, t_logits, labels, temperature=temperature, alpha=alpha)

    def evaluate() -> dict[str, float | None]:
        with torch.no_grad():
            p = compose()
            outs = [forward(p, b) for b in data]
            parts = [losses(*o) for o in outs]
            hits = [_hits(*o) for o in outs]

        def mean(k: int) -> float | None:
            if parts[0][k] is None:
                return None
            return float(torch.stack([x[k] for x in parts]).mean())

        return {"loss": mean(0), "kd": mean(1), "ce": mean(2),
                "acc": sum(h for h, _ in hits) / max(1, sum(n for _, n in hits)),
                "chance": _chance([_targets(t, y) for _, t, y in outs])}

    was_training = (student.training, t_adapter.module.training)
    student.eval()
    t_adapter.module.eval()
    try:
        before = evaluate()
        total = steps if steps is not None else (epochs or DEFAULT_EPOCHS) * len(data)
        opt = torch.optim.AdamW(list(leaves.values()), lr=lr, weight_decay=weight_decay)
        gen = torch.Generator().manual_seed(seed)
        order: list[int] = []
        history: list[float] = []
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=total, desc=f"learngene {mode}", unit="step")
        try:
            for step in range(total):
                for group in opt.param_groups:  # cosine decay, no warm-up
                    group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / total))
                if not order:
                    order.extend(torch.randperm(len(data), generator=gen).tolist())
                loss, _, _ = losses(*forward(compose(), data[order.pop(0)]))
                if not bool(torch.isfinite(loss)):
                    raise NonFiniteError(f"train_gene: the loss is {float(loss)} at step {step + 1} of "
                                         f"{total}; lower lr (now {lr:g}) or the temperature")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if clip is not None:
                    torch.nn.utils.clip_grad_norm_(list(leaves.values()), clip)
                opt.step()
                history.append(round(float(loss.detach()), 6))
                if bar is not None:
                    bar.update(1)
        finally:
            if bar is not None:
                bar.close()
        after = evaluate()
    finally:
        student.train(was_training[0])
        t_adapter.module.train(was_training[1])

    chance = before["chance"]
    refs: dict[str, TensorRef] = {}
    for n in (n for s in stack.suffixes for n in _names_for(mode, s, sizes)):
        refs[n] = MemoryRef(n, leaves[n].detach().to("cpu", _gene_dtype(stack.dtypes[_suffix_of(n)])).clone())
    for n in stack.non_layer:
        refs[n] = MemoryRef(n, leaves[n].detach().to("cpu", s_dtypes[n]).clone())
    for n, t in buffers.items():
        refs[n] = MemoryRef(n, t)
    stack = _Stack(stack.prefix, stack.depth, stack.suffixes, stack.shapes, stack.dtypes,
                   list(stack.non_layer) + [n for n in buffers if n not in stack.non_layer])
    cfg = _student_config(student, config)
    depth_key = find_depth_key(cfg, aux_depth)
    report = {
        "kind": "train", "loss_start": before["loss"], "loss_end": after["loss"],
        "kd_start": before["kd"], "kd_end": after["kd"], "ce_start": before["ce"], "ce_end": after["ce"],
        "acc_start": before["acc"], "acc_end": after["acc"], "chance": chance,
        "at_chance": after["acc"] <= CHANCE_MARGIN * chance,
        "steps": total, "epochs": (epochs or DEFAULT_EPOCHS) if steps is None else None,
        "batches": len(data),
        "examples": sum(int(next(iter(b.values())).shape[0]) for b in data),
        "lr": lr, "weight_decay": weight_decay, "clip": clip, "temperature": temperature, "alpha": alpha,
        "init": init, "seed": seed, "schedule": "cosine", "optimizer": "adamw",
        "seconds": round(time.perf_counter() - t_start, 3),
    }
    meta = _gene_meta(
        mode=mode, stack=stack, denominator=den, stages=sizes, config=cfg, depth_key=depth_key,
        provenance={"method": "train", "source": f"auxiliary {type(student).__name__} x{aux_depth}",
                    "teacher": type(t_adapter.module).__name__,
                    "created": time.strftime("%Y-%m-%dT%H:%M:%S")},
        report=report, history=history,
    )
    space = WeightSpace(refs, {"source": f"trained {mode} gene ({type(student).__name__})", "format": "memory",
                               "files": {}})
    return Gene(space, meta)


# `train_gene` without epochs or steps: enough passes that a small network leaves chance (one
# pass over digits left a 6-layer MLP at chance); the papers train for 100+ epochs.
DEFAULT_EPOCHS = 10
# a trained network whose accuracy is at most this many times the chance rate is "at chance"
CHANCE_MARGIN = 1.5


def _targets(t_logits: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
    """What the student is scored against: the labels, else the teacher's predictions."""
    return labels if labels is not None else t_logits.argmax(-1)


def _hits(s_logits: torch.Tensor, t_logits: torch.Tensor, labels: torch.Tensor | None) -> tuple[int, int]:
    """(correct, counted) top-1 predictions of the student in one batch; IGNORE_INDEX is skipped."""
    y = _targets(t_logits, labels)
    keep = y != IGNORE_INDEX
    return int((s_logits.argmax(-1) == y)[keep].sum()), int(keep.sum())


def _chance(targets: list[torch.Tensor]) -> float:
    """The accuracy of always predicting the most common target: the chance rate to beat."""
    y = torch.cat([t.reshape(-1) for t in targets])
    y = y[y != IGNORE_INDEX]
    return float(torch.bincount(y).max()) / max(1, y.numel()) if y.numel() else 0.0


def _names_for(mode: str, suffix: str, sizes: list[int] | None) -> list[str]:
    if mode == "tleg":
        return [gene_name("A", suffix), gene_name("B", suffix)]
    return [gene_name(s, suffix) for s in range(len(sizes or []))]


def _suffix_of(gene_tensor: str) -> str:
    return gene_tensor.split(".", 2)[2] if gene_tensor.count(".") >= 2 else ""


__all__ = [
    "DENOMINATORS",
    "FORMAT",
    "MODES",
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
    "parse_stages",
    "save_expanded",
    "save_gene",
    "stage_sizes",
    "train_gene",
]
