"""Turn a validated spec into a per-tensor plan, and run it.

    plan = plan_merge(load_spec("ties.yaml"))      # reads headers only
    print(plan.summary())
    run_plan(plan, "out/", device="auto")          # streams tensor by tensor

Everything that can be wrong with a spec or its inputs (unknown method or
parameter, missing tensors, shapes or layer counts that disagree, bad
layer ranges) is found here, before the first tensor is read.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from weightspace.errors import InputError, SpecError
from weightspace.executor import Step, estimate_peak_bytes, execute
from weightspace.ir import TensorRef, WeightSpace, slice_rows
from weightspace.methods import MergeMethod, Param, TensorParams, get_method, suggest
from weightspace.sink import DEFAULT_SHARD_SIZE, CheckpointSink
from weightspace.sources import load_local, locate, open_located
from weightspace.spec import Condition, MergeSpec, parse_dtype
from weightspace.structure import depth_t, is_pre_weight, parse_layer


@dataclass
class MergePlan:
    spec: MergeSpec
    method: MergeMethod
    steps: list[Step]
    spaces: dict[str, WeightSpace]
    reference: str  # model whose config/non-layer tensors lead
    config: dict | None
    tokenizer_files: dict[str, Path]
    compute_dtype: torch.dtype
    num_layers: int | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def read_bytes(self) -> int:
        return sum(s.read_bytes for s in self.steps)

    @property
    def write_bytes(self) -> int:
        return sum(s.out_bytes for s in self.steps)

    def outputs(self) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
        """(name, dtype, shape) of each output tensor, row blocks joined."""
        out: dict[str, tuple[str, torch.dtype, tuple[int, ...]]] = {}
        for s in self.steps:
            if s.name not in out and s.shape is not None:
                out[s.name] = (s.name, s.dtype, tuple(s.info.get("full_shape", s.shape)))
        return list(out.values())

    def peak_bytes(self) -> int:
        return estimate_peak_bytes(self.steps, self.compute_dtype)

    def summary(self, shard_size: int = DEFAULT_SHARD_SIZE) -> dict[str, Any]:
        out_dtypes: dict[str, int] = {}
        for _, dt, _ in self.outputs():
            k = str(dt).replace("torch.", "")
            out_dtypes[k] = out_dtypes.get(k, 0) + 1
        from weightspace.sink import plan_shards

        shards = plan_shards(self.outputs(), shard_size)
        return {
            "merge_method": self.method.name,
            "models": list(self.spaces),
            "base_model": self.spec.base_model,
            "tensors": len(self.outputs()),
            "steps": len(self.steps),
            "parameters": sum(s.out_bytes // s.dtype.itemsize for s in self.steps),
            "read_bytes": self.read_bytes,
            "write_bytes": self.write_bytes,
            "shards": len(shards),
            "out_dtypes": out_dtypes,
            "compute_dtype": str(self.compute_dtype).replace("torch.", ""),
            "num_layers": self.num_layers,
            "estimated_peak_tensor_bytes": self.peak_bytes(),
            "notes": self.notes,
        }


# ---------------------------------------------------------------- parameters


def evaluate(setting: Any, tensor_name: str, t: float) -> Any:
    """mergekit's rule: scalar as is; numeric list interpolated at t; conditions, first match."""
    if isinstance(setting, list):
        if not setting:
            return None
        if all(isinstance(e, (int, float)) and not isinstance(e, bool) for e in setting):
            scaled = t * (len(setting) - 1)
            i0 = int(scaled)
            i1 = min(len(setting) - 1, i0 + 1)
            frac = scaled - i0
            return (1 - frac) * setting[i0] + frac * setting[i1]
        for cond in setting:
            if isinstance(cond, Condition):
                if cond.filter is None or cond.filter == "*" or cond.filter in tensor_name:
                    return evaluate(cond.value, tensor_name, t)
        return None
    return setting


