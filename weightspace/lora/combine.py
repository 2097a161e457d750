"""Adapter-space merges: peft's `add_weighted_adapter`, from a YAML spec, module by module.

    spec = load_lora_merge_spec("examples/lora_merge.yaml")
    plan = plan_lora_merge(spec, spec_dir="examples")    # headers only: every check, ranks, names
    write_lora_merge(plan, "runs/lora-merged")            # one module's A and B per adapter at a time

The combination types are peft's (peft/tuners/lora/model.py, peft/utils/merge_utils.py), computed
as peft computes them, so the tensors equal peft's:

- `linear`, `ties`, `dare_linear`, `dare_ties`, `magnitude_prune` combine the A's and the B's
  separately, each adapter's factors weighted by sqrt(|weight * scale|) (the sign on A only);
  every adapter needs the same r, which the result keeps;
- `cat` stacks the A's (each times weight * scale) and the B's: r is the sum of the adapters' r;
- `svd`, `ties_svd`, `dare_linear_svd`, `dare_ties_svd`, `magnitude_prune_svd` combine the
  dense deltas scale * B @ A and factor the result by SVD to `svd_rank` (default: the largest r);
- one adapter is always `linear` (peft's rule). The scale is folded into the factors, so the
  result has lora_alpha = r; target_modules is the union of the adapters'.

Where peft writes an adapter its own loader refuses, the result here is the same delta in a
loadable shape: a module whose rank is below the result's r (rank_pattern adapters, an SVD of a
layer narrower than svd_rank) is padded with zero rows of A and columns of B, and an rslora
result is written with use_rslora false (peft keeps the flag, which multiplies the folded-in
delta by sqrt(r) once more).

DARE's random masks are drawn per module, factor and adapter from a generator seeded by
(`seed`, that name), not from torch's global stream as peft's are: the same spec gives the same
adapter whatever order the modules are read in.

Yadav et al. 2023 (TIES), Yu et al. 2023 (DARE).
"""

from __future__ import annotations

import difflib
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from weightspace.errors import InputError, SpecError, WeightspaceError
from weightspace.ir import TensorRef
from weightspace.lora.merge_utils import combine_tensors, dare_mask

COMBINATION_TYPES = ("linear", "cat", "svd", "ties", "ties_svd", "dare_linear", "dare_ties",
                     "dare_linear_svd", "dare_ties_svd", "magnitude_prune", "magnitude_prune_svd")
# the types that combine A and B separately, so every adapter needs the same r
_FACTORWISE = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
_SVD = tuple(t for t in COMBINATION_TYPES if t.endswith("svd"))
_NEED_DENSITY = tuple(t for t in COMBINATION_TYPES if t.split("_svd")[0] in
                      ("ties", "dare_linear", "dare_ties", "magnitude_prune"))
_SIGNED = tuple(t for t in COMBINATION_TYPES if "ties" in t)
_RANDOM = tuple(t for t in COMBINATION_TYPES if t.startswith("dare"))
_SVD_PARAMS = ("svd_rank", "svd_clamp", "svd_full_matrices", "svd_driver")
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
           "float64": torch.float64}


# ---------------------------------------------------------------- the spec


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class AdapterParameters(_Model):
    weight: float


class AdapterEntry(_Model):
    adapter: str = Field(min_length=1)
    parameters: AdapterParameters


class CombineParameters(_Model):
    density: float | None = None
    majority_sign_method: Literal["total", "frequency"] = "total"
    svd_rank: int | None = Field(default=None, ge=1)
    svd_clamp: float | None = None
    svd_full_matrices: bool = True
    svd_driver: Literal["gesvd", "gesvdj", "gesvda"] | None = None
    seed: int = 0

    @field_validator("density")
    @classmethod
    def _density(cls, v: float | None) -> float | None:
        if v is not None and not 0 < v <= 1:
            raise ValueError(f"density must be in (0, 1] (the share of entries kept), got {v}")
        return v

    @field_validator("svd_clamp")
    @classmethod
    def _clamp(cls, v: float | None) -> float | None:
        if v is not None and not 0 <= v <= 1:
            raise ValueError(f"svd_clamp is a quantile in [0, 1], got {v}")
        return v


