"""YAML merge specs, validated by pydantic before any tensor is read.

The schema is mergekit's where the concepts are shared, so a mergekit config
for a supported method runs unchanged::

    merge_method: ties
    base_model: ./base
    models:
      - model: ./math
        parameters: {weight: 0.5, density: 0.5}
      - model: ./code
        parameters: {weight: 0.5, density: 0.5}
    parameters: {normalize: true}
    dtype: float32

A parameter value is a scalar, a list of numbers interpolated over layer
depth (a gradient), or a list of `{filter: substring, value: v}` conditions
where the first match wins (a condition without a filter matches all).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar, Union

import torch
import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    PrivateAttr,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    Tag,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from weightspace.chat_templates import check_chat_template
from weightspace.errors import SpecError
from weightspace.yaml_io import load_yaml, load_yaml_documents, read_yaml_file

M = TypeVar("M", bound=BaseModel)

Scalar = Union[StrictBool, StrictInt, StrictFloat, StrictStr]
# numbers are interpolated over depth; booleans and strings are steps (mergekit 0.1.5)
Gradient = list[Scalar]


class Condition(BaseModel):
    model_config = ConfigDict(extra="forbid")
    filter: str | None = None
    value: Scalar | Gradient


ParamValue = Union[Scalar, Gradient, list[Condition]]
Params = dict[str, ParamValue]


def _nonfinite(setting: Any) -> str | None:
    """The first number in a parameter setting (scalar, gradient, conditions) that is not a finite
    float: NaN, Inf, or an integer too large for one (a 400-digit weight), in words."""
    if isinstance(setting, float):
        return None if math.isfinite(setting) else repr(setting)
    if isinstance(setting, int) and not isinstance(setting, bool):
        return None if abs(setting) <= _FLOAT_MAX else f"an integer of {_digits(setting)} digits"
    if isinstance(setting, list):
        for x in setting:
            bad = _nonfinite(x.value if isinstance(x, Condition) else x)
            if bad is not None:
                return bad
    return None


_FLOAT_MAX = int(sys.float_info.max)


def _digits(n: int) -> str:
    """How many decimal digits `n` has, without str(n) (which Python refuses past 4300 digits)."""
    return f"about {int(abs(n).bit_length() * math.log10(2)) + 1:,}"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")

    @field_validator("parameters", check_fields=False)
    @classmethod
    def _finite(cls, v: Params | None) -> Params | None:
        # a NaN weight would otherwise surface as NaN tensors halfway through the merge
        for name, setting in (v or {}).items():
            bad = _nonfinite(setting)
            if bad is not None:
                raise ValueError(f"{name} must be a finite number, got {bad}")
        return v


class InputModel(_Strict):
    model: str
    parameters: Params | None = None


class SliceSource(_Strict):
    model: str
    layer_range: tuple[int, int]
    parameters: Params | None = None

    @field_validator("layer_range")
    @classmethod
    def _range(cls, v: tuple[int, int]) -> tuple[int, int]:
        if v[0] < 0 or v[1] <= v[0]:
            raise ValueError(
                f"layer_range must be [start, end) with 0 <= start < end, got {list(v)}"
            )
        return v


class OutputSlice(_Strict):
    sources: list[SliceSource]
    base_model: str | None = None
    # in mergekit 0.1.5's slice schema but used nowhere in its merge; accepted, and ignored too
    residual_weight: float | None = None
    parameters: Params | None = None

    @field_validator("sources")
    @classmethod
    def _nonempty(cls, v: list[SliceSource]) -> list[SliceSource]:
        if not v:
            raise ValueError("a slice needs at least one source")
        return v


class ZeroEmbedding(_Strict):
    """`{kind: zero}`: the token's rows are zeros."""

    kind: Literal["zero"]


class ModelTokenEmbedding(_Strict):
    """`{kind: model_token, model: M, token: T}` (or `token_id: N`): the row of token T (or row N)
    in model M's own vocabulary."""

    kind: Literal["model_token"]
    model: str
    token: str | None = None
    token_id: StrictInt | None = None

    @model_validator(mode="after")
    def _one_token(self) -> ModelTokenEmbedding:
        if (self.token is None) == (self.token_id is None):
            raise ValueError("give exactly one of 'token' or 'token_id'")
        if self.token_id is not None and self.token_id < 0:
            raise ValueError(f"token_id must be >= 0, got {self.token_id}")
        return self


def _source_kind(v: Any) -> str | None:
    if isinstance(v, str):
        return "model"
    if isinstance(v, dict):
        return v.get("kind") if v.get("kind") in ("zero", "model_token") else None
    return getattr(v, "kind", None)


