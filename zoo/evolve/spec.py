"""Search specs: a merge spec with search ranges in place of values, plus how to score a candidate.

    s = load_search_spec("examples/evolve_digits.yaml")
    s.dims                      # [Dim("models[0].parameters.weight", 0.0, 1.5), ...]
    s.candidate([0.5, 0.2, 1])  # the merge spec (a dict) at those values, ready for validate_spec

A search spec is an ordinary merge spec (mergekit's schema, see weightspace.spec) where

- any number may be `{search: [lo, hi]}`: a scalar (`weight: {search: [0, 1]}`), a point of a
  depth gradient (`density: [{search: [0.1, 0.9]}, {search: [0.1, 0.9]}]`, one value per layer
  group) or a filter's value (`- {filter: mlp, value: {search: [0, 1]}}`);
- `merge_method` may be `{choice: [ties, task_arithmetic]}`: the method is searched too. A
  candidate keeps only the parameters its method takes (a `density` reaches ties, not
  task_arithmetic); a parameter that no choice takes is an error;

and two blocks are added:

    search:     {optimizer: cma, popsize: 8, sigma: 0.25, seed: 0, budget: 64}
    evaluation: {data: digits, split: val, test_split: test}

Everything is checked before the first merge: the blocks' fields, every range (finite,
lo < hi, and the spec valid at both ends and the middle, for every method choice), the models
and files the spec names and the evaluation data. Errors name the field and its line.
"""

from __future__ import annotations

import copy
import hashlib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, StrictFloat, StrictInt, StrictStr, field_validator

from weightspace.errors import InputError, SpecError
from weightspace.spec import _fmt_loc, _line_of, _validate, validate_spec
from weightspace.yaml_io import load_yaml, read_yaml_file

OPTIMIZERS = ("cma", "random")
EVALUATORS = ("auto", "zoo", "lm")
METRICS = {"accuracy": "max", "perplexity": "min"}
LM_SUFFIXES = (".jsonl", ".txt")


class SearchSettings(BaseModel):
    """The `search:` block. `sigma` is CMA-ES's initial step as a fraction of every range
    (each searched value is scaled to [0, 1]); `popsize` defaults to CMA-ES's 4 + 3 ln(n)."""

    model_config = ConfigDict(extra="forbid")
    optimizer: Literal["cma", "random"] = "cma"
    popsize: StrictInt | None = None
    sigma: StrictFloat | StrictInt = 0.25
    seed: StrictInt = 0
    budget: StrictInt | None = None

    @field_validator("popsize")
    @classmethod
    def _popsize(cls, v: int | None) -> int | None:
        if v is not None and not 2 <= v <= 10_000:
            raise ValueError(f"must be between 2 and 10000, got {v}")
        return v

    @field_validator("sigma")
    @classmethod
    def _sigma(cls, v: float) -> float:
        if not (math.isfinite(v) and 0 < v <= 1):
            raise ValueError(f"must be in (0, 1] (a fraction of each search range), got {v}")
        return float(v)

    @field_validator("budget")
    @classmethod
    def _budget(cls, v: int | None) -> int | None:
        if v is not None and v < 1:
            raise ValueError(f"must be at least 1, got {v}")
        return v


class Evaluation(BaseModel):
    """The `evaluation:` block: what scores a candidate. `data` is a zoo dataset reference
    (zoo models: accuracy on its `split`) or a file for the language-model evaluator (a .txt
    file: perplexity; a .jsonl file: accuracy); a list scores the mean. `test_split` (zoo) or
    `test_data` (files) is scored once, for the winner, at the end."""

    model_config = ConfigDict(extra="forbid")
    data: StrictStr | list[StrictStr]
    evaluator: Literal["auto", "zoo", "lm"] = "auto"
    split: Literal["train", "val", "test"] = "val"
    test_split: Literal["train", "val", "test"] | None = "test"
    test_data: StrictStr | list[StrictStr] | None = None
    metric: Literal["accuracy", "perplexity"] | None = None
    batch_size: StrictInt = 256
    max_length: StrictInt | None = None  # None: the model's own length (wsmerge eval's default)

    @field_validator("data", "test_data")
    @classmethod
    def _nonempty(cls, v: str | list[str] | None) -> str | list[str] | None:
        if isinstance(v, list) and not v:
            raise ValueError("give at least one dataset or file")
        return v

    @field_validator("batch_size", "max_length")
    @classmethod
    def _positive(cls, v: int | None) -> int | None:
        if v is not None and v < 1:
            raise ValueError(f"must be at least 1, got {v}")
        return v

    def datasets(self) -> list[str]:
        return [self.data] if isinstance(self.data, str) else list(self.data)

    def test_datasets(self) -> list[str]:
        if self.test_data is None:
            return self.datasets() if self.kind == "zoo" else []
        return [self.test_data] if isinstance(self.test_data, str) else list(self.test_data)

    @property
    def kind(self) -> str:
        if self.evaluator != "auto":
            return self.evaluator
        return "lm" if all(d.endswith(LM_SUFFIXES) for d in self.datasets()) else "zoo"

    @property
    def metric_name(self) -> str:
        if self.metric:
            return self.metric
        if self.kind == "lm" and all(d.endswith(".txt") for d in self.datasets()):
            return "perplexity"
        return "accuracy"

    @property
    def maximize(self) -> bool:
        return METRICS[self.metric_name] == "max"


