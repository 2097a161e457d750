"""`wsmerge zoo metrics`: landscape metrics for every checkpoint of a zoo that lacks them.

    n = compute_metrics("zoo/")                  # fills the catalog's metric columns, resumable

Per checkpoint: `weightspace.zoo.metrics.landscape_metrics` (losses, accuracies, gap,
Hessian top eigenvalue and trace). Per pair of checkpoints that differ only in
their seed (same config, same epoch; seeds paired in a cycle, each unordered
pair computed once): `weightspace.zoo.metrics.pair_metrics` (mc on the linear path and on
a fitted Bezier curve, logit CKA); both rows of a pair carry its values and
`pair_model_id`. Work fans out like `zoo build` (local processes or Ray).
A unit names its checkpoints by path and a local worker reads them; on Ray
the unit is shipped with the weights' bytes instead, as it is submitted
(`ship_unit`), since Ray's workers may not share this filesystem.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from weightspace.errors import WeightspaceError
from weightspace.files import read_json_object
from weightspace.inputs import read_input_bytes
from weightspace.yaml_io import read_yaml_file
from weightspace.zoo.executors import map_units
from weightspace.zoo.spec import MetricsConfig, parse_zoo_spec
from weightspace.zoo.store import SPEC, Zoo

DONE_COLUMN = "hessian_top_eig"
PAIR_COLUMNS = ("mc_linear", "mc_bezier", "cka")


def metrics_settings(zoo: Zoo) -> MetricsConfig:
    """The `metrics:` section of the zoo's spec (defaults if the zoo has none; zoo.yaml may be
    the user's YAML or the JSON that `build_zoo` writes, both read as YAML)."""
    p = zoo.root / SPEC
    if not p.is_file():
        return MetricsConfig()
    return parse_zoo_spec(read_yaml_file(p, "zoo spec"), source=str(p)).metrics


def metrics_unit(unit: Mapping[str, Any]) -> dict[str, Any]:
    """Worker entry point: metrics of one checkpoint (and of its seed pair, if assigned)."""
    try:
        return _metrics_unit(unit)
    except WeightspaceError as e:
        raise WeightspaceError(f"metrics of {unit['path']}: {e}") from None


def _metrics_unit(unit: Mapping[str, Any]) -> dict[str, Any]:
    from safetensors.torch import load

    from weightspace.zoo.arch import model_from_config
    from weightspace.zoo.data import load_task
    from weightspace.zoo.metrics import landscape_metrics, pair_metrics

    cfg = unit["config"]
    params = load(_weights(unit, "path", "weights"))
    model = model_from_config(cfg, unit["path"], tensors=params)
    task = load_task(cfg["dataset"])
    s = unit["settings"]
    out = landscape_metrics(model, params, task, hessian_iters=s["hessian_iters"],
                            trace_samples=s["trace_samples"], max_examples=s["max_examples"])
    pair = None
    if unit.get("partner") is not None:
        pair = pair_metrics(model, params, load(_weights(unit, "partner", "partner_weights")), task,
                            bezier_steps=s["bezier_steps"], max_examples=s["max_examples"])
    return {"key": unit["key"], "metrics": out, "pair": pair, "partner_key": unit.get("partner_key")}


def _weights(unit: Mapping[str, Any], path_key: str, bytes_key: str) -> bytes:
    """A checkpoint's safetensors bytes: shipped with the unit (Ray), else read from its folder."""
    if unit.get(bytes_key) is not None:
        return unit[bytes_key]
    return read_input_bytes(Path(unit[path_key]) / "model.safetensors")


def ship_unit(unit: Mapping[str, Any]) -> dict[str, Any]:
    """The unit as a Ray worker gets it: with its checkpoints' bytes (see the module docstring)."""
    out = dict(unit, weights=read_input_bytes(Path(unit["path"]) / "model.safetensors"))
    if unit.get("partner") is not None:
        out["partner_weights"] = read_input_bytes(Path(unit["partner"]) / "model.safetensors")
    return out


def _pair_key(cfg: Mapping[str, Any]) -> str:
    d = {k: v for k, v in cfg.items() if k not in ("seed", "model_id")}
    return json.dumps(d, sort_keys=True)


def compute_metrics(zoo_dir: str | Path, *, checkpoints: str | None = None, executor: str = "local",
                    workers: int | None = None, address: str | None = None, pairs: bool = True,
                    progress: bool = False) -> int:
    """Compute the missing metrics; returns the number of checkpoints updated."""
    zoo = Zoo(zoo_dir, write=True)
    zoo.check_weights()
    settings = metrics_settings(zoo)
    which = checkpoints or settings.checkpoints
    rows = zoo.rows if which == "all" else zoo.final_rows()
    todo = [r for r in rows if r.get(DONE_COLUMN) is None]
    if not todo:
        return 0
    configs = {}
    for r in rows:
        path = zoo.checkpoint_dir(r)
        configs[(r["model_id"], int(r["epoch"]))] = (path, read_json_object(path / "config.json"))
    # seed pairs among the selected rows: same config except seed, cycled in seed order
    partner: dict[tuple[str, int], tuple[str, int]] = {}
    second_of: dict[tuple[str, int], tuple[str, int]] = {}   # the first row of a two-seed pair -> the other
    if pairs and settings.pairs:
        groups: dict[str, list[tuple[int, tuple[str, int]]]] = {}
        for key, (_, cfg) in configs.items():
            groups.setdefault(_pair_key(cfg), []).append((cfg["seed"], key))
        for members in groups.values():
            members.sort()
            keys = [k for _, k in members]
            if len(keys) < 2:
                continue
            for i, k in enumerate(keys):
                nxt = keys[(i + 1) % len(keys)]
                if len(keys) == 2 and i == 1:
                    second_of[keys[0]] = k        # the one pair is computed by the first row
                else:
                    partner[k] = nxt
    settings_d = settings.model_dump()
    units = []
    for r in todo:
        key = (r["model_id"], int(r["epoch"]))
        path, cfg = configs[key]
        unit: dict[str, Any] = {"key": key, "path": str(path), "config": cfg, "settings": settings_d}
        if key in partner:
            unit["partner"] = str(configs[partner[key]][0])
            unit["partner_key"] = partner[key]
        units.append(unit)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(units), desc="metrics", unit="ckpt", dynamic_ncols=True)
    done = 0
    try:
        for res in map_units(metrics_unit, units, executor=executor, workers=workers, address=address,
                             ship=ship_unit):
            key = tuple(res["key"])
            updates: dict[tuple[str, int], dict[str, Any]] = {key: dict(res["metrics"])}
            if res["pair"] is not None:
                pk = tuple(res["partner_key"])
                updates[key].update(res["pair"], pair_model_id=pk[0])
                # the second row of a two-seed pair shares the values
                if second_of.get(key) == pk:
                    updates.setdefault(pk, {}).update(res["pair"], pair_model_id=key[0])
            zoo.update_rows(updates)
            done += 1
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    zoo.compact()       # the metrics' log lines into catalog.parquet, once
    return done
