"""Zoo specs: a dataset, an architecture, training settings and grid axes.

    name: digits-phases
    dataset: digits
    arch: {arch: mlp, depth: 2}
    train: {optimizer: sgd, lr: 0.05, epochs: 30, schedule: cosine, checkpoints: [5, 15]}
    grid:
      width: [4, 8, 16, 32, 64]          # an architecture knob   (load-like)
      batch_size: [16, 64, 256]          # a training setting     (temperature-like)
      seed: [0, 1]
    metrics: {hessian_iters: 20, trace_samples: 20}

Every combination of the grid's values is one model (`ModelRun`). An axis is
`seed`, `dataset`, `arch` (the architecture name), any architecture knob
(`width`, `depth`, `patch`, ...) or any training setting (`lr`,
`batch_size`, `weight_decay`, `data_fraction`, `epochs`, `optimizer`, ...).
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator

from weightspace.errors import SpecError
from weightspace.methods import suggest
from weightspace.sources import locate
from weightspace.spec import parse_yaml_model, read_yaml_file
from weightspace.zoo.arch import ARCHITECTURES
from weightspace.zoo.data import load_task
from weightspace.zoo.train import ModelRun, TrainConfig

# above this many models a build asks for --yes
LARGE_ZOO = 1000
# no zoo is larger: its catalog, the grid's expansion and its builds stay in memory
MAX_MODELS = 100_000


class MetricsConfig(BaseModel):
    """Settings of `wsmerge zoo metrics` (landscape metrics per checkpoint)."""

    model_config = ConfigDict(extra="forbid")

    checkpoints: str = Field("last", pattern="^(last|all)$")
    max_examples: int | None = Field(512, ge=1)
    hessian_iters: int = Field(20, ge=1)
    trace_samples: int = Field(20, ge=1)
    bezier_steps: int = Field(200, ge=0)
    pairs: bool = True          # mode connectivity and CKA between seeds of one config


class ZooSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = "zoo"
    dataset: str = "digits"
    arch: dict[str, Any] = {"arch": "mlp"}
    train: dict[str, Any] = {}
    grid: dict[str, list[Any]] = {}
    init: str | None = None          # fine-tune every model from this checkpoint
    metrics: MetricsConfig = MetricsConfig()
    # what reading the spec had to say (a path found only in the working directory)
    _notes: list[str] = PrivateAttr(default_factory=list)

    @property
    def notes(self) -> list[str]:
        return self._notes

    @field_validator("grid")
    @classmethod
    def _axes(cls, grid: dict[str, list[Any]]) -> dict[str, list[Any]]:
        for axis, values in grid.items():
            if not values:
                raise ValueError(f"axis {axis!r} is empty; give at least one value")
            if len({repr(v) for v in values}) != len(values):
                raise ValueError(f"axis {axis!r} repeats a value: {values}")
        return grid

    def axis_target(self, axis: str) -> str:
        """Where a grid axis goes: run (seed, dataset), arch, or train."""
        if axis in ("seed", "dataset", "init"):
            return "run"
        if axis == "arch" or any(axis in knobs for knobs in ARCHITECTURES.values()):
            return "arch"
        if axis in TrainConfig.model_fields:
            return "train"
        known = ["seed", "dataset", "arch", *sorted({k for v in ARCHITECTURES.values() for k in v}),
                 *TrainConfig.model_fields]
        raise SpecError(f"grid.{axis}: unknown axis.{suggest(axis, known)} "
                        f"Axes: seed, dataset, arch, architecture knobs "
                        f"({', '.join(sorted({k for v in ARCHITECTURES.values() for k in v}))}) "
                        f"or training settings ({', '.join(TrainConfig.model_fields)})")

    def count(self) -> int:
        """Models in the grid: the product of the axis lengths (nothing is expanded)."""
        n = 1
        for values in self.grid.values():
            n *= len(values)
        return n

    def check_count(self, limit: int = MAX_MODELS) -> int:
        """The model count, counted from the axes before any combination is made; SpecError
        above MAX_MODELS, or above `limit` (LARGE_ZOO: a build then asks for --yes)."""
        n = self.count()
        if n > MAX_MODELS:
            sizes = " x ".join(f"{len(v)} {a}" for a, v in self.grid.items())
            raise SpecError(f"grid: {n:,} models ({sizes}) is more than the {MAX_MODELS:,} one zoo may "
                            f"hold; shrink the grid")
        if n > limit:
            raise SpecError(f"this spec makes {n} models (more than {limit}); "
                            f"pass --yes to build them, or shrink the grid")
        return n

    def runs(self, limit: int = MAX_MODELS) -> list[ModelRun]:
        """Every model of the grid, validated; errors name the axis and value. The grid is
        counted first (`check_count(limit)`)."""
        axes = list(self.grid)
        targets = [self.axis_target(a) for a in axes]
        self.check_count(limit)
        out = []
        for combo in itertools.product(*(self.grid[a] for a in axes)):
            run: dict[str, Any] = {"dataset": self.dataset, "arch": dict(self.arch),
                                   "train": dict(self.train), "seed": 0, "init": self.init}
            for axis, target, value in zip(axes, targets, combo):
                if target == "run":
                    run[axis] = value
                elif target == "arch":
                    run["arch"][axis] = value
                else:
                    run["train"][axis] = value
            where = ", ".join(f"{a}={v!r}" for a, v in zip(axes, combo))
            try:
                out.append(ModelRun.model_validate(run))
            except ValidationError as e:
                err = e.errors()[0]
                loc = ".".join(str(p) for p in err["loc"])
                msg = err["msg"].removeprefix("Value error, ")
                raise SpecError(f"{loc}: {msg} (grid point {where})") from None
            except SpecError as e:
                raise SpecError(f"{e} (grid point {where})") from None
        return out


def check_model_sizes(spec: ZooSpec, runs: list[ModelRun]) -> None:
    """Every distinct architecture of the grid within MAX_PARAMS on its dataset (a meta-device
    build each, nothing allocated), before anything is trained; errors name the grid point."""
    from weightspace.zoo.arch import check_model_size

    axes = [a for a in spec.grid if spec.axis_target(a) == "arch" or a == "dataset"]
    tasks = {ref: load_task(ref) for ref in sorted({r.dataset for r in runs})}
    seen: set[str] = set()
    for r in runs:
        key = repr((sorted(r.arch.items()), r.dataset))
        if key in seen:
            continue
        seen.add(key)
        task = tasks[r.dataset]
        try:
            check_model_size(r.arch, task.input_shape, task.num_classes)
        except SpecError as e:
            where = ", ".join(f"{a}={r.dataset if a == 'dataset' else r.arch.get(a)!r}" for a in axes)
            raise SpecError(f"{e}{f' (grid point {where})' if where else ''}") from None


def parse_zoo_spec(text: str, source: str = "<zoo spec>", folder: str | Path | None = None, *,
                   max_models: int = MAX_MODELS) -> ZooSpec:
    """Validate a zoo spec. An `init` checkpoint path (top level or a grid axis) is read against
    `folder`, the spec file's own folder (see weightspace.sources.locate), so a spec means the
    same from any working directory; without a folder, against the working directory. A grid
    of more than `max_models` models is refused before it is expanded (`ZooSpec.check_count`),
    and every architecture is bounded in size (`check_model_sizes`)."""
    spec = parse_yaml_model(text, source, ZooSpec, what="zoo spec",
                            hint="a zoo spec must be a YAML mapping (dataset, arch, train, grid)",
                            fields_at=lambda loc: list(ZooSpec.model_fields) if not loc else [])

    def resolve(ref: str, where: str) -> str:
        found = locate(ref, folder)
        if found.path is None:
            raise SpecError(f"{where}: {ref}: no such checkpoint (looked for "
                            f"{' or '.join(map(str, found.looked))})")
        if found.note:
            spec.notes.append(f"{source}: {where}: {found.note}")
        return str(found.path.resolve())

    try:
        if spec.init is not None:
            spec.init = resolve(spec.init, "init")
        if "init" in spec.grid:
            spec.grid["init"] = [resolve(v, f"grid.init[{i}]") if isinstance(v, str) else v
                                 for i, v in enumerate(spec.grid["init"])]
        runs = spec.runs(max_models)
        check_model_sizes(spec, runs)     # loads every dataset of the grid once
    except SpecError as e:
        raise SpecError(f"{source}: {e}") from None
    return spec


def load_zoo_spec(path: str | Path) -> ZooSpec:
    """Read and validate a zoo spec file (paths in it are read against its folder)."""
    return parse_zoo_spec(read_yaml_file(path, "zoo spec"), source=str(path), folder=Path(path).parent)
