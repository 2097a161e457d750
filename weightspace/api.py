"""Merges of in-memory state dicts and modules, as mergekit 0.1.5's Python API calls them.

    from weightspace import merge_state_dicts
    merged = merge_state_dicts([base.state_dict(), math.state_dict(), code.state_dict()], "ties",
                               base=0, parameters={"weight": [1.0, 1.0, 0.5], "density": 0.5})
    model.load_state_dict(merged)

The same validation and planner as a YAML spec (unknown methods and parameters, ranges, shapes)
run on the tensors given; only the reading is different. A parameter is a scalar (for every
input, or a method's global setting), a sequence with one value per input in `models` order,
or a mapping from input id to value. As in mergekit's API there are no depth gradients: a spec
gives those.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from weightspace.errors import SpecError
from weightspace.executor import execute
from weightspace.ir import WeightSpace
from weightspace.methods import get_method
from weightspace.sink import MemorySink

StateDictLike = Mapping[str, torch.Tensor] | nn.Module


def merge_state_dicts(models: Mapping[Hashable, StateDictLike] | Sequence[StateDictLike], method: str, *,
                      parameters: Mapping[str, Any] | None = None, base: Hashable | None = None,
                      strict: bool = True, dtype: torch.dtype | str | None = None,
                      out_dtype: torch.dtype | str | None = None,
                      device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Merge state dicts (or modules, by their `state_dict()`) with `method`.

    `models` is a sequence (ids 0, 1, ...) or a mapping id -> state dict; `base` is the id of
    the base model among them. With `strict`, every model must hold the same tensor names;
    otherwise the names all of them hold are merged. `dtype` is the compute dtype (default
    float32), `out_dtype` the result's (default: each input tensor's). Returns name -> tensor
    in the first model's order.
    """
    from weightspace.plan import plan_merge
    from weightspace.spec import validate_spec

    items = list(models.items()) if isinstance(models, Mapping) else list(enumerate(models))
    if not items:
        raise SpecError("merge_state_dicts: give at least one model")
    ids = [i for i, _ in items]
    if len(set(map(repr, ids))) != len(ids):
        raise SpecError("merge_state_dicts: two models have the same id")
    if base is not None and base not in ids:
        raise SpecError(f"merge_state_dicts: base {base!r} is not one of the models' ids {ids}")
    dicts = [_as_state_dict(m, i) for i, m in items]
    names = _common_names(dicts, ids, strict)
    refs = {i: f"input:{k}" for k, i in enumerate(ids)}
    spaces = {refs[i]: WeightSpace.from_tensors({n: d[n] for n in names}, {"source": f"model {i!r}"})
              for i, d in zip(ids, dicts)}
    m = get_method(method)
    per_model = {p.name for p in m.model_params} | set(m.companions)
    spec: dict[str, Any] = {"merge_method": method, "models": [{"model": refs[i]} for i in ids]}
    if base is not None:
        spec["base_model"] = refs[base]
    shared: dict[str, Any] = {}
    for name, value in (parameters or {}).items():
        if isinstance(value, (Mapping, Sequence)) and not isinstance(value, str):
            if name not in per_model:
                raise SpecError(f"merge_state_dicts: parameters.{name}: per-input values are for "
                                f"per-model parameters; {method}'s are {', '.join(sorted(per_model)) or 'none'}")
            values = _per_input(name, value, ids)
            for entry, i in zip(spec["models"], ids):
                if i in values:  # a mapping may leave inputs out (the base, say)
                    entry.setdefault("parameters", {})[name] = values[i]
        else:
            shared[name] = value
    if shared:
        spec["parameters"] = shared
    for key, dt in (("dtype", dtype), ("out_dtype", out_dtype)):
        if dt is not None:
            spec[key] = str(dt).replace("torch.", "")
    # validated as a spec file is, naming fields (models[1].parameters.density) without lines
    parsed = validate_spec(spec, source="merge_state_dicts")
    plan = plan_merge(parsed, spaces=spaces)
    sink = MemorySink()
    execute(plan.steps, sink, device=device, compute_dtype=plan.compute_dtype, progress=False)
    return {n: sink.result(n) for n in names}


def merge_tensors(tensors: Sequence[torch.Tensor], method: str, *,
                  parameters: Mapping[str, Any] | None = None, base_index: int | None = None,
                  name: str = "tensor", dtype: torch.dtype | str | None = None,
                  out_dtype: torch.dtype | str | None = None) -> torch.Tensor:
    """Merge the inputs of one output tensor (`name` picks what filters and layer rules see)."""
    merged = merge_state_dicts([{name: t} for t in tensors], method, parameters=parameters,
                               base=base_index, dtype=dtype, out_dtype=out_dtype)
    return merged[name]


def _as_state_dict(model: StateDictLike, model_id: Hashable) -> Mapping[str, torch.Tensor]:
    if isinstance(model, nn.Module):
        model = model.state_dict()
    if not isinstance(model, Mapping):
        raise SpecError(f"merge_state_dicts: model {model_id!r} is a {type(model).__name__}, "
                        f"not a state dict or module")
    bad = next((k for k, v in model.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)), None)
    if bad is not None:
        raise SpecError(f"merge_state_dicts: model {model_id!r}: {bad!r} is not a name -> tensor entry")
    return {k: v.detach() for k, v in model.items()}


def _common_names(dicts: list[Mapping[str, torch.Tensor]], ids: list, strict: bool) -> list[str]:
    keys = [set(d) for d in dicts]
    everything = set().union(*keys)
    if strict and any(k != everything for k in keys):
        i = next(i for i, k in zip(ids, keys) if k != everything)
        missing = sorted(everything - keys[ids.index(i)])
        raise SpecError(f"merge_state_dicts: model {i!r} has no tensor {missing[0]!r}"
                        + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
                        + "; pass strict=False to merge only the names every model has")
    return [n for n in dicts[0] if all(n in k for k in keys)]


def _per_input(name: str, value: Mapping | Sequence, ids: list) -> dict:
    if isinstance(value, Mapping):
        unknown = [k for k in value if k not in ids]
        if unknown:
            raise SpecError(f"merge_state_dicts: parameters.{name}: {unknown[0]!r} is not a model id")
        return {i: value[i] for i in ids if i in value}
    if len(value) != len(ids):
        raise SpecError(f"merge_state_dicts: parameters.{name}: {len(value)} values for {len(ids)} models")
    return dict(zip(ids, value))


__all__ = ["merge_state_dicts", "merge_tensors"]