class LoraMergeSpec(_Model):
    """A `wsmerge lora merge` spec: peft adapters of one base, their weights, the combination."""

    combination_type: str = "svd"
    base_model: str | None = None
    adapters: list[AdapterEntry] = Field(min_length=1)
    parameters: CombineParameters = Field(default_factory=CombineParameters)
    dtype: Literal["float32", "float16", "bfloat16", "float64"] = "float32"

    @field_validator("combination_type")
    @classmethod
    def _known(cls, v: str) -> str:
        if v not in COMBINATION_TYPES:
            close = difflib.get_close_matches(v, COMBINATION_TYPES, n=1)
            raise ValueError(f"unknown combination type {v!r}" + (f" (did you mean {close[0]!r}?)" if close
                                                                   else "")
                             + f"; known: {', '.join(COMBINATION_TYPES)}")
        return v

    @model_validator(mode="after")
    def _parameters_fit(self) -> LoraMergeSpec:
        kind, p = self.combination_type, self.parameters
        given = p.model_fields_set
        if kind in _NEED_DENSITY and p.density is None:
            raise ValueError(f"parameters.density is required by combination_type {kind} (the share "
                             f"of entries each adapter keeps, in (0, 1])")
        unused = [k for k, used in (("density", _NEED_DENSITY), ("majority_sign_method", _SIGNED),
                                    ("seed", _RANDOM), *((k, _SVD) for k in _SVD_PARAMS))
                  if k in given and kind not in used]
        if unused:
            raise ValueError(f"parameters.{unused[0]} is not used by combination_type {kind}")
        return self


def _fields_at(loc: tuple) -> list[str]:
    model: type[BaseModel] = LoraMergeSpec
    for part in loc:
        if isinstance(part, int):
            continue
        sub = {"adapters": AdapterEntry, "parameters": (AdapterParameters if model is AdapterEntry
                                                        else CombineParameters)}.get(str(part))
        if sub is None:
            return []
        model = sub
    return list(model.model_fields)


def parse_lora_merge_spec(text: str, source: str = "<spec>") -> LoraMergeSpec:
    from weightspace.spec import parse_yaml_model

    return parse_yaml_model(text, source, LoraMergeSpec, what="LoRA merge spec",
                            hint="a LoRA merge spec must be a YAML mapping with adapters "
                                 "(and a combination_type)", fields_at=_fields_at)


def load_lora_merge_spec(path: str | Path) -> LoraMergeSpec:
    """Read and validate a LoRA merge spec; errors name the file, the field and the line."""
    from weightspace.yaml_io import read_yaml_file

    return parse_lora_merge_spec(read_yaml_file(path), source=str(path))


# ---------------------------------------------------------------- the plan (headers only)


@dataclass
class Source:
    """One input adapter: where it is, its weight, config and LoRA modules (headers only)."""

    ref: str
    path: Path
    weights_file: Path
    weight: float
    raw_config: dict
    ranks_max: int
    modules: dict[str, tuple[TensorRef, TensorRef, float]]  # module -> (A, B, scale)
    embedding: set[str] = field(default_factory=set)
    saved: dict[str, TensorRef] = field(default_factory=dict)  # saved embedding layers, by peft key


@dataclass
class ModuleStep:
    """One output module: which adapters hold it, and the result's shapes."""

    name: str
    embedding: bool
    inputs: list[int]           # indices into plan.sources
    in_features: int
    out_features: int

    def keys(self) -> tuple[str, str]:
        from weightspace.lora.adapter import PREFIX

        if self.embedding:
            return f"{PREFIX}{self.name}.lora_embedding_A", f"{PREFIX}{self.name}.lora_embedding_B"
        return f"{PREFIX}{self.name}.lora_A.weight", f"{PREFIX}{self.name}.lora_B.weight"