@dataclass(frozen=True)
class Dim:
    """One searched value: where it sits in the spec, and its range (or its method choices)."""

    name: str                        # the field, as errors write it: models[0].parameters.weight
    loc: tuple                       # the path into the spec's data
    lo: float = 0.0
    hi: float = 1.0
    choices: tuple[str, ...] = ()    # merge_method: {choice: [...]}
    init: float | None = None

    def value(self, u: float) -> float | str:
        """The spec's value at the optimiser's coordinate u in [0, 1]."""
        u = min(1.0, max(0.0, float(u)))
        if self.choices:
            return self.choices[min(len(self.choices) - 1, int(u * len(self.choices)))]
        return round(self.lo + (self.hi - self.lo) * u, 12)

    def coordinate(self, value: float) -> float:
        return (value - self.lo) / (self.hi - self.lo)


@dataclass
class SearchSpec:
    """A parsed search spec: the merge spec's data with its searched fields, and the blocks."""

    data: dict                       # the merge spec, {search: ...} and {choice: ...} left in
    dims: list[Dim]
    settings: SearchSettings
    evaluation: Evaluation
    source: str
    spec_dir: Path | None
    text: str = ""
    dropped: dict[str, list[str]] = field(default_factory=dict)   # method -> parameters it does not take

    @property
    def fingerprint(self) -> str:
        """What a resumed search must match: the spec's text."""
        return hashlib.sha256(self.text.encode()).hexdigest()

    def values(self, u: list[float]) -> dict[str, float | str]:
        return {d.name: d.value(x) for d, x in zip(self.dims, u)}

    def candidate(self, u: list[float]) -> dict:
        """The merge spec (data for validate_spec) at optimiser coordinates `u`."""
        if len(u) != len(self.dims):
            raise ValueError(f"{len(u)} coordinates for {len(self.dims)} searched values")
        data = copy.deepcopy(self.data)
        for d, x in zip(self.dims, u):
            _set(data, d.loc, d.value(x))
        return _keep_params_of(data, data["merge_method"])

    def initial(self) -> list[float]:
        """CMA-ES's starting point: each value's `init`, else the middle of its range."""
        return [0.5 if d.init is None else d.coordinate(d.init) for d in self.dims]


def load_search_spec(path: str | Path) -> SearchSpec:
    path = Path(path)
    return parse_search_spec(read_yaml_file(path), str(path), spec_dir=path.parent)