# a model, {kind: zero} or {kind: model_token, ...}, told apart by `kind` so an error is about
# the form meant, not one message per form
TokenSource = Annotated[
    Union[Annotated[StrictStr, Tag("model")], Annotated[ZeroEmbedding, Tag("zero")],
          Annotated[ModelTokenEmbedding, Tag("model_token")]],
    Discriminator(_source_kind, custom_error_type="token_source",
                  custom_error_message="use a model, {kind: zero} or {kind: model_token, model: M, "
                                       "token: T}"),
]


class TokenEmbedding(_Strict):
    """How one token's embedding rows are made: `source` (a model, `{kind: zero}` or
    `{kind: model_token, ...}`; unset: the usual rule), and `force` (every model takes the
    source's row, also models that have the token)."""

    source: TokenSource | None = None
    force: StrictBool = False


class TokenizerSettings(_Strict):
    """mergekit's `tokenizer:` block."""

    source: StrictStr = "union"
    tokens: dict[str, TokenEmbedding] | None = None
    pad_to_multiple_of: StrictInt | None = None

    @field_validator("pad_to_multiple_of")
    @classmethod
    def _positive(cls, v: int | None) -> int | None:
        if v is not None and v < 1:
            raise ValueError(f"must be a positive integer, got {v}")
        return v


DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float64": torch.float64, "fp64": torch.float64,
}  # fmt: skip


def parse_dtype(name: str | None, field: str = "dtype") -> torch.dtype | None:
    if name is None:
        return None
    try:
        return DTYPES[name]
    except KeyError:
        raise SpecError(
            f"{field}: unknown dtype {name!r}; use one of float32, float16, bfloat16"
        ) from None


class MergeSpec(_Strict):
    merge_method: str
    base_model: str | None = None
    models: list[InputModel] | None = None
    slices: list[OutputSlice] | None = None
    parameters: Params | None = None
    dtype: str | None = None
    out_dtype: str | None = None
    tokenizer_source: str | None = None
    tokenizer: TokenizerSettings | None = None
    chat_template: str | None = None
    name: str | None = None  # shown in the model card
    # mergekit's per-module merges (multi-tower models); refused with a sentence, not "unknown key"
    modules: dict[str, Any] | None = None
    # the YAML node tree and file it was read from, so later errors can name a field's line
    _node: Any = PrivateAttr(default=None)
    _source: str | None = PrivateAttr(default=None)

    @property
    def source(self) -> str | None:
        """The file (or label) the spec was read from, if any."""
        return self._source

    def where(self, *loc: str | int) -> str:
        """A field path with its YAML line when known: `models[2].model (line 9)`."""
        line = _line_of(self._node, loc) if self._node is not None and loc else None
        return _fmt_loc(loc) + (f" (line {line})" if line else "")

    def with_origin_of(self, other: MergeSpec) -> MergeSpec:
        """This spec, reporting lines and file as `other` (a copy with a value changed) does."""
        self._node, self._source = other._node, other._source
        return self

    @field_validator("dtype", "out_dtype")
    @classmethod
    def _dtype(cls, v: str | None) -> str | None:
        if v is not None and v not in DTYPES:
            raise ValueError(f"unknown dtype {v!r}; use float32, float16 or bfloat16")
        return v

    @field_validator("tokenizer")
    @classmethod
    def _not_both(cls, v: TokenizerSettings | None, info: ValidationInfo) -> TokenizerSettings | None:
        if v is not None and info.data.get("tokenizer_source") is not None:
            raise ValueError("give tokenizer_source or a tokenizer: block (its source: says the "
                             "same), not both")
        return v

    @field_validator("chat_template")
    @classmethod
    def _chat_template(cls, v: str | None) -> str | None:
        return None if v is None else check_chat_template(v)

    @model_validator(mode="after")
    def _one_of(self) -> MergeSpec:
        if self.modules is not None:
            raise ValueError("modules: mergekit's per-module merges are not supported; merge each "
                             "module's models with models or slices")
        if bool(self.models) == bool(self.slices):
            raise ValueError("give exactly one of 'models' or 'slices'")
        return self

    @property
    def tokenizer_from(self) -> tuple[str | None, tuple[str, ...]]:
        """The tokenizer source (`union`, `base`, a model, or None: copy the files) and its field."""
        if self.tokenizer is not None:
            return self.tokenizer.source, ("tokenizer", "source")
        return self.tokenizer_source, ("tokenizer_source",)

    @property
    def compute_dtype(self) -> torch.dtype:
        return parse_dtype(self.dtype) or torch.float32

    def to_yaml(self) -> str:
        return (
            yaml.safe_dump(
                self.model_dump(exclude_none=True, mode="json"), sort_keys=False
            ).rstrip()
            + "\n"
        )