@dataclass
class LoraMergePlan:
    spec: LoraMergeSpec
    kind: str                   # the combination actually run (one adapter: linear)
    rank: int
    sources: list[Source]
    steps: list[ModuleStep]
    saved: dict[str, TensorRef]  # embedding layers saved whole, from the first adapter holding each
    config: dict                # the output adapter_config.json
    dtype: torch.dtype
    spec_path: Path | None = None
    notes: list[str] = field(default_factory=list)

    base_path: Path | None = None  # base_model, when it is a local folder

    def inputs(self) -> list[Path]:
        """Every file and folder the merge reads (the output may overlap none)."""
        return [*(s.path for s in self.sources), *([self.spec_path] if self.spec_path else []),
                *([self.base_path] if self.base_path else [])]

    def summary(self) -> dict[str, Any]:
        el = self.dtype.itemsize
        out_params = sum(self.rank * (s.in_features + s.out_features) for s in self.steps)
        read = sum(r.nbytes for s in self.sources for a, b, _ in s.modules.values() for r in (a, b))
        saved = sum(r.nbytes for r in self.saved.values())
        return {"combination_type": self.kind, "r": self.rank, "lora_alpha": self.config["lora_alpha"],
                "target_modules": self.config["target_modules"], "modules": len(self.steps),
                "adapters": [{"adapter": s.ref, "weight": s.weight, "r": s.ranks_max,
                              "modules": len(s.modules)} for s in self.sources],
                "dtype": str(self.dtype).replace("torch.", ""), "read_bytes": read + saved,
                "write_bytes": out_params * el + saved, "parameters": out_params,
                "saved_layers": sorted(self.saved), "notes": self.notes}


def _locate_adapter(ref: str, spec_dir: Path | None, field_name: str) -> Path:
    from weightspace.lora.adapter import resolve_adapter_on_hub
    from weightspace.sources import locate, missing_path

    loc = locate(ref, spec_dir)
    if loc.lora is not None:
        raise SpecError(f"{field_name}: {ref!r} is base+adapter; name the adapter folder alone "
                        f"(the base goes in base_model)")
    if loc.path is not None:
        return Path(loc.path)
    if loc.hub_id is not None:
        try:
            return resolve_adapter_on_hub(loc.hub_id)
        except InputError as e:  # not found, offline, gated: a runtime failure (1), named by field
            raise InputError(f"{field_name}: {e}") from None
    raise SpecError(f"{field_name}: {missing_path(ref, loc.looked)}")


