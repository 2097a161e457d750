"""The planner's steps for one output tensor: input refs, parameters, companions, and the
executor steps that compute it (whole, in row blocks, or a statistics pass then row blocks).

`_Planner` (weightspace.plan) inherits these; they read the planner's state (spec, method,
spaces, the vocabulary) and append to its steps.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

import weightspace.tensor_steps as tensor_steps  # its block sizes are read at call time (tests set them)
from weightspace.errors import InputError, SpecError
from weightspace.executor import Step
from weightspace.ir import TensorRef, slice_rows
from weightspace.methods import TensorParams
from weightspace.sources import load_local
from weightspace.tensor_steps import block_rows, blocked_steps, merge_fn
from weightspace.tokenizers import (
    VocabRowsRef,
    is_vocab_tensor,
)


@dataclass
class Source:
    """One input of an output slice: a model reference, its parameters, its layer range."""

    ref: str  # model reference as written in the spec
    params: dict | None
    layer_range: tuple[int, int] | None


class TensorSteps:
    """One output tensor's planning steps (a mixin of weightspace.plan._Planner)."""


    def members(self, srcs: list[Source], slice_idx: int) -> tuple[str | None, list[Source]]:
        """The base (or None) and the other sources of a slice."""
        sb = (self.spec.slices[slice_idx].base_model if self.spec.slices else None) or self.spec.base_model
        if self.uses_base and sb:
            return sb, [s for s in srcs if s.ref != sb]
        return None, list(srcs)

    def add_step(self, out_name: str, slice_idx: int, srcs: list[Source], in_names: list[str],
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
        self.check_models(sb, others, params, slice_idx)
        comp_refs, present = self.companion_refs(others, params.per_model, name_of, first)
        fn = merge_fn(self.method, out_name, sb is not None, len(others), params,
                       list(self.method.companions), present)
        self.emit(out_name, refs, comp_refs, params, fn, sb is not None,
                  {"t": t, "layer": layer, "models": order})

    def check_models(self, sb: str | None, others: list[Source], params: TensorParams, slice_idx: int) -> None:
        """The method's check of the models themselves (MergeMethod.check_models): once per
        slice and distinct global parameter values."""
        key = (slice_idx, repr(sorted(params.values.items())))
        if key in self.models_checked:
            return
        self.models_checked.add(key)
        self.method.check_models(params, self.spaces[sb] if sb else None,
                                 [self.spaces[s.ref] for s in others], [self.where_of[s.ref] for s in others])

    def input_refs(self, order: list[str], name_of: dict[str, str], out_name: str,
                   srcs: list[Source], slice_idx: int) -> list[TensorRef]:
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

    def vocab_refs(self, out_name: str, order: list[str], refs: list[TensorRef], srcs: list[Source],
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

    def tensor_params(self, out_name: str, slice_idx: int, others: list[Source],
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

    def companion_refs(self, others: list[Source], per_model: list[dict], name_of: dict[str, str],
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

    def vocab_companion(self, c: str, path: str, tname: str, model: str, others: list[Source],
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
        rows = block_rows(first, tensor_steps.BLOCK_BYTES) if self.method.elementwise else None
        blocked = None
        if rows is None and not vocab and has_base and not self.method.companions and first.nbytes > tensor_steps.BLOCKED_MIN_BYTES:
            blocked = self.method.blocked(name, params, len(refs) - 1)
        if blocked is not None:
            self.steps += blocked_steps(blocked, name, refs, out_dtype, self.spec.compute_dtype, info,
                                        tensor_steps.BLOCK_BYTES)
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