def _line_of(node: yaml.Node | None, loc: tuple) -> int | None:
    """Follow a pydantic error location through the YAML node tree to a line number: the
    deepest part of it the file has; None when not even its top-level key is in the file (a
    value set by --search)."""
    line = node.start_mark.line + 1 if node is not None else None
    for depth, key in enumerate(loc):
        if isinstance(node, yaml.MappingNode):
            nxt = None
            for k, v in node.value:
                if k.value == key:
                    nxt = v
                    line = k.start_mark.line + 1
                    break
            if nxt is None and depth == 0:
                return None
            node = nxt
        elif isinstance(node, yaml.SequenceNode) and isinstance(key, int) and key < len(node.value):
            node = node.value[key]
            line = node.start_mark.line + 1
        else:
            break
        if node is None:
            break
    return line


def _fmt_loc(loc: tuple) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or "(top level)"


def _clean_loc(loc: tuple) -> tuple:
    """Drop pydantic's union-branch labels (`float`, `list[Condition]`, ...) from a location."""
    keep = []
    for k, part in enumerate(loc):
        if k >= 2 and loc[k - 2 : k] == ("tokenizer", "tokens"):
            keep.append(part)  # a token, such as [PAD]: never a pydantic label
            continue
        if k >= 1 and loc[k - 1] == "source" and part in ("model", "zero", "model_token"):
            continue  # the tag of the form a token's source took
        if isinstance(part, str) and (
            "[" in part
            or part in ("bool", "int", "float", "str")
            or part.startswith(("function-", "tagged-union"))
        ):
            continue
        keep.append(part)
    return tuple(keep)


def _fields_at(loc: tuple) -> list[str]:
    """The keys allowed at a location (for 'did you mean' on unknown keys)."""
    model: type[BaseModel] = MergeSpec
    for k, part in enumerate(loc):
        if isinstance(part, int):
            continue
        if k >= 1 and loc[k - 1] == "tokens":
            model = TokenEmbedding  # the key is a token
            continue
        sub = {"models": InputModel, "slices": OutputSlice, "sources": SliceSource,
               "tokenizer": TokenizerSettings, "tokens": TokenEmbedding}.get(str(part))
        if part == "source" and model is TokenEmbedding:
            sub = ModelTokenEmbedding  # the form with the most keys
        if sub is None:
            return []
        model = sub
    return list(model.model_fields)


def load_spec(path: str | Path) -> MergeSpec:
    """Read and validate a YAML spec; errors name the file, field path and line."""
    return parse_spec(read_yaml_file(path), source=str(path))


def parse_spec(text: str, source: str = "<spec>") -> MergeSpec:
    spec, node = _parse_yaml(text, source, MergeSpec, what="merge spec",
                             hint="a merge spec must be a YAML mapping with a merge_method",
                             fields_at=_fields_at)
    spec._node, spec._source = node, source
    return spec


def validate_spec(data: Any, source: str) -> MergeSpec:
    """A MergeSpec from data already in memory (a spec changed by --search, the Python API's
    arguments): the same checks and the same one-line errors as a file's, without lines."""
    spec = _validate(data, None, source, MergeSpec, what="merge spec",
                     hint="a merge spec must be a mapping with a merge_method", fields_at=_fields_at)
    spec._source = source
    return spec


def parse_yaml_model(text: str, source: str, model: type[M], *, what: str, hint: str,
                     fields_at: Callable[[tuple], list[str]] | None = None) -> M:
    """Safe-load YAML and validate it with a pydantic model; errors name the field path and line."""
    return _parse_yaml(text, source, model, what=what, hint=hint, fields_at=fields_at)[0]


def _parse_yaml(text: str, source: str, model: type[M], *, what: str, hint: str,
                fields_at: Callable[[tuple], list[str]] | None = None) -> tuple[M, yaml.Node]:
    data, node = load_yaml(text, source)
    return _validate(data, node, source, model, what=what, hint=hint, fields_at=fields_at), node


def yaml_documents(text: str, source: str) -> list[tuple[Any, yaml.Node]]:
    """Every non-empty document of a YAML stream (`---` between them): (data, node)."""
    return [(d, n) for d, n in load_yaml_documents(text, source) if d is not None]


