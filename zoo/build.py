"""Build a zoo from a spec: train what is missing, batched, on local processes or Ray.

    report = build_zoo(load_zoo_spec("examples/zoo/digits-phases.yaml"), "runs/zoo")
    report.trained, report.skipped, report.seconds
    build_zoo(spec, "runs/zoo", on_progress=lambda p: print(p.models_done, p.epochs_done))

Resumable: a model whose id (a hash of its full config) is in the catalog is
not trained again; a killed build loses at most the models in flight. The
catalog grows by one log line per finished batch and is compacted once at the
end (see `weightspace.zoo.store`), so saving a model costs the same in a zoo of
ten models or of ten thousand.

Progress: the models of a batch finish together, so besides the saved models
the workers report every finished epoch of every batch (model-epochs), which
keeps a progress display moving while the first batches train.
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from weightspace.errors import SpecError
from weightspace.zoo.executors import check_executor, default_workers, map_units
from weightspace.zoo.spec import LARGE_ZOO, MAX_MODELS, ZooSpec, check_model_sizes
from weightspace.zoo.store import Zoo
from weightspace.zoo.train import ModelRun, TrainResult, group_runs, train_batch

ZOO_MODEL_TYPE = "weightspace-zoo"


def checkpoint_config(run: ModelRun, epoch: int, input_shape: tuple[int, ...], num_classes: int) -> dict:
    """config.json of a zoo checkpoint: enough to rebuild the module and to retrain it."""
    d = run.to_dict()
    return {"model_type": ZOO_MODEL_TYPE, "model_id": run.model_id, "epoch": epoch,
            "dataset": d["dataset"], "arch": d["arch"], "train": d["train"], "seed": d["seed"],
            "input_shape": list(input_shape), "num_classes": num_classes,
            **({"init": d["init"]} if d.get("init") else {})}


def run_columns(run: ModelRun) -> dict[str, Any]:
    """Flat catalog columns of a run's config."""
    d = run.to_dict()
    cols: dict[str, Any] = {"dataset": d["dataset"], "arch": d["arch"]["arch"]}
    cols.update({k: v for k, v in d["arch"].items() if k != "arch"})
    train = dict(d["train"])
    train["betas"] = list(train["betas"])
    train["checkpoints"] = list(train["checkpoints"])
    cols.update(train)
    cols["seed"] = d["seed"]
    if d.get("init"):
        cols["init"] = d["init"]
    return cols


def payload_of(result: TrainResult, input_shape: tuple[int, ...], num_classes: int) -> dict[str, Any]:
    """A trained model as plain data: catalog rows and, per checkpoint, safetensors bytes + config."""
    from safetensors.torch import save

    run = result.run
    cols = run_columns(run)
    last = run.train.checkpoint_epochs[-1]
    rows, files = [], {}
    for ck in result.checkpoints:
        cfg = checkpoint_config(run, ck.epoch, input_shape, num_classes)
        meta = {"format": "pt", "weightspace.zoo": json.dumps({"model_id": run.model_id, "epoch": ck.epoch})}
        files[ck.epoch] = {"model.safetensors": save({k: v.contiguous() for k, v in ck.tensors.items()}, meta),
                           "config.json": json.dumps(cfg, indent=2) + "\n"}
        rows.append({
            "model_id": run.model_id, "epoch": ck.epoch, "final": ck.epoch == last, **cols,
            "num_params": sum(t.numel() for t in ck.tensors.values()),
            "train_seconds": result.seconds, **ck.metrics,
            "hist_train_loss": result.history["train_loss"][:ck.epoch],
            "hist_val_loss": result.history["val_loss"][:ck.epoch],
            "hist_val_acc": result.history["val_acc"][:ck.epoch],
        })
    return {"model_id": run.model_id, "rows": rows, "files": files}


def train_unit(run_dicts: list[dict], report: Callable[[Any], None] | None = None) -> list[dict[str, Any]]:
    """Worker entry point: train one group of runs together; returns their payloads.

    With `report`, every finished epoch sends `(unit_key(run_dicts), models in the group)`:
    that many model-epochs are done."""
    from weightspace.zoo.data import load_task

    runs = [ModelRun.model_validate(d) for d in run_dicts]
    task = load_task(runs[0].dataset)
    key = unit_key(run_dicts)
    on_epoch = None if report is None else (lambda epoch: report((key, len(runs))))
    results = train_batch(runs, task=task, on_epoch=on_epoch)
    return [payload_of(r, task.input_shape, task.num_classes) for r in results]


def unit_key(run_dicts: list[dict]) -> str:
    """Names a unit in progress reports: its first model's id (a model is in one unit only)."""
    return ModelRun.model_validate(run_dicts[0]).model_id


def plan_units(runs: list[ModelRun], workers: int, max_batch: int = 64) -> list[list[ModelRun]]:
    """Batched groups, split further so every worker has work (big groups first)."""
    groups = group_runs(runs, max_batch=max_batch)
    if len(groups) < 2 * workers:
        pieces = math.ceil(2 * workers / max(1, len(groups)))
        split = []
        for g in groups:
            size = max(1, math.ceil(len(g) / pieces))
            split.extend(g[i:i + size] for i in range(0, len(g), size))
        groups = split
    # longest first: steps per epoch x epochs x models, a rough cost
    return sorted(groups, key=lambda g: -len(g) * g[0].train.epochs * 1.0 / g[0].train.batch_size)


@dataclass
class BuildReport:
    total: int
    trained: int = 0
    skipped: int = 0
    adopted: list[str] = field(default_factory=list)
    retrained_missing: int = 0
    seconds: float = 0.0

    @property
    def models_per_minute(self) -> float:
        return 60.0 * self.trained / self.seconds if self.seconds else 0.0


