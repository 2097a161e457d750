"""The planner: a validated spec and its inputs -> a per-tensor plan, reading headers only.

    plan = plan_merge(load_spec("ties.yaml"), spec_dir="examples")
    print(plan.summary())

Everything that can be wrong with a spec or its inputs (unknown method or
parameter, a value out of range, a missing file, missing tensors, shapes or
layer counts that disagree, bad layer ranges, mixed architectures) is found
here, before the first tensor is read. `plan_merge` reads as its steps: the
method, the parameters, the models, their architectures, how the models line
up (one stack, or stacked slices), the tokenizer, one step per output tensor
(weightspace.plan_tensor), the checks on the result.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from weightspace.errors import InputError, SpecError
from weightspace.executor import Step, estimate_peak_bytes
from weightspace.ir import WeightSpace
from weightspace.methods import MergeMethod, get_method
from weightspace.params import ParamResolver, at_field, check_spec_params
from weightspace.plan_tensor import Source, TensorSteps
from weightspace.sink import DEFAULT_SHARD_SIZE
from weightspace.sources import locate, missing_path, open_located
from weightspace.spec import MergeSpec, parse_dtype
from weightspace.structure import depth_t, is_pre_weight, parse_layer
from weightspace.tensor_steps import output_config
from weightspace.tokenizers import (
    Member,
    Settings,
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

    def inputs(self) -> list[Path]:
        """Every file or directory the merge reads: the spec, each model (where it was opened and
        each stored tensor's file), companions and the tokenizer files it copies. The output may
        be none of these, hold none and lie in none."""
        from weightspace.sink import inputs_of

        found: dict[str, Path] = {}
        if self.spec.source and Path(self.spec.source).exists():
            found[self.spec.source] = Path(self.spec.source)
        for space in self.spaces.values():
            for p in inputs_of(space):
                found.setdefault(str(p), p)
        for step in self.steps:
            for ref in step.inputs:
                for leaf in ref.leaves():
                    if (p := getattr(leaf, "path", None)) is not None:
                        found.setdefault(str(p), Path(p))
        files = {**self.tokenizer_files, **(self.vocabulary.files if self.vocabulary else {})}
        for p in files.values():
            found.setdefault(str(p), Path(p))
        return list(found.values())

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




def model_refs(spec: MergeSpec) -> dict[str, tuple]:
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


def check_spec(spec: MergeSpec, *, spec_dir: str | Path | None = None,
               later: frozenset[str] = frozenset()) -> None:
    """What plan_merge checks before it opens a model: the method, every parameter's name, type,
    range and file, and that each model reference exists (on disk or as a Hub id). `later`
    names references that are not made yet (earlier stages of a multi-stage file)."""
    try:
        planner = _Planner(spec, spec_dir, None)
        planner.resolve_method()
        planner.check_parameters()
        for r, loc in model_refs(spec).items():
            if r in later:
                continue
            with at_field(spec, loc):
                found = locate(r, planner.spec_dir)
                if found.path is None and found.hub_id is None and found.lora is None:
                    raise InputError(missing_path(r, found.looked))
    except (SpecError, InputError) as e:
        if not spec.source or spec.source.startswith("<"):
            raise
        raise type(e)(f"{spec.source}: {e}") from None


class _Planner(TensorSteps):
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
        self.models_checked: set[tuple] = set()  # (slice, parameter values) MergeMethod.check_models saw

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
        for r, loc in model_refs(self.spec).items():
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
        refs = model_refs(self.spec)
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
        mergekit 0.1.5, a base_model not listed among the models joins them, last: it is the
        base of a method that uses one and one more model of a method that does not (linear
        averages it with its weight from the global parameters)."""
        spec, base = self.spec, self.spec.base_model
        if spec.models:
            self.slices = [[Source(m.model, m.parameters, None) for m in spec.models]]
            if base and all(m.model != base for m in spec.models):
                self.slices[0].append(Source(base, None, None))
        else:
            self.slices = [[Source(s.model, s.parameters, tuple(s.layer_range)) for s in sl.sources]
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
        if base:  # a base merged as one more model takes its parameters from the global ones
            self.where_of.setdefault(base, f"parameters, for {spec.where('base_model')}")

    def plan_tokenizer(self) -> None:
        """`tokenizer_source` / `tokenizer:` (mergekit's): build the output tokenizer from the
        models' tokenizer files and each model's row map; vocabulary tensors are then read
        through it (see input_refs). `chat_template` alone re-writes the copied tokenizer.
        Reads tokenizer files, no tensor."""
        spec = self.spec
        self.vocabulary: Vocabulary | None = None
        source, source_loc = spec.tokenizer_from
        merged = [r for r, loc in model_refs(spec).items() if loc[0] not in ("tokenizer_source", "tokenizer")]
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
        notes = self.notes + self.method.plan_notes(self.companions)
        notes += [n for n in vocab.notes if n not in notes] if vocab else []
        return MergePlan(spec=self.spec, method=self.method, steps=self.steps, spaces=self.spaces,
                         reference=self.reference, config=config, tokenizer_files=files,
                         compute_dtype=self.spec.compute_dtype, num_layers=self.num_layers,
                         notes=notes, vocabulary=vocab)


__all__ = ["MergePlan", "plan_merge"]