def _read_source(entry: AdapterEntry, path: Path, field_name: str) -> Source:
    from weightspace.files import read_json_object
    from weightspace.lora.adapter import CONFIG_NAME, classify, pattern_key
    from weightspace.lora.apply import _factors
    from weightspace.sources import read_adapter

    adapter = read_adapter(path)
    modules, whole = classify(adapter)
    where = adapter.weights
    # peft saves an embedding layer it put LoRA on whole (save_embedding_layers): a copy of the
    # base's, carried to the result as peft's own save of the merged adapter carries it
    saved = {key: ref for name, (key, ref) in whole.items()
             if key.endswith(".base_layer.weight") and name.removesuffix(".weight") in modules}
    whole = {n: kr for n, kr in whole.items() if kr[0] not in saved}
    if whole:
        names = ", ".join(sorted(k for k, _ in whole.values())[:3])
        raise SpecError(f"{field_name}: {path}: the adapter stores whole tensors ({names}: "
                        f"modules_to_save or trained biases); an adapter-space merge combines LoRA "
                        f"factors only, as peft's add_weighted_adapter does for them")
    if not modules:
        raise InputError(f"{where}: the adapter holds no LoRA weights")
    cfg = adapter.config
    out: dict[str, tuple[TensorRef, TensorRef, float]] = {}
    embedding = set()
    for mod, m in sorted(modules.items()):
        p = m.parts
        if "bias" in p:
            raise SpecError(f"{field_name}: {path}: module {mod!r} has a lora_B bias (lora_bias: "
                            f"true); peft's add_weighted_adapter cannot combine those")
        emb, a, b = _factors(mod, m, where)  # the base+adapter reader's own checks
        if len(a.shape) != 2 or len(b.shape) != 2:
            raise SpecError(f"{field_name}: {path}: module {mod!r}: LoRA on convolution layers "
                            f"(lora_A {list(a.shape)}) is not supported")
        if a.shape[0] != b.shape[1]:
            raise InputError(f"{where}: module {mod!r}: lora_A {list(a.shape)} and lora_B "
                             f"{list(b.shape)} do not make a low-rank product (A must be [r, in] "
                             f"and B [out, r])")
        if not cfg.targets(mod):
            raise InputError(f"{where}: module {mod!r} has LoRA weights, but adapter_config.json's "
                             f"target_modules {cfg.target_modules!r} does not name it")
        r, scale = cfg.rank_and_scale(mod)
        if a.shape[0] != r:
            src = "rank_pattern" if pattern_key(cfg.rank_pattern, mod) in cfg.rank_pattern else "r"
            raise InputError(f"{where}: module {mod!r}: the weights have rank {a.shape[0]} but "
                             f"adapter_config.json's {src} gives {r}")
        out[mod] = (a, b, scale)
        if emb:
            embedding.add(mod)
    raw = read_json_object(path / CONFIG_NAME)
    ranks_max = max(cfg.r, *cfg.rank_pattern.values()) if cfg.rank_pattern else cfg.r
    return Source(ref=entry.adapter, path=path, weights_file=where, weight=entry.parameters.weight,
                  raw_config=raw, ranks_max=ranks_max, modules=out, embedding=embedding, saved=saved)


def _same_model(a: str, b: str) -> bool:
    if a == b:
        return True
    try:
        return os.path.exists(a) and os.path.exists(b) and os.path.samefile(a, b)
    except OSError:
        return False


def _check_bases(spec: LoraMergeSpec, sources: list[Source], notes: list[str]) -> None:
    """peft merges adapters of one model: base_model_name_or_path must agree."""
    names = [s.raw_config.get("base_model_name_or_path") for s in sources]
    first = next((i for i, n in enumerate(names) if n), None)
    if first is None:
        return
    for i, n in enumerate(names):
        if n and not _same_model(n, names[first]):
            msg = (f"adapters[{i}] ({sources[i].ref}) was trained on {n!r} but adapters[{first}] "
                   f"({sources[first].ref}) on {names[first]!r} (base_model_name_or_path)")
            if spec.base_model is None:
                raise SpecError(f"{msg}: adapters of different base models cannot be combined; if "
                                f"they are the same model under two names, give base_model: in the "
                                f"spec and they are checked against it by shapes instead")
            notes.append(f"{msg}; both checked against base_model {spec.base_model}")


def _check_against_base(spec: LoraMergeSpec, spec_dir: Path | None, sources: list[Source]) -> None:
    """With base_model: every adapter's modules exist in it with shapes that fit (headers only)."""
    from weightspace.lora.apply import apply_adapter
    from weightspace.sources import load_space, read_adapter

    try:
        base = load_space(spec.base_model, base_dir=spec_dir)
    except WeightspaceError as e:  # a missing path is the spec's fault (2), a broken model not (1)
        missing = isinstance(e, InputError) and "no such file or directory" in str(e)
        raise (SpecError if missing else type(e))(f"base_model: {e}") from None
    for i, s in enumerate(sources):
        try:
            apply_adapter(base, read_adapter(s.path))
        except InputError as e:
            raise SpecError(f"adapters[{i}].adapter {s.ref}: does not fit base_model "
                            f"{spec.base_model}: {e}") from None


