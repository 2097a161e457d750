"""Turn a validated spec into a per-tensor plan, and run it.

    plan = plan_merge(load_spec("ties.yaml"), spec_dir="examples")   # reads headers only
    print(plan.summary())
    run_plan(plan, "runs/ties", device="auto")                       # streams tensor by tensor

Everything that can be wrong with a spec or its inputs (unknown method or
parameter, a value out of range, a missing file, missing tensors, shapes or
layer counts that disagree, bad layer ranges) is found here, before the first
tensor is read. `plan_merge` reads as its steps: the method, the parameters,
the models, how the models line up (one stack, or stacked slices), one step per
output tensor, the checks on the result.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from weightspace.card import Card, model_card
from weightspace.errors import InputError, SpecError
from weightspace.executor import Step, estimate_peak_bytes, execute
from weightspace.ir import TensorRef, WeightSpace, slice_rows
from weightspace.methods import MergeMethod, TensorParams, get_method
from weightspace.params import ParamResolver, at_field, check_spec_params, evaluate
from weightspace.sink import DEFAULT_SHARD_SIZE, CheckpointSink
from weightspace.sources import load_local, locate, open_located
from weightspace.spec import MergeSpec, parse_dtype
from weightspace.structure import depth_t, is_pre_weight, parse_layer
from weightspace.tensor_steps import block_rows, blocked_steps, merge_fn, output_config
from weightspace.tokenizers import (
    Member,
    Settings,
    VocabRowsRef,
    Vocabulary,
    build_vocabulary,
    is_vocab_tensor,
    set_config_vocab_size,
    template_only,
    tokenizer_member,
    tokenizer_only,
)


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
    # the output tokenizer, when the spec builds one (tokenizer_source, tokenizer:, chat_template)
    vocabulary: Vocabulary | None = None

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
            **({"vocab_size": self.vocabulary.rows} if self.vocabulary and self.vocabulary.perms else {}),
        }


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
    source, loc = spec.tokenizer_from
    if source not in (None, "base", "union"):
        refs.setdefault(source, loc)
    return refs


def _architecture(config: dict | None) -> str | None:
    """A model's architecture as its config.json names it (`architectures[0]`, else
    `model_type`), or None without a config."""
    if not config:
        return None
    archs = config.get("architectures")
    if isinstance(archs, list) and archs and isinstance(archs[0], str):
        return archs[0]
    return config.get("model_type") if isinstance(config.get("model_type"), str) else None


def plan_merge(spec: MergeSpec, *, spec_dir: str | Path | None = None,
               out_dtype: str | None = None, allow_crimes: bool = False,
               spaces: Mapping[str, WeightSpace] | None = None) -> MergePlan:
    """Validate a spec against its inputs and build the per-tensor plan (headers only).

    Relative paths in the spec are read against `spec_dir` (the spec file's folder);
    errors name the spec file, the field and its line. Models of different architectures
    (config.json `architectures`) are refused unless `allow_crimes`, as in mergekit. `spaces`
    gives model references already open (in-memory models, weightspace.api) by name.
    """
    try:
        return _Planner(spec, spec_dir, out_dtype, allow_crimes, spaces).plan()
    except (SpecError, InputError) as e:
        if not spec.source or spec.source.startswith("<"):
            raise
        raise type(e)(f"{spec.source}: {e}") from None


class _Planner:
    """The state of one `plan_merge`; each method is one of its steps."""

    def __init__(self, spec: MergeSpec, spec_dir: str | Path | None, out_dtype: str | None,
                 allow_crimes: bool = False, spaces: Mapping[str, WeightSpace] | None = None):
        self.spec = spec
        self.given = dict(spaces or {})
        self.allow_crimes = allow_crimes
        self.spec_dir = Path(spec_dir) if spec_dir else None
        self.out_dtype_name = out_dtype or spec.out_dtype
        self.notes: list[str] = []
        self.steps: list[Step] = []
        self.companions: dict[str, WeightSpace] = {}
        self.companions_used: set[str] = set()
        self.vocab_orders: dict[str, tuple] = {}  # re-ordered vocabulary tensors (see vocab_refs)

    def plan(self) -> MergePlan:
        self.resolve_method()
        self.check_parameters()       # names, types, ranges, files: before any model is opened
        self.open_models()
        self.check_architectures()    # one architecture, unless allow_crimes
        self.line_up_sources()        # which models each output tensor combines, and the base
        self.plan_tokenizer()         # the output vocabulary and each model's rows in it
        if self.layered:
            self.plan_stacked_slices()
        else:
            self.plan_one_stack()
        self.check_outputs()
        return self.result()

    # ------------------------------------------------------------ the steps of plan()

    def resolve_method(self) -> None:
        with at_field(self.spec, ("merge_method",)):
            self.method = get_method(self.spec.merge_method)
        self.resolver = ParamResolver(self.method)
        self.uses_base = self.method.uses_base != "none"

    def check_parameters(self) -> None:
        spec = self.spec
        check_spec_params(spec, self.resolver, self.spec_dir, self.notes)
        self.spec_out = parse_dtype(self.out_dtype_name, "out_dtype") or parse_dtype(spec.dtype)

    def open_models(self) -> None:
        self.spaces: dict[str, WeightSpace] = {}
        self.tokenizer_dirs: dict[str, Path] = {}
        for r, loc in _model_refs(self.spec).items():
            if r in self.given:
                self.spaces[r] = self.given[r]
                continue
            with at_field(self.spec, loc):
                found = locate(r, self.spec_dir)
                if found.note:
                    self.notes.append(f"{self.spec.where(*loc)}: {found.note}")
                if loc[0] in ("tokenizer_source", "tokenizer") and tokenizer_only(found.path):
                    self.tokenizer_dirs[r] = found.path  # a tokenizer without weights, as mergekit allows
                    continue
                self.spaces[r] = open_located(r, found)

    def check_architectures(self) -> None:
        """Every merged model (not a tokenizer-only source) has the same architecture as the
        first, by config.json `architectures` (else `model_type`), as mergekit checks."""
        refs = _model_refs(self.spec)
        merged = [(r, loc) for r, loc in refs.items() if loc != ("tokenizer_source",)]
        kinds = [(r, loc, _architecture(self.spaces[r].meta.get("config"))) for r, loc in merged]
        known = [k for k in kinds if k[2] is not None]
        for r, loc, arch in known[1:]:
            r0, loc0, arch0 = known[0]
            if arch != arch0 and not self.allow_crimes:
                raise InputError(
                    f"{self.spec.where(*loc)}: {r!r} is a {arch} but {r0!r} ({self.spec.where(*loc0)}) "
                    f"is a {arch0}; mixing architectures is refused unless --allow-crimes (as in "
                    f"mergekit), and even then their tensors must line up")

    def line_up_sources(self) -> None:
        """`slices`: per output slice, its sources (one slice for a `models:` spec). As in
        mergekit, a method without a base ignores base_model unless it is also a model."""
        spec, base = self.spec, self.spec.base_model
        if spec.models:
            self.slices = [[_Source(m.model, m.parameters, None) for m in spec.models]]
            if base and self.uses_base and all(m.model != base for m in spec.models):
                self.slices[0].append(_Source(base, None, None))
        else:
            self.slices = [[_Source(s.model, s.parameters, tuple(s.layer_range)) for s in sl.sources]
                           for sl in spec.slices]
            for k, sl in enumerate(spec.slices):
                sb = sl.base_model or base
                if sb and self.uses_base and all(s.model != sb for s in sl.sources):
                    raise SpecError(f"{spec.where('slices', k)}: base_model {sb!r} must be one of the "
                                    f"slice's sources")
        self.layered = not spec.models
        for k, srcs in enumerate(self.slices):
            b, others = self.members(srcs, k)
            with at_field(spec, ("slices", k) if spec.slices else ("models",)):
                self.method.check(len(others), b is not None)
        self.reference = base if (base and base in self.spaces) else self.slices[0][0].ref
        self.where_of: dict[str, str] = {}  # a model's parameters in the spec, with their line
        for i, mdl in enumerate(spec.models or []):
            self.where_of.setdefault(mdl.model, spec.where("models", i, "parameters"))
        for i, sl in enumerate(spec.slices or []):
            for j, src in enumerate(sl.sources):
                self.where_of.setdefault(src.model, spec.where("slices", i, "sources", j, "parameters"))
        if base:
            self.where_of.setdefault(base, "parameters")

    def plan_tokenizer(self) -> None:
        """`tokenizer_source` / `tokenizer:` (mergekit's): build the output tokenizer from the
        models' tokenizer files and each model's row map; vocabulary tensors are then read
        through it (see input_refs). `chat_template` alone re-writes the copied tokenizer.
        Reads tokenizer files, no tensor."""
        spec = self.spec
        self.vocabulary: Vocabulary | None = None
        source, source_loc = spec.tokenizer_from
        merged = [r for r, loc in _model_refs(spec).items() if loc[0] not in ("tokenizer_source", "tokenizer")]
        members = [self.member(r) for r in merged]
        if source is None:
            if spec.chat_template is not None:
                self.vocabulary = template_only(spec.chat_template, self.member(self.reference), members,
                                                spec.where)
            return
        base = spec.base_model or self.reference
        members.sort(key=lambda m: m.ref != base)  # the base first, as mergekit reads them
        settings = Settings(source=source, tokens=dict(spec.tokenizer.tokens or {}) if spec.tokenizer else {},
                            pad_to_multiple_of=spec.tokenizer.pad_to_multiple_of if spec.tokenizer else None,
                            chat_template=spec.chat_template, where=spec.where, source_field=source_loc)
        self.vocabulary = build_vocabulary(settings, self.member(base), members,
                                           self.member(source) if source not in ("base", "union") else None)

    def member(self, ref: str) -> Member:
        """What the tokenizer step needs to know of a model: its directory, config, tokenizer
        files and the rows of its vocabulary tensors (which must agree)."""
        if ref in self.tokenizer_dirs:
            return tokenizer_member(ref, self.tokenizer_dirs[ref])
        space = self.spaces[ref]
        vocab = [(n, space[n].shape[0]) for n in space if is_vocab_tensor(n) and space[n].shape]
        if len({rows for _, rows in vocab}) > 1:
            desc = ", ".join(f"{n!r} has {rows}" for n, rows in vocab)
            raise InputError(f"model {ref!r}: its vocabulary tensors disagree on the number of rows ({desc})")
        where = space.meta.get("location")  # a model directory; a bare file has no tokenizer
        return Member(ref=ref, path=Path(where) if where and Path(where).is_dir() else None,
                      config=space.meta.get("config"), rows=vocab[0][1] if vocab else None,
                      files=dict(space.meta.get("files") or {}))

    def plan_one_stack(self) -> None:
        """A `models:` merge: every tensor of the reference model, combined across the models."""
        srcs, ref_space = self.slices[0], self.spaces[self.reference]
        counts = {s.ref: self.spaces[s.ref].structure().num_layers for s in srcs}
        if len(set(counts.values())) > 1:
            desc = ", ".join(f"{r!r} has {n}" for r, n in counts.items())
            raise InputError(f"the models have different numbers of layers: {desc}")
        for s in srcs:
            extra = [n for n in self.spaces[s.ref] if n not in ref_space]
            if extra:
                raise InputError(f"tensor {extra[0]!r} is in model {s.ref!r} but not in {self.reference!r}"
                                 + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""))
        struct = ref_space.structure()
        self.num_layers = struct.num_layers or None
        for n in ref_space:
            ln = parse_layer(n)
            self.add_step(n, 0, srcs, [n] * len(srcs), depth_t(n, struct), ln.index if ln else None)

    def plan_stacked_slices(self) -> None:
        """mergekit `slices`: the main layer stack is re-indexed slice after slice; tensors
        outside it come from the first slice (embeddings) or the last (norm, head)."""
        ref_space, slices = self.spaces[self.reference], self.slices
        struct = ref_space.structure()
        prefix = struct.main_prefix
        if prefix is None:
            raise InputError(f"model {self.reference!r} has no layer stack to slice")
        self.check_layer_ranges(prefix)
        for n in ref_space:
            ln = parse_layer(n)
            if ln is not None and ln.prefix != prefix:
                raise InputError(f"tensor {n!r}: slices support one layer stack ({prefix!r}) only")
        outside = [n for n in ref_space if parse_layer(n) is None]
        for n in (n for n in outside if is_pre_weight(n)):
            self.add_step(n, 0, slices[0], [n] * len(slices[0]), 0.0, None)
        out_layer = 0
        self.layer_sources = []  # per output layer: (its source model's config, source layer index)
        for k, srcs in enumerate(slices):
            first = srcs[0]
            count = first.layer_range[1] - first.layer_range[0]
            suffixes = [ln.suffix for n in self.spaces[first.ref]
                        if (ln := parse_layer(n)) and ln.prefix == prefix and ln.index == first.layer_range[0]]
            for idx in range(count):
                t = idx / (count - 1) if count > 1 else 1.0
                for suf in suffixes:
                    tail = f".{suf}" if suf else ""
                    in_names = [f"{prefix}.{s.layer_range[0] + idx}{tail}" for s in srcs]
                    self.add_step(f"{prefix}.{out_layer}{tail}", k, srcs, in_names, t, out_layer)
                self.layer_sources.append((self.spaces[first.ref].meta.get("config"),
                                           first.layer_range[0] + idx))
                out_layer += 1
        for n in (n for n in outside if not is_pre_weight(n)):  # t = 0 like the pre weights, as mergekit
            self.add_step(n, len(slices) - 1, slices[-1], [n] * len(slices[-1]), 0.0, None)
        self.num_layers = out_layer
        if out_layer != struct.num_layers:
            self.notes.append(f"output has {out_layer} layers (input {self.reference!r} has "
                              f"{struct.num_layers})")

    def check_layer_ranges(self, prefix: str) -> None:
        for k, sl in enumerate(self.spec.slices or []):
            if sl.residual_weight is not None:
                self.notes.append(f"{self.spec.where('slices', k, 'residual_weight')}: ignored, as in "
                                  f"mergekit 0.1.5, which declares it but never uses it")
        for k, srcs in enumerate(self.slices):
            for j, s in enumerate(srcs):
                n = self.spaces[s.ref].structure().stacks.get(prefix, 0)
                lo, hi = s.layer_range
                if hi > n:
                    raise SpecError(f"{self.spec.where('slices', k, 'sources', j, 'layer_range')}: "
                                    f"{[lo, hi]} is outside model {s.ref!r}, which has {n} layers")
            if len({s.layer_range[1] - s.layer_range[0] for s in srcs}) > 1:
                raise SpecError(f"{self.spec.where('slices', k)}: all sources of a slice must span the "
                                f"same number of layers")

    def check_outputs(self) -> None:
        seen = set()
        for s in self.steps:
            if s.name in seen and "rows" not in s.info and s.shape is not None:
                raise SpecError(f"tensor {s.name!r} would be written twice; check the slices")
            seen.add(s.name)
        unused = [p for p in self.companions if p not in self.companions_used]
        if unused:
            raise InputError(f"companion {unused[0]!r} holds no tensor of the models it is named for "
                             f"(e.g. {next(iter(self.companions[unused[0]]), '-')!r}); is it for another "
                             f"model?")

    def result(self) -> MergePlan:
        ref_space, vocab = self.spaces[self.reference], self.vocabulary
        config = output_config(ref_space.meta.get("config"), self.spec_out,
                                self.num_layers if self.layered else None,
                                self.layer_sources if self.layered else None)
        if vocab is not None and vocab.perms and config is not None:
            set_config_vocab_size(config, vocab.rows)
        files = dict(ref_space.meta.get("files") or {}) if vocab is None else {}
        notes = self.notes + ([n for n in vocab.notes if n not in self.notes] if vocab else [])
        return MergePlan(spec=self.spec, method=self.method, steps=self.steps, spaces=self.spaces,
                         reference=self.reference, config=config, tokenizer_files=files,
                         compute_dtype=self.spec.compute_dtype, num_layers=self.num_layers,
                         notes=notes, vocabulary=vocab)

    # ------------------------------------------------------------ one output tensor

    def members(self, srcs: list[_Source], slice_idx: int) -> tuple[str | None, list[_Source]]:
        """The base (or None) and the other sources of a slice."""
        sb = (self.spec.slices[slice_idx].base_model if self.spec.slices else None) or self.spec.base_model
        if self.uses_base and sb:
            return sb, [s for s in srcs if s.ref != sb]
        return None, list(srcs)

    def add_step(self, out_name: str, slice_idx: int, srcs: list[_Source], in_names: list[str],
                 t: float, layer: int | None) -> None:
        """The step(s) that compute one output tensor from the same tensor of each source."""
        sb, others = self.members(srcs, slice_idx)
        order = ([sb] if sb else []) + [s.ref for s in others]
        name_of = dict(zip([s.ref for s in srcs], in_names))
        if sb and sb not in name_of:
            name_of[sb] = in_names[0]
        refs = self.input_refs(order, name_of, out_name, srcs, slice_idx)
        first = refs[0]
        if not first.dtype.is_floating_point:
            # integer buffers (position ids, counters) are copied from the reference, not merged
            self.steps.append(Step(out_name, first.shape, first.dtype, [first], lambda ts: ts[0],
                                   cast_inputs=False, info={"copied_from": order[0]}))
            return
        params = self.tensor_params(out_name, slice_idx, others, name_of, t, layer)
        comp_refs, present = self.companion_refs(others, params.per_model, name_of, first)
        fn = merge_fn(self.method, out_name, sb is not None, len(others), params,
                       list(self.method.companions), present)
        self.emit(out_name, refs, comp_refs, params, fn, sb is not None,
                  {"t": t, "layer": layer, "models": order})

    def input_refs(self, order: list[str], name_of: dict[str, str], out_name: str,
                   srcs: list[_Source], slice_idx: int) -> list[TensorRef]:
        """The input tensors, base first; present in every model, with one shape and kind.
        With an output tokenizer, a vocabulary tensor of each model comes in its token order."""
        refs = []
        for r in order:
            space, n = self.spaces[r], name_of[r]
            if n not in space:
                raise InputError(f"tensor {n!r} is missing from model {r!r} ({space.source})")
            refs.append(space[n])
        vocab_tensor = is_vocab_tensor(out_name) and refs[0].dtype.is_floating_point
        if vocab_tensor and self.vocabulary is not None and self.vocabulary.perms:
            refs = self.vocab_refs(out_name, order, refs, srcs, slice_idx)
        first = refs[0]
        for r, tref in zip(order[1:], refs[1:]):
            if tref.shape != first.shape:
                hint = ("; the vocabularies differ? tokenizer_source: union (or base) lines the "
                        "rows up by token" if vocab_tensor and self.vocabulary is None
                        and tref.shape[1:] == first.shape[1:] else "")
                raise InputError(f"tensor {tref.name!r}: shape {list(tref.shape)} in model {r!r} does not "
                                 f"match {list(first.shape)} in model {order[0]!r}{hint}")
            if tref.dtype.is_floating_point != first.dtype.is_floating_point:
                raise InputError(f"tensor {tref.name!r}: dtype {str(tref.dtype)[6:]} in model {r!r} cannot "
                                 f"be merged with {str(first.dtype)[6:]} in model {order[0]!r}")
        return refs

    def vocab_refs(self, out_name: str, order: list[str], refs: list[TensorRef], srcs: list[_Source],
                   slice_idx: int) -> list[TensorRef]:
        """Each model's vocabulary tensor in the output's token order (mergekit averages in the
        order of the slice's sources, the base last when it is not one of them)."""
        vocab, by_model = self.vocabulary, dict(zip(order, refs))
        sources = [s.ref for s in srcs]
        avg_order = sources + [r for r in order if r not in sources]
        sb = (self.spec.slices[slice_idx].base_model if self.spec.slices else None) or self.spec.base_model
        aligned = vocab.align(out_name, avg_order, by_model, base=sb if sb in by_model else None,
                              work_dtype=self.spec.compute_dtype)
        self.vocab_orders[out_name] = (avg_order, sb if sb in by_model else None, by_model)
        return [aligned[r] for r in order]

    def tensor_params(self, out_name: str, slice_idx: int, others: list[_Source],
                      name_of: dict[str, str], t: float, layer: int | None) -> TensorParams:
        """The method's parameters for this tensor (gradients at depth t, conditions by name),
        checked together by the method."""
        spec, resolver = self.spec, self.resolver
        sp = spec.slices[slice_idx].parameters if spec.slices else None
        gvals = {p.name: resolver.value(p, out_name, t, [sp, spec.parameters], "parameters", True)
                 for p in self.method.all_global_params()}
        per_model = [{p.name: resolver.value(p, name_of[s.ref], t, [s.params, sp, spec.parameters],
                                             self.where_of[s.ref], True)
                      for p in resolver.per_model.values()} for s in others]
        params = TensorParams(values=gvals, per_model=per_model, layer=layer, t=t,
                              seed=int(gvals.get("seed", 0) or 0), tensor_name=out_name)
        try:
            self.method.check_params(params, [self.where_of[s.ref] for s in others])
        except SpecError as e:
            raise SpecError(f"{e} (for tensor {out_name!r})") from None
        return params

    def companion_refs(self, others: list[_Source], per_model: list[dict], name_of: dict[str, str],
                       first: TensorRef) -> tuple[list[TensorRef], list[bool]]:
        """Each companion's tensor for each model (in companion-major order), and per
        (companion, model) whether there is one (False: the method gets None)."""
        refs: list[TensorRef] = []
        present: list[bool] = []
        for c in self.method.companions:
            for s, pm in zip(others, per_model):
                if pm[c] not in self.companions:
                    self.companions[pm[c]] = load_local(pm[c])  # resolved by check_spec_params
                space = self.companions[pm[c]]
                tname = name_of[s.ref]
                want = self.method.companion_shape(c, tname, tuple(first.shape))
                if want is None or (tname not in space and self.method.companion_optional):
                    present.append(False)
                    continue
                self.companions_used.add(pm[c])
                if tname not in space:
                    raise InputError(f"companion {c} {pm[c]!r} has no tensor {tname!r} "
                                     f"(it holds {len(space)} tensors, e.g. {next(iter(space), '-')!r}); "
                                     f"is it for another model?")
                cref = space[tname]
                if tname in self.vocab_orders and isinstance(first, VocabRowsRef):
                    cref = self.vocab_companion(c, pm[c], tname, s.ref, others, per_model, cref)
                if tuple(cref.shape) != tuple(want):
                    raise InputError(f"companion {c} {pm[c]!r}: tensor {cref.name!r} has shape "
                                     f"{list(cref.shape)}, expected {list(want)} for the model's "
                                     f"{list(first.shape)}; is it for another model?")
                refs.append(cref)
                present.append(True)
        for pm in per_model:  # methods see companion paths resolved (spec-relative -> absolute)
            for c in self.method.companions:
                resolved = self.companions[pm[c]].meta.get("location")
                if resolved:
                    pm[c] = str(resolved)
        return refs, present

    def vocab_companion(self, c: str, path: str, tname: str, model: str, others: list[_Source],
                        per_model: list[dict], cref: TensorRef) -> TensorRef:
        """A companion of a re-ordered vocabulary tensor (a Fisher diagonal: one value per
        weight) re-ordered the same way; another shape (a Gram matrix of the inputs) as it is."""
        order, base, raw = self.vocab_orders[tname]
        if tuple(cref.shape) != tuple(raw[model].shape):
            return cref
        crefs = {}
        for s, pm in zip(others, per_model):
            if pm[c] not in self.companions:
                self.companions[pm[c]] = load_local(pm[c])  # resolved by check_spec_params
            space = self.companions[pm[c]]
            if tname in space and tuple(space[tname].shape) == tuple(raw[s.ref].shape):
                crefs[s.ref] = space[tname]
        return self.vocabulary.align_companion(tname, order, crefs, model, base=base,
                                               work_dtype=self.spec.compute_dtype)

    def emit(self, name: str, refs: list[TensorRef], comp_refs: list[TensorRef], params: TensorParams,
             fn: Callable[[list[torch.Tensor]], torch.Tensor], has_base: bool, info: dict) -> None:
        """One step for the whole tensor, or row blocks for a large one (elementwise methods),
        or a statistics pass and row blocks (methods with a `blocked` recipe, such as TIES)."""
        first = refs[0]
        out_dtype = self.spec_out or first.dtype
        # a re-ordered vocabulary tensor streams in row blocks of its own (VocabRowsRef.block);
        # a statistics pass (TIES) would read it whole per block, so it is one step there
        vocab = any(isinstance(r, VocabRowsRef) for r in refs)
        rows = block_rows(first, BLOCK_BYTES) if self.method.elementwise else None
        blocked = None
        if rows is None and not vocab and has_base and not self.method.companions and first.nbytes > BLOCKED_MIN_BYTES:
            blocked = self.method.blocked(name, params, len(refs) - 1)
        if blocked is not None:
            self.steps += blocked_steps(blocked, name, refs, out_dtype, self.spec.compute_dtype, info,
                                        BLOCK_BYTES)
            return
        all_refs = refs + comp_refs
        if rows is None:
            self.steps.append(Step(name, first.shape, out_dtype, all_refs, fn, info=info))
            return
        for r0 in range(0, first.shape[0], rows):
            r1 = min(first.shape[0], r0 + rows)
            self.steps.append(Step(name, (r1 - r0, *first.shape[1:]), out_dtype,
                                   [r.block(r0, r1) if isinstance(r, VocabRowsRef) else slice_rows(r, r0, r1)
                                    for r in all_refs], fn,
                                   info={**info, "rows": (r0, r1), "full_shape": first.shape}))


# Elementwise methods stream tensors larger than this (per input) in row blocks,
# so their peak memory does not depend on the largest tensor either.
BLOCK_BYTES = 32 * 2**20


# Methods with a `blocked` recipe (TIES) stream tensors larger than this per input.
BLOCKED_MIN_BYTES = 128 * 2**20


# ---------------------------------------------------------------- running


def run_plan(plan: MergePlan, out: str | Path, *, device: str = "auto",
             shard_size: int = DEFAULT_SHARD_SIZE, overwrite: bool = False,
             allow_nonfinite: bool = False, progress: bool = True, copy_tokenizer: bool = True,
             write_card: bool = True) -> dict:
    """Stream the plan into OUT atomically; returns stats. OUT also gets the spec as
    `mergekit_config.yml` (where mergekit users and Hub tooling look for the recipe), the
    tokenizer files unless `copy_tokenizer` is off and the model card unless `write_card` is."""
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
        sink.finish(config=plan.config, files=plan.tokenizer_files if copy_tokenizer else {},
                    card=model_card(card_of(plan)) if write_card else None,
                    texts={"mergekit_config.yml": recipe},
                    tokenizer=plan.vocabulary if copy_tokenizer else None)
    except BaseException:
        sink.abort()
        raise
    stats["out"] = str(out)
    stats["shards"] = len(sink.names)
    return stats


def card_of(plan: MergePlan) -> Card:
    """What the model card of this merge says (see weightspace.card)."""
    m, cfg = plan.method, plan.config or {}
    return Card(method=m.name, pretty_name=m.pretty_name, paper=m.paper, paper_url=m.reference_url,
                title=plan.spec.name or "merged model", base_model=plan.spec.base_model,
                models=list(plan.spaces), spec_yaml=plan.spec.to_yaml(),
                hub_ids=list(dict.fromkeys(h for r in plan.spaces for k in ("hub_id", "adapter_hub_id")
                                           if (h := plan.spaces[r].meta.get(k)))),
                # zoo checkpoints are not transformers models
                transformers=bool(cfg.get("architectures")) or cfg.get("model_type") not in (None, "weightspace-zoo"))


__all__ = ["MergePlan", "card_of", "evaluate", "plan_merge", "run_plan"]