def parse_search_spec(text: str, source: str = "<search spec>", *, spec_dir: str | Path | None = None,
                      check_files: bool = True) -> SearchSpec:
    """Parse and check a search spec (see the module docstring); SpecError naming the field."""
    data, node = load_yaml(text, source)
    if not isinstance(data, dict):
        raise SpecError(f"{source}: a search spec must be a YAML mapping: a merge spec with "
                        f"`search:` and `evaluation:` blocks")

    def where(loc: tuple) -> str:
        line = _line_of(node, loc) if node is not None else None
        return f"{source}: {_fmt_loc(loc)}" + (f" (line {line})" if line else "")

    if "evaluation" not in data:
        raise SpecError(f"{source}: missing the `evaluation:` block (what scores a candidate), e.g. "
                        f"evaluation: {{data: digits, split: val, test_split: test}}")
    settings = _block(data.pop("search", None) or {}, node, source, "search", SearchSettings)
    evaluation = _block(data.pop("evaluation"), node, source, "evaluation", Evaluation)
    dims: list[Dim] = []
    _find_dims(data, (), dims, where)
    if not dims:
        raise SpecError(f"{source}: nothing to search: put {{search: [lo, hi]}} in place of a value "
                        f"(weight: {{search: [0, 1]}}) or merge_method: {{choice: [ties, task_arithmetic]}}")
    if settings.optimizer == "cma" and len(dims) < 2:
        raise SpecError(f"{source}: search.optimizer: CMA-ES needs at least two searched values "
                        f"(here: {dims[0].name}); search one value with optimizer: random, or on a "
                        f"grid with `wsmerge run SPEC OUT --search PARAM=V1,V2,...`")
    if evaluation.kind == "zoo" and evaluation.test_split == evaluation.split \
            and evaluation.test_data is None:
        raise SpecError(f"{where(('evaluation', 'test_split'))}: the search scores split "
                        f"{evaluation.split!r}; the test split reported at the end must be another "
                        f"(or null for none)")
    s = SearchSpec(data, dims, settings, evaluation, source, Path(spec_dir) if spec_dir else None, text)
    _check_candidates(s, where, check_files)
    if check_files:
        _check_evaluation(s, where)
    return s


def _block(value: Any, node, source: str, key: str, model: type[BaseModel]):
    if not isinstance(value, dict):
        line = _line_of(node, (key,)) if node is not None else None
        at = f" (line {line})" if line else ""
        raise SpecError(f"{source}: {key}{at}: expected a mapping, got {type(value).__name__}")
    try:
        return _validate(value, _sub(node, key), source, model, what=f"{key} block",
                         hint=f"{key}: must be a mapping", fields_at=lambda loc: list(model.model_fields))
    except SpecError as e:
        # `_validate` names fields inside the block; say which block
        raise SpecError(str(e).replace(f"invalid {key} block: ", f"invalid {key} block: {key}.", 1)) from None


def _sub(node, key: str):
    import yaml

    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            if k.value == key:
                return v
    return None


def _is_search(v: Any) -> bool:
    return isinstance(v, dict) and "search" in v


def _find_dims(value: Any, loc: tuple, dims: list[Dim], where) -> None:
    """Every `{search: [lo, hi]}` (and `merge_method: {choice: [...]}`) in the spec, in order."""
    if loc == ("merge_method",) and isinstance(value, dict):
        if set(value) != {"choice"} or not isinstance(value["choice"], list) or len(value["choice"]) < 2 \
                or not all(isinstance(c, str) for c in value["choice"]) \
                or len(set(value["choice"])) != len(value["choice"]):
            raise SpecError(f"{where(loc)}: expected a method name or {{choice: [METHOD, METHOD, ...]}} "
                            f"with two or more different method names")
        dims.append(Dim("merge_method", loc, choices=tuple(value["choice"])))
        return
    if _is_search(value):
        dims.append(_dim(value, loc, where))
        return
    if isinstance(value, dict):
        for k, v in value.items():
            if k in ("search", "choice") and not loc:
                continue
            _find_dims(v, (*loc, k), dims, where)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _find_dims(v, (*loc, i), dims, where)


def _dim(value: dict, loc: tuple, where) -> Dim:
    at = where((*loc, "search"))
    extra = set(value) - {"search", "init"}
    if extra:
        raise SpecError(f"{at}: unknown key {sorted(extra)[0]!r} beside search; a searched value is "
                        f"{{search: [lo, hi]}} or {{search: [lo, hi], init: x}}")
    if loc and loc[0] not in ("models", "parameters", "slices"):
        raise SpecError(f"{at}: only parameter values can be searched (under parameters: or "
                        f"models[].parameters:), not {_fmt_loc(loc)}")
    r = value["search"]
    if not (isinstance(r, list) and len(r) == 2 and all(_number(x) for x in r)):
        raise SpecError(f"{at}: expected [lo, hi], two numbers, got {r!r}")
    lo, hi = float(r[0]), float(r[1])
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise SpecError(f"{at}: the range must be finite, got [{lo:g}, {hi:g}]")
    if not lo < hi:
        raise SpecError(f"{at}: expected lo < hi, got [{lo:g}, {hi:g}]")
    init = value.get("init")
    if init is not None and not (_number(init) and lo <= float(init) <= hi):
        raise SpecError(f"{where((*loc, 'init'))}: init must be a number in [{lo:g}, {hi:g}], got {init!r}")
    return Dim(_fmt_loc(loc), loc, lo, hi, init=None if init is None else float(init))