def _new_target_modules(sources: list[Source]) -> list[str] | str:
    """peft's rule: a union of the module-name sets, or of the regexes; never a mix."""
    targets = [s.raw_config.get("target_modules") for s in sources]
    kinds = {type(t) for t in targets}
    if len(kinds) > 1:
        raise SpecError("adapters' target_modules mix module-name lists and regular expressions "
                        + ", ".join(f"adapters[{i}]: {t!r}" for i, t in enumerate(targets))
                        + "; peft cannot combine those (write them the same way)")
    if isinstance(targets[0], str):
        if "all-linear" in targets:
            return sorted({m.rsplit(".", 1)[-1] for s in sources for m in s.modules})
        return "|".join(f"({t})" for t in targets)
    if not isinstance(targets[0], list):
        raise SpecError(f"adapters[0] ({sources[0].ref}): adapter_config.json has no target_modules")
    return sorted({t for ts in targets for t in ts})


def plan_lora_merge(spec: LoraMergeSpec, *, spec_dir: str | Path | None = None,
                    spec_path: str | Path | None = None) -> LoraMergePlan:
    """Every check, from headers and adapter_config.json files only: the adapters, their ranks and
    shapes against each other (and against base_model when given), the output's config."""
    spec_dir = Path(spec_dir) if spec_dir is not None else None
    sources: list[Source] = []
    for i, entry in enumerate(spec.adapters):
        fname = f"adapters[{i}].adapter"
        path = _locate_adapter(entry.adapter, spec_dir, fname)
        try:
            sources.append(_read_source(entry, path, fname))
        except InputError as e:
            # refusals (DoRA, other peft methods, ...) and broken configs, named by spec field
            raise SpecError(f"{fname} {entry.adapter}: {e}") from None
    notes: list[str] = []
    kind = spec.combination_type
    if len(sources) == 1 and kind != "linear":
        notes.append(f"one adapter: combined as linear, as peft does (combination_type {kind} "
                     f"needs two or more)")
        kind = "linear"
    _check_bases(spec, sources, notes)
    base_path = None
    if spec.base_model is not None:
        _check_against_base(spec, spec_dir, sources)
        from weightspace.sources import locate

        base_path = locate(spec.base_model, spec_dir).path

    ranks = [s.ranks_max for s in sources]
    if kind in _FACTORWISE:
        if len(set(ranks)) != 1:
            raise SpecError(f"combination_type {kind} combines A and B separately, so every adapter "
                            f"needs the same r; got "
                            + ", ".join(f"adapters[{i}] r={r}" for i, r in enumerate(ranks))
                            + "; use cat or an *_svd type for adapters of different ranks")
        rank = ranks[0]
    elif kind == "cat":
        rank = sum(ranks)
    else:
        rank = spec.parameters.svd_rank or max(ranks)
    if kind in _SVD and spec.parameters.svd_driver is not None:
        notes.append("svd_driver applies on CUDA only (torch.linalg.svd)")

    steps = _steps(kind, sources)
    saved: dict[str, TensorRef] = {}
    for i, s in enumerate(sources):
        for key, ref in s.saved.items():
            if key in saved and tuple(saved[key].shape) != tuple(ref.shape):
                raise SpecError(f"adapters[{i}] ({s.ref}) saves {key!r} as {list(ref.shape)} but an "
                                f"earlier adapter as {list(saved[key].shape)} (a resized vocabulary?): "
                                f"the adapters are for different base models")
            saved.setdefault(key, ref)
    raw = dict(sources[0].raw_config)
    raw.update(r=rank, lora_alpha=rank, target_modules=_new_target_modules(sources), rank_pattern={},
               alpha_pattern={})
    if raw.get("use_rslora"):
        raw["use_rslora"] = False  # the scale is folded in: the result's must be 1
        notes.append("use_rslora is written false: the adapters' scales are folded into the result")
    return LoraMergePlan(spec=spec, kind=kind, rank=rank, sources=sources, steps=steps, saved=saved,
                         config=raw,
                         dtype=_DTYPES[spec.dtype], spec_path=Path(spec_path) if spec_path else None,
                         notes=notes, base_path=Path(base_path) if base_path else None)


