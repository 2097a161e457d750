"""The merge-method registry.

A method is a small class registered under its spec name::

    @register
    class Linear(MergeMethod):
        name = "linear"
        model_params = (Param("weight", required=True),)
        global_params = (Param("normalize", default=True, kind=bool),)

        def merge(self, name, base, tensors, params, companions):
            w = params.model_values("weight")
            ...

`merge` is a pure per-tensor function. It receives the base tensor (or None),
the other models' tensors (base excluded when the method uses a base), the
parameters resolved for this tensor, and companion tensors by name. It runs in
the compute dtype on the chosen device and returns one tensor.
"""

from __future__ import annotations

import difflib
import hashlib
import math
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch

from weightspace.errors import SpecError

if TYPE_CHECKING:
    from weightspace.ir import WeightSpace

BaseUse = Literal["required", "optional", "none"]


@dataclass(frozen=True)
class Param:
    """One parameter of a method: its name, default, type, allowed range and a line of help.

    `ge`/`le` (inclusive) and `gt`/`lt` (exclusive) bound a number, `choices`
    lists the allowed strings; a value outside them is a spec error naming the
    field, so `density: 1.5` fails before anything is read.
    """

    name: str
    default: Any = None
    required: bool = False
    kind: type = float
    doc: str = ""
    path: bool = False  # a file path: resolved against the spec's directory like model paths
    ge: float | None = None
    le: float | None = None
    gt: float | None = None
    lt: float | None = None
    choices: tuple[str, ...] | None = None

    def coerce(self, value: Any, where: str) -> Any:
        """Check one evaluated value against `kind` and the range; raise SpecError naming `where`."""
        return self.check_range(self._coerce_kind(value, where), where)

    def _coerce_kind(self, value: Any, where: str) -> Any:
        if self.kind is bool:
            if isinstance(value, bool):
                return value
        elif self.kind is int:
            if isinstance(value, int) and not isinstance(value, bool):
                return value
            if isinstance(value, float) and value.is_integer():
                return int(value)
        elif self.kind is float:
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                try:
                    value = float(value)
                except OverflowError:  # an int past float's range (a 400-digit weight)
                    raise SpecError(f"{where}: must be a finite number; got an integer of about "
                                    f"{int(value.bit_length() * 0.30103) + 1:,} digits") from None
                if not math.isfinite(value):
                    raise SpecError(f"{where}: must be a finite number; got {value!r}")
                return value
        elif self.kind is str:
            if isinstance(value, str):
                return value
        raise SpecError(f"{where}: expected {self.kind.__name__}, got {value!r}")

    def check_range(self, value: Any, where: str) -> Any:
        if self.choices is not None and value not in self.choices:
            raise SpecError(f"{where}: must be one of {', '.join(map(repr, self.choices))}; "
                            f"got {value!r}")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return value
        bad = ((self.ge is not None and value < self.ge) or (self.le is not None and value > self.le)
               or (self.gt is not None and value <= self.gt) or (self.lt is not None and value >= self.lt))
        if bad:
            raise SpecError(f"{where}: must be {self.range_text()}; got {value!r}")
        return value

    def range_text(self) -> str:
        """The allowed range in words: `in [0, 1]`, `>= 0`, `in (0, 1)`, `'average' or 'first'`."""
        if self.choices is not None:
            return " or ".join(map(repr, self.choices))
        lo, lo_open = (self.gt, True) if self.gt is not None else (self.ge, False)
        hi, hi_open = (self.lt, True) if self.lt is not None else (self.le, False)
        if lo is not None and hi is not None:
            return f"in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
        if lo is not None:
            return f"{'>' if lo_open else '>='} {lo:g}"
        if hi is not None:
            return f"{'<' if hi_open else '<='} {hi:g}"
        return ""