class _Resolver:
    """Looks a parameter up: source -> slice -> global spec -> method default."""

    def __init__(self, method: MergeMethod):
        self.method = method
        self.globals = {p.name: p for p in method.all_global_params()}
        self.per_model = {p.name: p for p in method.model_params}
        for c in method.companions:  # a companion is a file path, read like model paths
            given = self.per_model.get(c) or Param(c, required=True, kind=str)
            self.per_model[c] = replace(given, path=True)
        self.paths: dict[str, str] = {}  # path values as written -> absolute paths (see _check_params)

    def param(self, name: str, per_model: bool) -> Param | None:
        """The parameter `name` may set here; mergekit lets global `parameters` (and a slice's)
        set per-model defaults too."""
        if name in self.per_model:
            return self.per_model[name]
        return None if per_model else self.globals.get(name)

    def known(self, per_model: bool) -> list[str]:
        return sorted(set(self.per_model) | (set() if per_model else set(self.globals)))

    def value(self, p: Param, tensor: str, t: float, layers: list[dict | None], where: str,
              required: bool) -> Any:
        for params in layers:
            if params and p.name in params:
                v = evaluate(params[p.name], tensor, t)
                if v is not None:
                    v = p.coerce(v, f"{where}: {p.name} for tensor {tensor!r}")
                    if p.path and isinstance(v, str):
                        v = self.paths.get(v, v)
                    return v
        if p.default is None and p.required and required:
            raise SpecError(f"missing required parameter {p.name!r} ({where}) for tensor {tensor!r}")
        return p.default


@contextmanager
def _at(spec: MergeSpec, loc: tuple) -> Iterator[None]:
    """Errors raised inside name the spec field (and its line) they come from."""
    try:
        yield
    except (SpecError, InputError) as e:
        raise type(e)(f"{spec.where(*loc)}: {e}") from None


def _param_settings(spec: MergeSpec) -> Iterator[tuple[dict | None, tuple, bool]]:
    """Every parameters mapping of the spec: (mapping, its field path, whether it is per model)."""
    yield spec.parameters, ("parameters",), False
    for i, m in enumerate(spec.models or []):
        yield m.parameters, ("models", i, "parameters"), True
    for i, sl in enumerate(spec.slices or []):
        yield sl.parameters, ("slices", i, "parameters"), False
        for j, src in enumerate(sl.sources):
            yield src.parameters, ("slices", i, "sources", j, "parameters"), True


def _setting_values(setting: Any, loc: tuple) -> Iterator[tuple[Any, tuple]]:
    """The values a setting can take, each with its field path: a scalar, each number of a
    gradient (values between them are interpolated, so within the same range), each condition."""
    if not isinstance(setting, list):
        yield setting, loc
        return
    for k, item in enumerate(setting):
        if isinstance(item, Condition):
            yield from _setting_values(item.value, (*loc, k, "value"))
        else:
            yield item, (*loc, k)


def _check_params(spec: MergeSpec, resolver: _Resolver, spec_dir: Path | None,
                  notes: list[str]) -> None:
    """Every parameter the spec sets: a known name, a value of the right type and range, and for
    paths a file that exists (read against the spec's folder) -- before any model is opened."""
    for params, loc, per_model in _param_settings(spec):
        for name, setting in (params or {}).items():
            p = resolver.param(name, per_model)
            if p is None:
                known = resolver.known(per_model)
                raise SpecError(
                    f"{spec.where(*loc, name)}: unknown parameter for merge_method "
                    f"{resolver.method.name!r}.{suggest(name, known)} Its parameters: "
                    f"{', '.join(known) or 'none'}")
            for v, vloc in _setting_values(setting, (*loc, name)):
                p.coerce(v, spec.where(*vloc))
                if p.path and isinstance(v, str) and v not in resolver.paths:
                    with _at(spec, vloc):
                        found = locate(v, spec_dir)
                        if found.path is None:
                            raise InputError(_missing_file(v, found.looked))
                    if found.note:
                        notes.append(f"{spec.where(*vloc)}: {found.note}")
                    resolver.paths[v] = str(found.path.resolve())