def _steps(kind: str, sources: list[Source]) -> list[ModuleStep]:
    """One step per module any adapter holds (peft injects the union), its shapes checked."""
    names = sorted({m for s in sources for m in s.modules})
    steps = []
    for mod in names:
        holders = [i for i, s in enumerate(sources) if mod in s.modules]
        shapes = {i: (sources[i].modules[mod][0].shape[1], sources[i].modules[mod][1].shape[0])
                  for i in holders}
        emb = {i: mod in sources[i].embedding for i in holders}
        first = holders[0]
        for i in holders[1:]:
            if shapes[i] != shapes[first] or emb[i] != emb[first]:
                what = "an embedding's" if emb[i] else "a linear layer's"
                raise SpecError(
                    f"module {mod!r}: adapters[{i}] ({sources[i].ref}) holds {what} LoRA for "
                    f"[out {shapes[i][1]}, in {shapes[i][0]}] but adapters[{first}] "
                    f"({sources[first].ref}) for [out {shapes[first][1]}, in {shapes[first][0]}]: "
                    f"the adapters are for different base models")
        if kind in _FACTORWISE:
            rs = {sources[i].modules[mod][0].shape[0] for i in holders}
            if len(rs) > 1:
                raise SpecError(f"module {mod!r}: the adapters give it different ranks "
                                + ", ".join(f"adapters[{i}] r={sources[i].modules[mod][0].shape[0]}"
                                            for i in holders)
                                + f" (rank_pattern); {kind} needs one rank per module; use cat or "
                                  f"an *_svd type")
        steps.append(ModuleStep(mod, emb[first], holders, shapes[first][0], shapes[first][1]))
    return steps


# ---------------------------------------------------------------- the merge, one module at a time