@dataclass(frozen=True)
class TensorParams:
    """Parameters resolved for one output tensor.

    `values` holds the method's global parameters; `per_model[i]` those of
    `tensors[i]`. `layer` and `t` (0..1 depth within the slice) are what the
    gradient interpolation used.
    """

    values: dict[str, Any]
    per_model: list[dict[str, Any]]
    layer: int | None = None
    t: float = 0.0
    seed: int = 0
    tensor_name: str = ""

    def __getitem__(self, key: str) -> Any:
        return self.values[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self.values.get(key, default)

    def model_values(self, key: str) -> list[Any]:
        """The per-model values of one parameter, aligned with `tensors`."""
        return [p[key] for p in self.per_model]

    def generator(self, index: int, device: torch.device | str = "cpu") -> torch.Generator:
        """A generator seeded by (seed, tensor name, model index): deterministic
        for a seed and independent of the order tensors are processed in."""
        digest = hashlib.blake2b(
            f"{self.seed}\x00{self.tensor_name}\x00{index}".encode(), digest_size=8
        ).digest()
        gen = torch.Generator(device=device)
        gen.manual_seed(int.from_bytes(digest, "little") & ((1 << 63) - 1))
        return gen


@dataclass(frozen=True)
class Blocked:
    """How a method streams one large tensor in row blocks.

    `prepare(numel, sample, blocks)` runs first and returns the state the
    blocks need (e.g. TIES trim thresholds); `sample()` yields a spread of
    single rows and `blocks()` every row block, each as (base rows, [model
    rows]). `merge_block(state, base_rows, model_rows)` then merges each block,
    in order, with the executor's prefetching.
    """

    prepare: Callable[[int, Callable[[], Iterator], Callable[[], Iterator]], Any]
    merge_block: Callable[[Any, torch.Tensor, list[torch.Tensor]], torch.Tensor]


class MergeMethod:
    """Base class for merge methods. Subclasses set the class attributes and `merge`."""

    name: ClassVar[str]
    pretty_name: ClassVar[str] = ""
    paper: ClassVar[str | None] = None  # citation shown in model cards and `wsmerge methods`
    reference_url: ClassVar[str | None] = None
    uses_base: ClassVar[BaseUse] = "none"
    global_params: ClassVar[tuple[Param, ...]] = ()
    model_params: ClassVar[tuple[Param, ...]] = ()
    companions: ClassVar[tuple[str, ...]] = ()  # per-model params that name companion spaces
    # True: a companion space may lack a tensor; the method then gets None for it
    companion_optional: ClassVar[bool] = False
    min_models: ClassVar[int] = 1  # counted without the base
    max_models: ClassVar[int | None] = None
    randomized: ClassVar[bool] = False  # adds a global `seed` parameter
    # names mergekit accepts for this method that would change nothing here, each with the
    # sentence a spec setting one is refused with
    ignored_params: ClassVar[dict[str, str]] = {}
    layer_stacking: ClassVar[bool] = False  # passthrough: slices may stack layers
    # True when each output entry depends only on the same entry of the inputs:
    # the executor may then stream a large tensor in row blocks, and compute with one
    # thread (the result does not depend on the thread count: executor.stream_threads).
    elementwise: ClassVar[bool] = False
    # True when the result does not depend on torch's thread count although entries are not
    # independent (TIES: its trim thresholds are integer histograms, the rest elementwise):
    # the executor then computes with one thread too
    thread_invariant: ClassVar[bool] = False

    @property
    def single_threaded(self) -> bool:
        """Whether a CPU merge with this method computes with one torch thread."""
        return self.elementwise or self.thread_invariant

    def all_global_params(self) -> tuple[Param, ...]:
        params = self.global_params
        if self.randomized and not any(p.name == "seed" for p in params):
            params = params + (
                Param("seed", default=0, kind=int, ge=0, doc="random seed; same seed, same result"),
            )
        return params

    def check(self, n_models: int, has_base: bool) -> None:
        """Raise SpecError if the number of models or the base does not fit."""
        if self.uses_base == "required" and not has_base:
            raise SpecError(f"merge_method {self.name!r} needs a base_model")
        lo, hi = self.min_models, self.max_models
        if n_models < lo or (hi is not None and n_models > hi):
            want = f"exactly {lo}" if lo == hi else (f"at least {lo}" if hi is None else f"{lo} to {hi}")
            extra = " besides the base model" if self.uses_base != "none" else ""
            raise SpecError(
                f"merge_method {self.name!r} takes {want} model(s){extra}, got {n_models}"
            )

    def check_params(self, params: TensorParams, where: list[str]) -> None:
        """Raise SpecError when the parameters resolved for one tensor do not fit together
        (`where[i]` names model i's parameters in the spec). Called while planning, before any
        data is read; the range of a single value is its Param's business."""

    def check_models(self, params: TensorParams, base: WeightSpace | None, models: list[WeightSpace],
                     where: list[str]) -> None:
        """Raise InputError when the models themselves do not fit the parameters (aTLAS: a
        coefficients file learned for other models, or for these in another order). Called at
        plan time, once per slice and distinct global parameter values, with the models'
        spaces in the spec's order (base apart) and `where[i]` naming model i in the spec."""

    def companion_shape(self, companion: str, name: str, shape: tuple[int, ...]) -> tuple[int, ...] | None:
        """Shape of `companion`'s tensor for the model tensor `name` (of `shape`), or None when
        that tensor takes no companion (the method then gets None). Default: the same shape."""
        return shape

    def plan_notes(self, companions: dict[str, Any]) -> list[str]:
        """Lines for the run's notes once the plan is made, from the companion spaces it
        opened (path -> WeightSpace): e.g. the layers a statistic did not cover. Default: none."""
        return []

    def blocked(self, name: str, params: TensorParams, n_models: int) -> Blocked | None:
        """A recipe to stream a large tensor in row blocks, or None (take it whole)."""
        return None

    def merge(
        self,
        name: str,
        base: torch.Tensor | None,
        tensors: list[torch.Tensor],
        params: TensorParams,
        companions: dict[str, list[torch.Tensor]],
    ) -> torch.Tensor:
        raise NotImplementedError


_REGISTRY: dict[str, MergeMethod] = {}
_NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")
_loaded_plugins = False


def register(cls: type[MergeMethod]) -> type[MergeMethod]:
    """Class decorator: register a method under `cls.name`; duplicates are refused."""
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ValueError(f"merge method {cls.__name__} needs a snake_case `name`, got {name!r}")
    if name in _REGISTRY:
        raise ValueError(f"merge method {name!r} is already registered")
    _REGISTRY[name] = cls()
    return cls


def _load_plugins() -> None:
    """Import the modules that register methods (entry point group `weightspace.methods`)."""
    global _loaded_plugins
    if _loaded_plugins:
        return
    _loaded_plugins = True
    from importlib import import_module
    from importlib.metadata import entry_points

    found = False
    for ep in entry_points(group="weightspace.methods"):
        ep.load()
        found = True
    if not found:  # running from a source tree that was never installed
        try:
            import_module("weightspace.merges")
        except ImportError:
            pass


def all_methods() -> dict[str, MergeMethod]:
    _load_plugins()
    return dict(sorted(_REGISTRY.items()))


def get_method(name: str) -> MergeMethod:
    """The registered method `name`; an unknown name lists the known ones and the closest."""
    methods = all_methods()
    if name in methods:
        return methods[name]
    close = difflib.get_close_matches(name, list(methods), n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise SpecError(
        f"unknown merge_method {name!r}.{hint} Known methods: {', '.join(methods)}"
    )


def suggest(name: str, known: list[str]) -> str:
    close = difflib.get_close_matches(name, known, n=1)
    return f" Did you mean {close[0]!r}?" if close else ""


__all__ = [
    "BaseUse",
    "Blocked",
    "MergeMethod",
    "Param",
    "TensorParams",
    "all_methods",
    "get_method",
    "register",
    "suggest",
]