def _missing_file(ref: str, looked: tuple[Path, ...]) -> str:
    where = " or ".join(str(q) for q in looked)
    return f"{ref}: no such file" + (f" (looked for {where})" if where and where != ref else "")


# ---------------------------------------------------------------- planning


@dataclass
class _Source:
    ref: str  # model reference as written in the spec
    params: dict | None
    layer_range: tuple[int, int] | None


def _model_refs(spec: MergeSpec) -> dict[str, tuple]:
    """Every model the spec names (base, models, slice sources, tokenizer source), each with the
    field path where it first appears."""
    refs: dict[str, tuple] = {}
    if spec.base_model:
        refs.setdefault(spec.base_model, ("base_model",))
    for i, m in enumerate(spec.models or []):
        refs.setdefault(m.model, ("models", i, "model"))
    for i, sl in enumerate(spec.slices or []):
        if sl.base_model:
            refs.setdefault(sl.base_model, ("slices", i, "base_model"))
        for j, src in enumerate(sl.sources):
            refs.setdefault(src.model, ("slices", i, "sources", j, "model"))
    if spec.tokenizer_source not in (None, "base", "union"):
        refs.setdefault(spec.tokenizer_source, ("tokenizer_source",))
    return refs


def _open_all(spec: MergeSpec, spec_dir: Path | None, notes: list[str]) -> dict[str, WeightSpace]:
    spaces: dict[str, WeightSpace] = {}
    for r, loc in _model_refs(spec).items():
        with _at(spec, loc):
            found = locate(r, spec_dir)
            if "+" in r and found.path is None:
                raise SpecError(f"model {r!r}: LoRA references (model+lora) are not supported yet")
            if found.note:
                notes.append(f"{spec.where(*loc)}: {found.note}")
            spaces[r] = open_located(r, found)
    return spaces


def _num_layers(space: WeightSpace) -> int:
    return space.structure().num_layers


def plan_merge(spec: MergeSpec, *, spec_dir: str | Path | None = None,
               out_dtype: str | None = None) -> MergePlan:
    """Validate a spec against its inputs and build the per-tensor plan (headers only).

    Relative paths in the spec are read against `spec_dir` (the spec file's folder);
    errors name the spec file, the field and its line.
    """
    try:
        return _plan(spec, spec_dir, out_dtype)
    except (SpecError, InputError) as e:
        if not spec.source or spec.source.startswith("<"):
            raise
        raise type(e)(f"{spec.source}: {e}") from None