@dataclass(frozen=True)
class BuildProgress:
    """Where a build stands: models trained and saved, and model-epochs trained (of those to train)."""

    models_done: int
    models_total: int
    epochs_done: int
    epochs_total: int
    seconds: float


class _Progress:
    """Counts saved models and trained model-epochs; feeds `on_progress` and, on a terminal, two bars
    (saved models; epochs of the running batches) whose timers a small thread keeps moving."""

    def __init__(self, name: str, todo: list[ModelRun], units: list[list[dict]], workers: int, *,
                 bars: bool, on_progress: Callable[[BuildProgress], None] | None):
        self.t0 = time.perf_counter()
        self.on_progress = on_progress
        self.models_total = len(todo)
        self.epochs_total = sum(r.train.epochs for r in todo)
        self.unit_epochs = {unit_key(u): sum(d["train"]["epochs"] for d in u) for u in units}
        self.credited = dict.fromkeys(self.unit_epochs, 0)
        self.finished: set[str] = set()
        self.models_done = self.epochs_done = 0
        self.bars = None
        self._stop = threading.Event()
        if bars and todo:
            from tqdm import tqdm

            models = tqdm(total=self.models_total, desc=f"zoo {name}", unit="model", dynamic_ncols=True)
            epochs = tqdm(total=self.epochs_total, desc="  training", unit="epoch", dynamic_ncols=True,
                          leave=False) if self.epochs_total else None
            models.set_postfix_str(f"starting {min(workers, len(units))} worker(s)"
                                   if workers > 1 and len(units) > 1 else "", refresh=False)
            self.bars = (models, epochs)
            threading.Thread(target=self._tick, name="zoo-progress", daemon=True).start()

    def _tick(self) -> None:
        while not self._stop.wait(0.5):
            for b in self.bars or ():
                if b is not None:
                    b.refresh()

    def _emit(self) -> None:
        if self.on_progress is not None:
            self.on_progress(BuildProgress(self.models_done, self.models_total, self.epochs_done,
                                           self.epochs_total, time.perf_counter() - self.t0))

    def _epochs(self, key: str, n: int) -> None:
        n = min(n, self.unit_epochs[key] - self.credited[key])
        if n <= 0:
            return
        self.credited[key] += n
        self.epochs_done += n
        if self.bars is not None:
            if self.bars[0].postfix:
                self.bars[0].set_postfix_str("", refresh=False)
            if self.bars[1] is not None:
                self.bars[1].update(n)

    def report(self, msg: tuple[str, int]) -> None:
        """A worker finished an epoch of a batch: `(unit key, model-epochs)`."""
        key, n = msg
        if key in self.finished or key not in self.credited:
            return               # a late report of a batch whose models are already saved
        self._epochs(key, n)
        self._emit()

    def unit_started_saving(self, key: str) -> None:
        self._epochs(key, self.unit_epochs.get(key, 0))
        self.finished.add(key)

    def model_saved(self) -> None:
        self.models_done += 1
        if self.bars is not None:
            self.bars[0].update(1)
        self._emit()

    def close(self) -> None:
        self._stop.set()
        for b in reversed(self.bars or ()):
            if b is not None:
                b.close()


def build_zoo(spec: ZooSpec, out: str | Path, *, spec_text: str | None = None, executor: str = "local",
              workers: int | None = None, address: str | None = None, yes: bool = False,
              max_batch: int = 64, progress: bool = True,
              on_model: Callable[[dict[str, Any]], None] | None = None,
              on_progress: Callable[[BuildProgress], None] | None = None) -> BuildReport:
    """Train every model of the spec that the zoo at `out` lacks; returns what was done.

    `on_model(row)` is called with each saved model's last catalog row, `on_progress` with a
    `BuildProgress` after every saved model and every epoch a batch finishes; `progress` shows
    both as bars on the terminal."""
    runs = spec.runs(MAX_MODELS if yes else LARGE_ZOO)     # counted before it is expanded
    check_model_sizes(spec, runs)                           # before the zoo directory is created
    ids = [r.model_id for r in runs]
    if len(set(ids)) != len(ids):
        raise SpecError("the grid makes the same model twice; check for repeated axis values")
    check_executor(executor)   # before the zoo directory is created
    t0 = time.perf_counter()
    zoo = Zoo(out, create=True)
    report = BuildReport(total=len(runs), adopted=list(zoo.adopted))
    missing = {r["model_id"] for r in zoo.missing_weights()}
    if missing:
        report.retrained_missing = len(missing)
        zoo.drop_models(missing)
    zoo.write_spec(spec_text if spec_text is not None else json.dumps(spec.model_dump(), indent=1))
    have = zoo.model_ids
    todo = [r for r in runs if r.model_id not in have]
    report.skipped = len(runs) - len(todo)
    workers = workers or default_workers()
    units = [[r.to_dict() for r in g] for g in plan_units(todo, workers, max_batch)]
    track = _Progress(spec.name, todo, units, workers, bars=progress, on_progress=on_progress)
    try:
        for payloads in map_units(train_unit, units, executor=executor, workers=workers, address=address,
                                  on_report=track.report):
            if payloads:
                track.unit_started_saving(payloads[0]["model_id"])
            for rows in zoo.add_models(payloads):    # the unit's models, then one catalog log line
                report.trained += 1
                track.model_saved()
                if on_model is not None:
                    on_model(rows[-1])
    finally:
        track.close()
    zoo.compact()       # the log into catalog.parquet, once (an interrupted build leaves it for the next)
    report.seconds = time.perf_counter() - t0
    return report