def _pad(a: torch.Tensor, b: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A [k, in] and B [out, k] with zero rows / columns up to `rank` (the same B @ A)."""
    k = a.shape[0]
    if k == rank:
        return a, b
    pa = a.new_zeros(rank, a.shape[1])
    pb = b.new_zeros(b.shape[0], rank)
    pa[:k], pb[:, :k] = a, b
    return pa, pb


def combine_module(plan: LoraMergePlan, step: ModuleStep, factors: list[tuple[torch.Tensor, torch.Tensor]],
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """The output (A, B) of one module from the (A, B) of the adapters that hold it (step.inputs),
    exactly as peft's add_weighted_adapter computes them."""
    kind, p, rank = plan.kind, plan.spec.parameters, plan.rank
    srcs = [plan.sources[i] for i in step.inputs]
    scales = [s.modules[step.name][2] for s in srcs]
    weights = [s.weight for s in srcs]

    def masks(what: str) -> Callable[[int, torch.Tensor], torch.Tensor]:
        return lambda i, t: dare_mask(p.seed, f"{step.name}\0{what}\0{step.inputs[i]}", t, p.density)

    if kind == "cat":
        a = torch.cat([a * w * s for (a, _), w, s in zip(factors, weights, scales)], dim=0)
        b = torch.cat([b for _, b in factors], dim=1)
        return _pad(a, b, rank)
    if kind in _FACTORWISE:
        wa, wb = [], []
        for w, s in zip(weights, scales):
            ws = w * s
            wa.append(math.sqrt(abs(ws)) * (1 if ws >= 0 else -1))  # the sign on A only
            wb.append(math.sqrt(abs(ws)))
        dtype = factors[0][0].dtype
        kw = dict(density=p.density, majority_sign_method=p.majority_sign_method)
        dev = factors[0][0].device
        a = combine_tensors(kind, [a for a, _ in factors], torch.tensor(wa).to(dev), masks=masks("A"), **kw)
        b = combine_tensors(kind, [b for _, b in factors], torch.tensor(wb).to(dev), masks=masks("B"), **kw)
        return _pad(a.to(dtype), b.to(dtype), rank)
    # the *_svd types: combine the dense deltas, then factor
    deltas = [(b @ a) * s for (a, b), s in zip(factors, scales)]
    delta = combine_tensors(kind.removesuffix("_svd"), deltas, torch.tensor(weights).to(deltas[0].device),
                            density=p.density,
                            majority_sign_method=p.majority_sign_method, masks=masks("delta"))
    u, sv, vh = torch.linalg.svd(delta, full_matrices=p.svd_full_matrices,
                                 driver=p.svd_driver if delta.is_cuda else None)
    k = min(rank, sv.shape[0])  # beyond the layer's rank peft's product has no shape; pad instead
    u = u[:, :k] @ torch.diag(sv[:k])
    vh = vh[:k, :]
    if p.svd_clamp is not None:
        hi = torch.quantile(torch.cat([u.flatten(), vh.flatten()]), p.svd_clamp)
        u, vh = u.clamp(-hi, hi), vh.clamp(-hi, hi)
    return _pad(vh, u, rank)


def iter_lora_merge(plan: LoraMergePlan, device: str = "cpu") -> Iterator[tuple[ModuleStep, torch.Tensor,
                                                                                 torch.Tensor]]:
    """(step, A, B) for each output module, in order, reading only that module's factors."""
    work = torch.float64 if plan.dtype == torch.float64 else torch.float32
    for step in plan.steps:
        factors = []
        for i in step.inputs:
            a, b, _ = plan.sources[i].modules[step.name]
            factors.append((a.load(device, work), b.load(device, work)))
        a, b = combine_module(plan, step, factors)
        if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
            raise WeightspaceError(f"module {step.name!r}: the {plan.kind} result has NaN or Inf values "
                                   f"(are the adapters' weights finite?)")
        yield step, a.to("cpu", plan.dtype), b.to("cpu", plan.dtype)


def write_lora_merge(plan: LoraMergePlan, out: str | Path, *, overwrite: bool = False, device: str = "cpu",
                     progress: bool = False) -> dict[str, Any]:
    """Write the merged adapter to the directory `out` atomically: adapter_config.json and
    adapter_model.safetensors (peft's names), streamed module by module."""
    import json

    from weightspace.files import atomic_dir
    from weightspace.safetensors_io import ShardWriter

    specs = []
    for s in plan.steps:
        ka, kb = s.keys()
        specs += [(ka, plan.dtype, (plan.rank, s.in_features)), (kb, plan.dtype, (s.out_features, plan.rank))]
    specs += [(k, r.dtype, tuple(r.shape)) for k, r in plan.saved.items()]
    stats = {"modules": 0, "written_bytes": 0}

    def write(tmp: Path) -> None:
        w = ShardWriter(tmp / "adapter_model.safetensors", specs, {"format": "pt"})
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(plan.steps), unit="module", desc=f"lora merge ({plan.kind})", leave=False,
                       dynamic_ncols=True)
        try:
            for step, a, b in iter_lora_merge(plan, device):
                ka, kb = step.keys()
                w.write(ka, a)
                w.write(kb, b)
                stats["modules"] += 1
                stats["written_bytes"] += a.nbytes + b.nbytes
                if bar is not None:
                    bar.update(1)
            for key, ref in plan.saved.items():
                w.write(key, ref.load())
            w.close()
        except BaseException:
            w.abort()
            raise
        finally:
            if bar is not None:
                bar.close()
        (tmp / "adapter_config.json").write_text(json.dumps(plan.config, indent=2, sort_keys=True) + "\n")

    atomic_dir(out, overwrite, write, inputs=plan.inputs())
    return stats


__all__ = ["COMBINATION_TYPES", "LoraMergePlan", "LoraMergeSpec", "combine_module", "combine_tensors",
           "dare_mask", "iter_lora_merge", "load_lora_merge_spec", "parse_lora_merge_spec",
           "plan_lora_merge", "write_lora_merge"]
