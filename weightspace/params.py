"""Merge parameters as a spec sets them: checked up front, resolved per tensor.

    resolver = ParamResolver(get_method("ties"))
    check_spec_params(spec, resolver, spec_dir, notes)      # names, types, ranges, files
    density = resolver.value(param, "model.layers.3.mlp.up_proj.weight", t=0.5, layers=[...], ...)

A setting is mergekit's: a scalar, a list of numbers interpolated over depth (a
gradient), or `{filter, value}` conditions where the first match wins. Lookups go
source -> slice -> global `parameters` -> the method's default.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

from weightspace.errors import InputError, SpecError
from weightspace.methods import MergeMethod, Param, suggest
from weightspace.sources import locate
from weightspace.spec import Condition, MergeSpec


def evaluate(setting: Any, tensor_name: str, t: float) -> Any:
    """mergekit 0.1.5's rule: a scalar as is; a list of numbers interpolated at t; a list of
    other scalars (booleans, strings) read as steps, entry int(t * (n - 1)); conditions, the
    first whose filter is in the tensor name."""
    if isinstance(setting, list):
        if not setting:
            return None
        scalars = all(isinstance(e, (bool, int, float, str)) for e in setting)
        numbers = all(isinstance(e, (int, float)) and not isinstance(e, bool) for e in setting)
        if scalars and not numbers:
            return setting[int(t * (len(setting) - 1))]
        if numbers:
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


class ParamResolver:
    """Looks a parameter up: source -> slice -> global spec -> method default."""

    def __init__(self, method: MergeMethod):
        self.method = method
        self.globals = {p.name: p for p in method.all_global_params()}
        self.per_model = {p.name: p for p in method.model_params}
        for c in method.companions:  # a companion is a file path, read like model paths
            given = self.per_model.get(c) or Param(c, required=True, kind=str)
            self.per_model[c] = replace(given, path=True)
        self.paths: dict[str, str] = {}  # path values as written -> absolute paths (see check_spec_params)

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
def at_field(spec: MergeSpec, loc: tuple) -> Iterator[None]:
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


def check_spec_params(spec: MergeSpec, resolver: ParamResolver, spec_dir: Path | None,
                  notes: list[str]) -> None:
    """Every parameter the spec sets: a known name, a value of the right type and range, and for
    paths a file that exists (read against the spec's folder) -- before any model is opened."""
    for params, loc, per_model in _param_settings(spec):
        for name, setting in (params or {}).items():
            p = resolver.param(name, per_model)
            if p is None and name in resolver.method.ignored_params:
                raise SpecError(f"{spec.where(*loc, name)}: {resolver.method.ignored_params[name]}")
            if p is None:
                known = resolver.known(per_model)
                raise SpecError(
                    f"{spec.where(*loc, name)}: unknown parameter for merge_method "
                    f"{resolver.method.name!r}.{suggest(name, known)} Its parameters: "
                    f"{', '.join(known) or 'none'}")
            for v, vloc in _setting_values(setting, (*loc, name)):
                p.coerce(v, spec.where(*vloc))
                if p.path and isinstance(v, str) and v not in resolver.paths:
                    with at_field(spec, vloc):
                        found = locate(v, spec_dir)
                        if found.path is None:
                            raise InputError(_missing_file(v, found.looked))
                    if found.note:
                        notes.append(f"{spec.where(*vloc)}: {found.note}")
                    resolver.paths[v] = str(found.path.resolve())


def _missing_file(ref: str, looked: tuple[Path, ...]) -> str:
    where = " or ".join(str(q) for q in looked)
    return f"{ref}: no such file" + (f" (looked for {where})" if where and where != ref else "")


__all__ = ["ParamResolver", "at_field", "check_spec_params", "evaluate"]