def _plan(spec: MergeSpec, spec_dir: str | Path | None, out_dtype: str | None) -> MergePlan:
    with _at(spec, ("merge_method",)):
        method = get_method(spec.merge_method)
    resolver = _Resolver(method)
    spec_dir = Path(spec_dir) if spec_dir else None
    notes: list[str] = []
    # parameter names, types, ranges and files, before any model is opened
    _check_params(spec, resolver, spec_dir, notes)
    if spec.tokenizer_source == "union":
        raise SpecError(f"{spec.where('tokenizer_source')}: 'union' is not supported yet; "
                        f"use 'base' or a model")
    out_dt_name = out_dtype or spec.out_dtype
    parse_dtype(out_dt_name, "out_dtype")

    spaces = _open_all(spec, spec_dir, notes)
    base = spec.base_model
    uses_base = method.uses_base != "none"
    # as in mergekit, a method without a base ignores base_model unless it is also listed in models

    if spec.models:
        slices = [[_Source(m.model, m.parameters, None) for m in spec.models]]
        if base and uses_base and all(m.model != base for m in spec.models):
            slices[0].append(_Source(base, None, None))
        layered = False
    else:
        slices = [[_Source(s.model, s.parameters, tuple(s.layer_range)) for s in sl.sources]
                  for sl in spec.slices]
        for k, sl in enumerate(spec.slices):
            sb = sl.base_model or base
            if sb and uses_base and all(s.model != sb for s in sl.sources):
                raise SpecError(f"{spec.where('slices', k)}: base_model {sb!r} must be one of the "
                                f"slice's sources")
        layered = True

    def members(srcs: list[_Source], slice_idx: int) -> tuple[str | None, list[_Source]]:
        sb = (spec.slices[slice_idx].base_model if spec.slices else None) or base
        if uses_base and sb:
            return sb, [s for s in srcs if s.ref != sb]
        return None, list(srcs)

    for k, srcs in enumerate(slices):
        b, others = members(srcs, k)
        with _at(spec, ("slices", k) if spec.slices else ("models",)):
            method.check(len(others), b is not None)

    reference = base if (base and base in spaces) else slices[0][0].ref
    ref_space = spaces[reference]
    compute_dtype = spec.compute_dtype
    spec_out = parse_dtype(out_dt_name) or parse_dtype(spec.dtype)

    def out_dtype_for(ref: TensorRef) -> torch.dtype:
        if not ref.dtype.is_floating_point:
            return ref.dtype
        return spec_out or ref.dtype

    steps: list[Step] = []
    companions: dict[str, WeightSpace] = {}
    companions_used: set[str] = set()
    where_of: dict[str, str] = {}  # a model's parameters in the spec, with their line
    for i, mdl in enumerate(spec.models or []):
        where_of.setdefault(mdl.model, spec.where("models", i, "parameters"))
    for i, sl in enumerate(spec.slices or []):
        for j, src in enumerate(sl.sources):
            where_of.setdefault(src.model, spec.where("slices", i, "sources", j, "parameters"))
    if base:
        where_of.setdefault(base, "parameters")

    def add_step(out_name: str, slice_idx: int, srcs: list[_Source], in_names: list[str], t: float,
                 layer: int | None) -> None:
        sb, others = members(srcs, slice_idx)
        order = ([sb] if sb else []) + [s.ref for s in others]
        name_of = dict(zip([s.ref for s in srcs], in_names))
        if sb and sb not in name_of:
            name_of[sb] = in_names[0]
        refs = []
        for r in order:
            space = spaces[r]
            n = name_of[r]
            if n not in space:
                raise InputError(f"tensor {n!r} is missing from model {r!r} ({space.source})")
            refs.append(space[n])
        first = refs[0]
        for r, tref in zip(order[1:], refs[1:]):
            if tref.shape != first.shape:
                raise InputError(
                    f"tensor {tref.name!r}: shape {list(tref.shape)} in model {r!r} does not match "
                    f"{list(first.shape)} in model {order[0]!r}"
                )
            if tref.dtype.is_floating_point != first.dtype.is_floating_point:
                raise InputError(
                    f"tensor {tref.name!r}: dtype {str(tref.dtype)[6:]} in model {r!r} cannot be merged "
                    f"with {str(first.dtype)[6:]} in model {order[0]!r}"
                )
        if not first.dtype.is_floating_point:
            # integer buffers (position ids, counters) are copied from the reference, not merged
            steps.append(Step(out_name, first.shape, first.dtype, [first], lambda ts: ts[0],
                              cast_inputs=False, info={"copied_from": order[0]}))
            return
        sp = spec.slices[slice_idx].parameters if spec.slices else None
        glob_layers = [sp, spec.parameters]
        gvals = {
            p.name: resolver.value(p, out_name, t, glob_layers, "parameters", True)
            for p in method.all_global_params()
        }
        per_model = []
        for s in others:
            per_model.append({
                p.name: resolver.value(p, name_of[s.ref], t, [s.params, sp, spec.parameters],
                                       where_of[s.ref], True)
                for p in resolver.per_model.values()
            })
        params = TensorParams(values=gvals, per_model=per_model, layer=layer, t=t,
                              seed=int(gvals.get("seed", 0) or 0), tensor_name=out_name)
        try:
            method.check_params(params, [where_of[s.ref] for s in others])
        except SpecError as e:
            raise SpecError(f"{e} (for tensor {out_name!r})") from None
        comp_refs: list[TensorRef] = []
        comp_present: list[bool] = []  # per (companion, model): False -> passed to the method as None
        comp_names = list(method.companions)
        for c in comp_names:
            for s, pm in zip(others, per_model):
                if pm[c] not in companions:
                    companions[pm[c]] = load_local(pm[c])  # already resolved by _check_params
                space = companions[pm[c]]
                tname = name_of[s.ref]
                want = method.companion_shape(c, tname, tuple(first.shape))
                if want is None or (tname not in space and method.companion_optional):
                    comp_present.append(False)
                    continue
                companions_used.add(pm[c])
                if tname not in space:
                    raise InputError(f"companion {c} {pm[c]!r} has no tensor {tname!r} "
                                     f"(it holds {len(space)} tensors, e.g. {next(iter(space), '-')!r}); "
                                     f"is it for another model?")
                cref = space[tname]
                if tuple(cref.shape) != tuple(want):
                    raise InputError(f"companion {c} {pm[c]!r}: tensor {cref.name!r} has shape "
                                     f"{list(cref.shape)}, expected {list(want)} for the model's "
                                     f"{list(first.shape)}; is it for another model?")
                comp_refs.append(cref)
                comp_present.append(True)
        for pm in per_model:  # methods see companion paths resolved (spec-relative -> absolute)
            for c in comp_names:
                resolved = companions[pm[c]].meta.get("location")
                if resolved:
                    pm[c] = str(resolved)
        has_base = sb is not None
        n_others = len(others)
        fn = _merge_fn(method, out_name, has_base, n_others, params, comp_names, comp_present)
        info = {"t": t, "layer": layer, "models": order}
        all_refs = refs + comp_refs
        rows = _block_rows(first) if method.elementwise else None
        blocked = None
        if rows is None and has_base and not comp_names and first.nbytes > BLOCKED_MIN_BYTES:
            blocked = method.blocked(out_name, params, n_others)
        if blocked is not None:
            _add_blocked(steps, blocked, out_name, refs, out_dtype_for(first), compute_dtype, info)
            return
        if rows is None:
            steps.append(Step(out_name, first.shape, out_dtype_for(first), all_refs, fn, info=info))
            return
        for r0 in range(0, first.shape[0], rows):  # a large tensor streams in row blocks
            r1 = min(first.shape[0], r0 + rows)
            steps.append(Step(out_name, (r1 - r0, *first.shape[1:]), out_dtype_for(first),
                              [slice_rows(r, r0, r1) for r in all_refs], fn,
                              info={**info, "rows": (r0, r1), "full_shape": first.shape}))

    num_layers_out: int | None = None
    if not layered:
        srcs = slices[0]
        counts = {s.ref: _num_layers(spaces[s.ref]) for s in srcs}
        if len(set(counts.values())) > 1:
            desc = ", ".join(f"{r!r} has {n}" for r, n in counts.items())
            raise InputError(f"the models have different numbers of layers: {desc}")
        names = list(ref_space)
        ref_names = set(names)
        for s in srcs:
            extra = [n for n in spaces[s.ref] if n not in ref_names]
            if extra:
                raise InputError(
                    f"tensor {extra[0]!r} is in model {s.ref!r} but not in {reference!r}"
                    + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else "")
                )
        struct = ref_space.structure()
        num_layers_out = struct.num_layers or None
        for n in names:
            ln = parse_layer(n)
            add_step(n, 0, srcs, [n] * len(srcs), depth_t(n, struct), ln.index if ln else None)
    else:
        # layer stacking (mergekit slices): the main stack is re-indexed, other tensors
        # come from the first slice (embeddings) or the last (norm, head)
        struct = ref_space.structure()
        prefix = struct.main_prefix
        if prefix is None:
            raise InputError(f"model {reference!r} has no layer stack to slice")
        for k, srcs in enumerate(slices):
            for j, s in enumerate(srcs):
                n = spaces[s.ref].structure().stacks.get(prefix, 0)
                lo, hi = s.layer_range
                if hi > n:
                    raise SpecError(f"{spec.where('slices', k, 'sources', j, 'layer_range')}: "
                                    f"{[lo, hi]} is outside model {s.ref!r}, which has {n} layers")
            lens = {s.layer_range[1] - s.layer_range[0] for s in srcs}
            if len(lens) > 1:
                raise SpecError(f"{spec.where('slices', k)}: all sources of a slice must span the "
                                f"same number of layers")
        for n in ref_space:
            ln = parse_layer(n)
            if ln is not None and ln.prefix != prefix:
                raise InputError(f"tensor {n!r}: slices support one layer stack ({prefix!r}) only")
        pre = [n for n in ref_space if parse_layer(n) is None and is_pre_weight(n)]
        post = [n for n in ref_space if parse_layer(n) is None and not is_pre_weight(n)]
        for n in pre:
            add_step(n, 0, slices[0], [n] * len(slices[0]), 0.0, None)
        out_layer = 0
        for k, srcs in enumerate(slices):
            first = srcs[0]
            count = first.layer_range[1] - first.layer_range[0]
            suffixes = [parse_layer(n).suffix for n in spaces[first.ref]
                        if (ln := parse_layer(n)) and ln.prefix == prefix and ln.index == first.layer_range[0]]
            for idx in range(count):
                t = idx / (count - 1) if count > 1 else 1.0
                for suf in suffixes:
                    tail = f".{suf}" if suf else ""
                    in_names = [f"{prefix}.{s.layer_range[0] + idx}{tail}" for s in srcs]
                    add_step(f"{prefix}.{out_layer}{tail}", k, srcs, in_names, t, out_layer)
                out_layer += 1
        for n in post:
            add_step(n, len(slices) - 1, slices[-1], [n] * len(slices[-1]), 1.0, None)
        num_layers_out = out_layer
        if out_layer != struct.num_layers:
            notes.append(f"output has {out_layer} layers (input {reference!r} has {struct.num_layers})")

    seen = set()
    for s in steps:
        if s.name in seen and "rows" not in s.info and s.shape is not None:
            raise SpecError(f"tensor {s.name!r} would be written twice; check the slices")
        seen.add(s.name)

    unused = [p for p in companions if p not in companions_used]
    if unused:
        raise InputError(f"companion {unused[0]!r} holds no tensor of the models it is named for "
                         f"(e.g. {next(iter(companions[unused[0]]), '-')!r}); is it for another model?")

    config = _output_config(ref_space.meta.get("config"), spec_out, num_layers_out if layered else None)
    tok_src = spec.tokenizer_source
    tok_space = spaces[reference] if tok_src in (None, "base") else spaces[tok_src]
    tokenizer_files = dict(tok_space.meta.get("files") or {})
    return MergePlan(spec=spec, method=method, steps=steps, spaces=spaces, reference=reference,
                     config=config, tokenizer_files=tokenizer_files, compute_dtype=compute_dtype,
                     num_layers=num_layers_out, notes=notes)