def _number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _set(data: Any, loc: tuple, value: Any) -> None:
    for k in loc[:-1]:
        data = data[k]
    data[loc[-1]] = value


def _keep_params_of(data: dict, method: str) -> dict:
    """The spec with only the parameters `method` takes (for merge_method: {choice: ...})."""
    from weightspace.methods import get_method

    try:
        m = get_method(method)
    except Exception:  # noqa: BLE001 - an unknown method is reported by validate_spec, naming it
        return data
    known = {p.name for p in m.all_global_params()} | {p.name for p in m.model_params} | set(m.companions)
    for holder in [data, *(data.get("models") or []), *(data.get("slices") or []),
                   *(s for sl in data.get("slices") or [] for s in sl.get("sources") or [])]:
        params = holder.get("parameters") if isinstance(holder, dict) else None
        if isinstance(params, dict):
            for k in [k for k in params if k not in known]:
                del params[k]
    return data


def _check_candidates(s: SearchSpec, where, check_files: bool) -> None:
    """The merge spec at the low end, the high end and the middle of every range, for every
    method choice, is valid, and (check_files) names models and files that exist."""
    from weightspace.plan import check_spec

    methods = next((d for d in s.dims if d.choices), None)
    choices = methods.choices if methods else (None,)
    taken: set[str] = set()
    for choice in choices:
        for u, end in ((0.0, "lower end"), (1.0, "upper end"), (0.5, "middle")):
            coords = [u if not d.choices else (d.choices.index(choice) + 0.5) / len(d.choices)
                      for d in s.dims]
            data = s.candidate(coords)
            label = f"{s.source} (every searched value at its {end}" + \
                (f", merge_method {choice}" if choice else "") + ")"
            try:
                spec = validate_spec(data, source=label)
                if check_files:
                    check_spec(spec, spec_dir=s.spec_dir)
            except (SpecError, InputError) as e:
                raise type(e)(str(e)) from None
        if choice is not None:
            taken |= _param_names(_keep_params_of(_with_method(s.data, choice), choice))
    if methods:
        given = _param_names(_with_method(s.data, choices[0]))
        unused = sorted(given - taken)
        if unused:
            raise SpecError(f"{where(('merge_method', 'choice'))}: no method among "
                            f"{', '.join(choices)} takes the parameter {unused[0]!r}")


def _with_method(data: dict, method: str) -> dict:
    d = copy.deepcopy(data)
    d["merge_method"] = method
    return d


def _param_names(data: dict) -> set[str]:
    names: set[str] = set()
    for holder in [data, *(data.get("models") or [])]:
        names |= set((holder.get("parameters") or {}) if isinstance(holder, dict) else {})
    return names


def _check_evaluation(s: SearchSpec, where) -> None:
    ev = s.evaluation
    for key, refs in (("data", ev.datasets()), ("test_data", ev.test_datasets() if ev.test_data else [])):
        for ref in refs:
            if ev.kind == "lm" or ref.endswith(LM_SUFFIXES):
                p = resolve_data(ref, s.spec_dir)
                if not p.is_file():
                    raise InputError(f"{where(('evaluation', key))}: no such file {ref} (looked at {p})")
            else:
                from weightspace.zoo.data import load_task

                try:
                    load_task(ref)
                except SpecError as e:
                    raise SpecError(f"{where(('evaluation', key))}: {e}") from None
    if ev.kind == "lm" and ev.metric_name == "perplexity" and any(d.endswith(".jsonl") for d in ev.datasets()):
        raise SpecError(f"{where(('evaluation', 'metric'))}: perplexity is scored on a text file (.txt); "
                        f"a .jsonl file is scored by accuracy")


def resolve_data(ref: str, spec_dir: Path | None) -> Path:
    """A data file named in a spec: relative to the spec's folder (as model paths are)."""
    p = Path(ref)
    if p.is_absolute() or spec_dir is None:
        return p
    return spec_dir / p


__all__ = ["Dim", "Evaluation", "SearchSettings", "SearchSpec", "load_search_spec", "parse_search_spec",
           "resolve_data"]