def parse_specs(text: str, source: str = "<spec>") -> list[MergeSpec]:
    """One MergeSpec per YAML document (a multi-stage file, as mergekit-multi reads it)."""
    specs = []
    for k, (data, node) in enumerate(yaml_documents(text, source)):
        where = source if k == 0 else f"{source} (document {k + 1})"
        spec = _validate(data, node, where, MergeSpec, what="merge spec",
                         hint="a merge spec must be a YAML mapping with a merge_method",
                         fields_at=_fields_at)
        spec._node, spec._source = node, source
        specs.append(spec)
    if not specs:
        raise SpecError(f"{source}: a merge spec must be a YAML mapping with a merge_method")
    return specs


# The longest text one field of a spec may hold. A spec is recorded in every output shard's
# safetensors metadata and in the model card, so its text must stay small (a 120 MB `name:`
# made a checkpoint whose header `wsmerge inspect` then refused).
MAX_TEXT = 64 * 1024


def _check_text(data: Any, node: yaml.Node | None, source: str) -> None:
    """Refuse a string (value or key) longer than MAX_TEXT anywhere in a spec, naming its field.
    Iterative: the YAML reader bounds a spec's size and depth, not the stack of this walk."""
    todo: list[tuple[Any, tuple]] = [(data, ())]
    while todo:
        value, loc = todo.pop()
        if isinstance(value, str) and len(value) > MAX_TEXT:
            line = _line_of(node, loc) if node is not None else None
            at = f" (line {line})" if line else ""
            raise SpecError(f"{source}: {_fmt_loc(loc)}{at}: {len(value):,} characters of text; a spec "
                            f"field holds at most {MAX_TEXT:,} (64 KiB), since the spec is recorded "
                            f"in the output's metadata and model card")
        if isinstance(value, dict):
            for k, v in value.items():
                todo.append((k, loc))
                todo.append((v, (*loc, k if isinstance(k, (str, int)) else str(k))))
        elif isinstance(value, list):
            todo.extend((v, (*loc, i)) for i, v in enumerate(value))


def _validate(data: Any, node: yaml.Node | None, source: str, model: type[M], *, what: str, hint: str,
              fields_at: Callable[[tuple], list[str]] | None = None) -> M:
    if not isinstance(data, dict):
        raise SpecError(f"{source}: {hint}")
    if model is MergeSpec and "merge_method" not in data and "experts" in data:
        raise SpecError(f"{source}: this is a mixture-of-experts config (mergekit-moe's `experts`), "
                        f"not a merge spec: build it with `wsmerge moe {source} OUT`")
    if model is MergeSpec and ("search" in data and "evaluation" in data):
        raise SpecError(f"{source}: this is a search spec (its `search:` and `evaluation:` blocks), not a "
                        f"merge spec: run the search with `wsmerge evolve {source} -o DIR`, then "
                        f"`wsmerge run DIR/best.yaml OUT`")
    _check_text(data, node, source)
    try:
        return model.model_validate(data)
    except ValidationError as e:
        seen = set()
        lines = []
        for err in e.errors():
            loc = _clean_loc(err["loc"])
            key = (loc, err["msg"])
            if key in seen:
                continue
            seen.add(key)
            where = _fmt_loc(loc)
            line = _line_of(node, loc)
            at = f" (line {line})" if line else ""
            msg = err["msg"]
            if err["type"] == "extra_forbidden":
                msg = f"unknown key {loc[-1]!r}" if loc else "unknown key"
                if loc and fields_at is not None:
                    import difflib

                    # (a key that is a field of another form, e.g. `model` beside `kind: zero`)
                    fields = [f for f in fields_at(loc[:-1]) if f != loc[-1]]
                    close = difflib.get_close_matches(str(loc[-1]), fields, n=1)
                    msg += f"; did you mean {close[0]!r}?" if close else ""
            elif msg.startswith("Value error, "):
                msg = msg[len("Value error, ") :]
            lines.append(f"{where}{at}: {msg}")
        # a union failure produces one message per branch; keep it short
        if len(lines) > 6:
            lines = lines[:6] + [f"... and {len(lines) - 6} more"]
        if len(lines) == 1:  # the usual case: one line
            raise SpecError(f"{source}: invalid {what}: {lines[0]}") from None
        raise SpecError(f"{source}: invalid {what}:\n  " + "\n  ".join(lines)) from None


__all__ = [
    "Condition",
    "InputModel",
    "MergeSpec",
    "OutputSlice",
    "ParamValue",
    "SliceSource",
    "TokenEmbedding",
    "TokenizerSettings",
    "load_spec",
    "parse_dtype",
    "parse_specs",
    "parse_spec",
    "parse_yaml_model",
    "read_yaml_file",
    "validate_spec",
]