# Elementwise methods stream tensors larger than this (per input) in row blocks,
# so their peak memory does not depend on the largest tensor either.
BLOCK_BYTES = 32 * 2**20


# Methods with a `blocked` recipe (TIES) stream tensors larger than this per input.
BLOCKED_MIN_BYTES = 128 * 2**20


def _add_blocked(steps: list[Step], blocked, name: str, refs: list[TensorRef],
                 out_dtype: torch.dtype, compute_dtype: torch.dtype, info: dict) -> None:
    """A statistics step that reads the tensor block by block, then one step per row block."""
    first = refs[0]
    n_rows = first.shape[0]
    rows = max(1, BLOCK_BYTES // max(1, first.nbytes // n_rows))
    cols = max(1, first.numel // n_rows)
    stride = max(1, n_rows // max(1, (1 << 20) // cols))

    def load(r0: int, r1: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
        ts = [slice_rows(r, r0, r1).load("cpu", compute_dtype) for r in refs]
        return ts[0], ts[1:]

    def sample():
        for r in range(0, n_rows, stride):
            yield load(r, r + 1)

    def blocks():
        for r0 in range(0, n_rows, rows):
            yield load(r0, min(n_rows, r0 + rows))

    state: dict[str, Any] = {}

    def prepare(_: list[torch.Tensor]) -> None:
        state["st"] = blocked.prepare(first.numel, sample, blocks)

    # the statistics pass reads every row once (plus a small sample) before the blocks read it again
    steps.append(Step(name, None, out_dtype, [], prepare,
                      info={**info, "stage": "statistics", "extra_read_bytes": sum(r.nbytes for r in refs)}))
    for r0 in range(0, n_rows, rows):
        r1 = min(n_rows, r0 + rows)
        steps.append(Step(name, (r1 - r0, *first.shape[1:]), out_dtype,
                          [slice_rows(r, r0, r1) for r in refs],
                          lambda ts: blocked.merge_block(state["st"], ts[0], ts[1:]),
                          info={**info, "rows": (r0, r1), "full_shape": first.shape}))


def _block_rows(ref: TensorRef) -> int | None:
    """Rows per block for `ref`, or None when it is small enough to take whole."""
    if len(ref.shape) < 1 or ref.shape[0] < 2 or ref.nbytes * 2 <= BLOCK_BYTES:
        return None
    row = max(1, ref.nbytes // ref.shape[0])
    return max(1, BLOCK_BYTES // row)


def _merge_fn(method: MergeMethod, name: str, has_base: bool, n_others: int, params: TensorParams,
              comp_names: list[str], comp_present: list[bool] | None = None
              ) -> Callable[[list[torch.Tensor]], torch.Tensor]:
    present = comp_present if comp_present is not None else [True] * (len(comp_names) * n_others)

    def fn(ts: list[torch.Tensor]) -> torch.Tensor:
        i = 0
        base = None
        if has_base:
            base, i = ts[0], 1
        tensors = ts[i : i + n_others]
        rest = iter(ts[i + n_others :])
        flat = [next(rest) if p else None for p in present]
        companions = {c: flat[j * n_others : (j + 1) * n_others] for j, c in enumerate(comp_names)}
        return method.merge(name, base, tensors, params, companions)

    return fn


_LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers")


def _output_config(config: dict | None, out_dtype: torch.dtype | None, layers: int | None) -> dict | None:
    if config is None:
        return None
    cfg = json.loads(json.dumps(config))
    if out_dtype is not None:
        name = str(out_dtype).replace("torch.", "")
        cfg["torch_dtype"] = name
        if "dtype" in cfg:
            cfg["dtype"] = name
    if layers is not None:
        for k in _LAYER_KEYS:
            if k in cfg:
                cfg[k] = layers
                break
        else:
            cfg["num_hidden_layers"] = layers
    return cfg


# ---------------------------------------------------------------- running


def run_plan(plan: MergePlan, out: str | Path, *, device: str = "auto",
             shard_size: int = DEFAULT_SHARD_SIZE, overwrite: bool = False,
             allow_nonfinite: bool = False, progress: bool = True) -> dict:
    """Stream the plan into OUT atomically; returns stats."""
    from weightspace.card import model_card

    out = Path(out)
    recipe = plan.spec.to_yaml()
    sink = CheckpointSink(out, plan.outputs(), shard_size=shard_size, overwrite=overwrite,
                          metadata={"weightspace_spec": recipe})
    by_name: dict[str, list[Step]] = {}
    for s in plan.steps:
        by_name.setdefault(s.name, []).append(s)
    ordered = [s for n in sink.order for s in by_name[n]]
    try:
        stats = execute(ordered, sink, device=device, compute_dtype=plan.compute_dtype,
                        progress=progress, allow_nonfinite=allow_nonfinite,
                        desc=plan.method.name)
        sink.finish(config=plan.config, files=plan.tokenizer_files, card=model_card(plan))
    except BaseException:
        sink.abort()
        raise
    stats["out"] = str(out)
    stats["shards"] = len(sink.names)
    return stats
