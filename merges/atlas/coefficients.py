"""The aTLAS coefficients and their file: `values[i, b]` scales task vector i on block b.

    c = load_coefficients("coeffs.safetensors")
    c.lambda_for(0, "layers.0.weight")        # tensor(0.73), or a (P,) tensor with partitions
    save_coefficients(c, "copy.safetensors")

One safetensors file holds the tensor "coefficients"; its `__metadata__` names the blocks,
the tasks, the partitions, the partition seed, how the values were learned, and which models
the task vectors came from (`models`: resolved path and content fingerprint, see
merges/atlas/identity.py). The checks a merge runs against a file (`check_fits`,
`check_task_order`) live here too.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from weightspace.errors import InputError, SpecError
from weightspace.files import FileCache, save_safetensors_atomic
from weightspace.inputs import parse_json
from weightspace.paths import expand_user
from weightspace.safetensors_io import read_header, read_tensor

FORMAT = "atlas-coefficients"


@dataclass
class Coefficients:
    """Learned coefficients: `values[i, b]` (or `values[i, b, p]`) scales task vector i on block b.

        c = load_coefficients("coeffs.safetensors")
        c.lambda_for(0, "layers.0.weight")        # tensor(0.73), or a (P,) tensor with partitions

    `blocks` are tensor names in the IR's order, `tasks` the task vectors' names (the
    fine-tuned models, in the order a spec must list them), `partitions` 1 (none) or P,
    `seed` the partition seed, `meta` how they were learned (objective, settings, history),
    `models` per task vector {"name", "path", "fingerprint"} of the model it came from
    (`learn_coefficients` records them; None: unknown, and then a merge cannot check them;
    the file records each path relative to its own folder).
    """

    values: torch.Tensor
    blocks: list[str]
    tasks: list[str]
    partitions: int = 1
    seed: int = 0
    meta: dict[str, Any] = field(default_factory=dict)
    models: list[dict[str, Any]] | None = None
    _index: dict[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.blocks = [str(b) for b in self.blocks]
        self.tasks = [str(t) for t in self.tasks]
        problem = _shape_problem(self.values, len(self.tasks), len(self.blocks), self.partitions)
        if problem:
            raise InputError(f"coefficients: {problem}")
        if self.models is not None and not (
                isinstance(self.models, list) and len(self.models) == len(self.tasks)
                and all(isinstance(m, dict) and isinstance(m.get("fingerprint"), str) for m in self.models)):
            raise InputError(f"coefficients: models must list one {{name, path, fingerprint}} per task "
                             f"vector ({len(self.tasks)})")
        if len(set(self.blocks)) != len(self.blocks):
            dup = next(b for b in self.blocks if self.blocks.count(b) > 1)
            raise InputError(f"coefficients: block {dup!r} is listed twice")
        self.values = self.values.detach().to("cpu", torch.float32)
        self._index = {b: j for j, b in enumerate(self.blocks)}

    def lambda_for(self, task_index: int, block_name: str) -> torch.Tensor:
        """The coefficient of task vector `task_index` on block `block_name`: a scalar, or (P,)."""
        if not 0 <= task_index < len(self.tasks):
            raise InputError(f"coefficients: task index {task_index} is outside 0..{len(self.tasks) - 1}")
        j = self._index.get(block_name)
        if j is None:
            raise InputError(f"coefficients: no block {block_name!r}")
        return self.values[task_index, j]

    def has_block(self, block_name: str) -> bool:
        return block_name in self._index


def _shape_problem(values: Any, n_tasks: int, n_blocks: int, partitions: Any) -> str | None:
    if not isinstance(values, torch.Tensor) or not values.is_floating_point():
        return "values must be a floating-point tensor"
    if not isinstance(partitions, int) or isinstance(partitions, bool) or partitions < 1:
        return f"partitions must be a positive integer, got {partitions!r}"
    want = (n_tasks, n_blocks) if partitions == 1 else (n_tasks, n_blocks, partitions)
    if tuple(values.shape) != want:
        what = "tasks x blocks" + (" x partitions" if partitions > 1 else "")
        return (f"values have shape {list(values.shape)}, but {n_tasks} task(s), {n_blocks} block(s)"
                f"{f' and {partitions} partitions' if partitions > 1 else ''} need {list(want)} ({what})")
    if n_tasks == 0 or n_blocks == 0:
        return "there must be at least one task and one block"
    if not bool(torch.isfinite(values).all()):
        return "values hold NaN or Inf"
    return None


def save_coefficients(c: Coefficients, path: str | Path) -> Path:
    """Write coefficients to one safetensors file, atomically (temporary file + os.replace).

        save_coefficients(coeffs, "coeffs.safetensors")

    The tensor is "coefficients"; `__metadata__` holds format, blocks, tasks, partitions,
    seed, meta (JSON) and, when known, models (JSON: each task vector's path and fingerprint).
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        raise SpecError(f"{path}: a coefficients file is a .safetensors file; name it *.safetensors")
    metadata = {
        "format": "pt",
        "kind": FORMAT,
        "blocks": json.dumps(c.blocks),
        "tasks": json.dumps(c.tasks),
        "partitions": str(c.partitions),
        "seed": str(c.seed),
        "meta": json.dumps(c.meta, sort_keys=True, default=str),
    }
    if c.models is not None:
        metadata["models"] = json.dumps([{**m, "path": _relative(m.get("path"), path)} for m in c.models])
    return save_safetensors_atomic({"coefficients": c.values.to(torch.float32)}, path, metadata)


def _relative(model: str | None, file: Path) -> str | None:
    """A model's path as the file records it: relative to the file's folder, so that a file
    committed or shared with its models names no folder of the machine it was learned on
    (only messages show it; models are matched by fingerprint)."""
    if model is None or not Path(model).is_absolute():
        return model
    try:
        return os.path.relpath(model, expand_user(file).resolve().parent)
    except ValueError:  # another drive (Windows): keep it absolute
        return model


def is_coefficients_file(path: str | Path) -> bool:
    """True when `path` is a safetensors file written by `save_coefficients` (header only)."""
    try:
        entries, meta = read_header(Path(path))
    except Exception:  # noqa: BLE001 - anything unreadable is simply not a coefficients file
        return False
    return meta.get("kind") == FORMAT and "coefficients" in entries


def load_coefficients(path: str | Path) -> Coefficients:
    """Read and check a coefficients file; a malformed one raises InputError naming it."""
    path = expand_user(path)
    if not path.is_file():
        raise InputError(f"{path}: no such coefficients file")
    entries, meta = read_header(path)
    where = f"coefficients file {str(path)!r}"
    if meta.get("kind") != FORMAT or "coefficients" not in entries:
        raise InputError(f"{where} is not an aTLAS coefficients file (write it with "
                         f"save_coefficients or `wsmerge atlas learn`)")
    try:
        blocks = parse_json(meta["blocks"], where, "corrupt metadata")
        tasks = parse_json(meta["tasks"], where, "corrupt metadata")
        partitions = int(meta["partitions"])
        seed = int(meta["seed"])
        info = parse_json(meta.get("meta", "{}"), where, "corrupt metadata")
        models = parse_json(meta["models"], where, "corrupt metadata") if "models" in meta else None
    except (KeyError, ValueError) as e:
        raise InputError(f"{where}: corrupt metadata ({e})") from None
    if not (isinstance(blocks, list) and all(isinstance(b, str) for b in blocks)
            and isinstance(tasks, list) and all(isinstance(t, str) for t in tasks)
            and isinstance(info, dict)):
        raise InputError(f"{where}: corrupt metadata (blocks and tasks must be lists of names)")
    values = read_tensor(path, entries["coefficients"])
    problem = _shape_problem(values, len(tasks), len(blocks), partitions)
    if problem:
        raise InputError(f"{where}: {problem}")
    try:
        return Coefficients(values.float(), blocks, tasks, partitions, seed, info, models)
    except InputError as e:
        raise InputError(f"{where}: {str(e).removeprefix('coefficients: ')}") from None


_CACHE = FileCache()


def cached_coefficients(path: str | Path) -> Coefficients:
    """`load_coefficients(path)`, read once per process (keyed by path, size and mtime)."""
    return _CACHE.get(path, load_coefficients, what="coefficients file")


def check_fits(c: Coefficients, name: str, n_models: int, where: str) -> None:
    """Refuse coefficients learned for another number of task vectors, or without tensor `name`."""
    if len(c.tasks) != n_models:
        raise InputError(f"{where} holds coefficients for {len(c.tasks)} task vector(s) "
                         f"({', '.join(c.tasks)}), but {n_models} fine-tuned model(s) are given "
                         f"besides the base")
    if not c.has_block(name):
        raise InputError(f"tensor {name!r} has no coefficients in {where}: coefficients learned for "
                         f"other block names (e.g. {c.blocks[0]!r}); were they learned for this base?")


def check_task_order(c: Coefficients, models: Sequence[str | Path | None], where: str) -> None:
    """For a file that records no model fingerprints (`c.models` None: written before they
    were recorded, or built by hand): refuse models that are not, in order, the task vectors
    `c` was learned for, where the file's task names tell for certain. Files with
    fingerprints are checked by `identity.check_identities` instead.

        check_task_order(c, [ft.meta.get("location") for ft in fts], "the coefficients")

    `models[i]` is the absolute path of model i (a WeightSpace's `meta["location"]`), or
    None where it has none (tensors in memory). A task the file names by an absolute path
    (learn_coefficients records a model opened from disk so) must be the model at its
    position: it is refused when that path is listed at another position (another order),
    or when it still exists and another model stands at its position (another model). Not
    checked, since nothing tells for certain: task names that are labels (`task_names`,
    "task0") or relative paths (`wsmerge atlas learn` records --task-vectors as written,
    relative to where it ran), a recorded path that no longer exists (the model moved),
    and models without a path. Their order is the caller's to keep.
    """
    given = [None if m is None else Path(m) for m in models]
    for i, (task, model) in enumerate(zip(c.tasks, given)):
        recorded = Path(task)
        if model is None or not recorded.is_absolute() or _same_path(recorded, model):
            continue
        elsewhere = [j for j, m in enumerate(given) if m is not None and j != i and _same_path(recorded, m)]
        if not elsewhere and not recorded.exists():
            continue
        problem = (f"task vector {i} ({task}) is given as model {elsewhere[0]}" if elsewhere
                   else f"model {i} is {model}, not task vector {i} ({task})")
        raise InputError(f"{where}: learned for the task vectors {c.tasks} in this order, but the "
                         f"models are {[str(m) for m in models]}: {problem}; list the fine-tuned models "
                         f"in the file's task order")


def _same_path(a: Path, b: Path) -> bool:
    if a == b:
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist
        return False
