"""How good are generated weights, and are they new? Accuracy and a memorization check.

    report = evaluate_samples("samples/", "digits:classes=0-4", zoo_dir="zoo/", finetune_epochs=(0, 1))
    report["generated"]["1"]["mean"], report["random_init"]["1"]["mean"], report["zoo"]["best"]
    report["memorization"]["distance"]["median"], report["memorization"]["zoo_reference"]

Accuracy (test split of DATA), best / mean / median over models:

- generated: every sample zero-shot (epoch 0) and after k epochs of fine-tuning
  (`weightspace.zoo.train` with `init=` the sample, the zoo's training settings, one run of
  max(k) epochs checkpointed at every k, all samples with the same seed so they
  see the same batches);
- random_init: as many seeded random inits of the same architecture, trained
  the same way (the baseline a generator has to beat);
- zoo: the zoo's own final models trained on DATA, if the zoo has any (and its
  checkpoints at the epochs asked for, when it saved them).

Memorization: a generator that returns its training models is no generator.
For every sample, its nearest zoo model (same architecture) by the RMS
distance over the generated tensors in units of each tensor's standard
deviation over the zoo, ((s - z) / std_t) -- 0 is a copy, about sqrt(2) is two
independent draws from the zoo's weight distribution -- and the Jaccard
overlap of the two models' error sets on DATA's test split (1: they get the
same examples wrong). Both are read against `zoo_reference`: the same two
numbers between every zoo model and its nearest other zoo model. A sample far
closer than that, or with a much higher error overlap, is a near-copy.
Weight distance does not see permutations of hidden units; the error overlap
does, which is why both are reported.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from weightspace.errors import InputError, SpecError


def _stats(values: Sequence[float]) -> dict[str, Any]:
    v = [float(x) for x in values]
    if not v:
        return {"n": 0, "best": None, "mean": None, "median": None}
    return {"n": len(v), "best": max(v), "mean": statistics.fmean(v), "median": statistics.median(v),
            "values": v}


def sample_paths(samples: str | Path | Sequence[str | Path]) -> list[Path]:
    """A checkpoint directory, a directory of them (sample-000, ...), or a list of directories."""
    if isinstance(samples, (str, Path)):
        root = Path(samples)
        if (root / "config.json").is_file():
            return [root]
        if not root.is_dir():
            raise InputError(f"{root}: no such directory of generated samples")
        paths = sorted(p for p in root.iterdir() if p.is_dir() and (p / "config.json").is_file())
        if not paths:
            raise InputError(f"{root}: no checkpoint directories (with config.json) inside; "
                             f"write samples with `wsmerge generate sample GEN --data DATA -o {root}`")
        return paths
    paths = [Path(p) for p in samples]
    if not paths:
        raise InputError("no samples to evaluate")
    return paths


def _config(path: Path) -> dict[str, Any]:
    try:
        cfg = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise InputError(f"{path}: cannot read config.json ({e})") from None
    if not isinstance(cfg, dict) or cfg.get("model_type") != "weightspace-zoo":
        raise InputError(f"{path}: not a zoo checkpoint (config.json model_type is not weightspace-zoo)")
    return cfg


def _arch_of(cfg: dict[str, Any]) -> str:
    return json.dumps([cfg.get("arch"), list(cfg.get("input_shape") or []), cfg.get("num_classes")],
                      sort_keys=True)


def _check_task(task, cfg: dict[str, Any], data: str) -> None:
    if list(task.input_shape) != list(cfg["input_shape"]):
        raise InputError(f"--data {data}: inputs have shape {list(task.input_shape)}, but the samples take "
                         f"{list(cfg['input_shape'])}")
    top = int(torch.cat([task.train.y, task.test.y]).max())
    if top >= int(cfg["num_classes"]):
        raise InputError(f"--data {data}: label {top} is beyond the samples' head of "
                         f"{cfg['num_classes']} classes")


def _train_config(cfg: dict[str, Any], epochs: list[int]):
    from weightspace.zoo.train import TrainConfig

    base = dict(cfg.get("train") or {})
    base.update({"epochs": max(epochs), "checkpoints": tuple(epochs), "warmup_epochs": 0})
    return TrainConfig.model_validate(base)


def _test_errors(module: torch.nn.Module, tensors: dict[str, torch.Tensor], task) -> torch.Tensor:
    """Bool (N_test,): True where the model is wrong."""
    with torch.no_grad():
        logits = torch.func.functional_call(module, tensors, (task.test.x,))
    return logits.argmax(-1) != task.test.y


def _jaccard(a: torch.Tensor, b: torch.Tensor) -> float:
    union = int((a | b).sum())
    return 1.0 if union == 0 else int((a & b).sum()) / union


def _flat_std(tensors: dict[str, torch.Tensor], names: list[str], std: dict[str, float]) -> torch.Tensor:
    return torch.cat([tensors[n].reshape(-1).double() / std[n] for n in names])


def evaluate_samples(samples: str | Path | Sequence[str | Path], data: str, *,
                     zoo_dir: str | Path | None = None, finetune_epochs: Sequence[int] = (0, 1),
                     seed: int = 0, progress: bool = False) -> dict[str, Any]:
    """Accuracy of generated models (zero-shot and fine-tuned) against the zoo and random init,
    and the memorization check (module docstring). Keys of per-epoch tables are str(k)."""
    from weightspace.sources import load_space
    from weightspace.zoo.arch import model_from_config
    from weightspace.zoo.data import load_task
    from weightspace.zoo.train import ModelRun, train, train_batch

    paths = sample_paths(samples)
    epochs = sorted({int(k) for k in finetune_epochs})
    if not epochs or epochs[0] < 0:
        raise SpecError(f"--epochs: fine-tuning epochs must be integers >= 0, got {list(finetune_epochs)}")
    cfgs = [_config(p) for p in paths]
    for p, c in zip(paths[1:], cfgs[1:]):
        if _arch_of(c) != _arch_of(cfgs[0]):
            raise InputError(f"{p}: another architecture than {paths[0]} ({_arch_of(c)} vs "
                             f"{_arch_of(cfgs[0])}); evaluate one generator's samples at a time")
    cfg = cfgs[0]
    task = load_task(data)
    _check_task(task, cfg, data)
    tc = _train_config(cfg, epochs)
    keys = [str(k) for k in epochs]

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=2 * len(paths), desc="evaluate", unit="model", dynamic_ncols=True, leave=False)
    gen_acc: dict[str, list[float]] = {k: [] for k in keys}
    for p in paths:
        run = ModelRun(dataset=data, arch=cfg["arch"], train=tc, seed=seed, init=str(p))
        res = train(run, task=task)
        for ck in res.checkpoints:
            gen_acc[str(ck.epoch)].append(ck.metrics["test_acc"])
        if bar is not None:
            bar.update(1)
    runs = [ModelRun(dataset=data, arch=cfg["arch"], train=tc, seed=seed + 1 + i) for i in range(len(paths))]
    rand_acc: dict[str, list[float]] = {k: [] for k in keys}
    for res in train_batch(runs, task=task):
        for ck in res.checkpoints:
            rand_acc[str(ck.epoch)].append(ck.metrics["test_acc"])
    if bar is not None:
        bar.update(len(paths))
        bar.close()

    report: dict[str, Any] = {
        "data": data, "samples": [str(p) for p in paths], "epochs": epochs,
        "finetune": {k: v for k, v in tc.model_dump().items() if k in ("optimizer", "lr", "batch_size",
                                                                        "schedule", "momentum")},
        "chance": 1.0 / max(1, len(torch.unique(task.test.y))),
        "generated": {k: _stats(v) for k, v in gen_acc.items()},
        "random_init": {k: _stats(v) for k, v in rand_acc.items()},
        "zoo": None, "memorization": None,
    }
    if zoo_dir is None:
        zoo_guess = (cfg.get("generated_by") or {}).get("zoo")
        if zoo_guess and (Path(zoo_guess) / "catalog.parquet").is_file():
            zoo_dir = zoo_guess
    if zoo_dir is None:
        return report

    from weightspace.zoo.store import Zoo

    zoo = Zoo(zoo_dir)
    report["zoo_dir"] = str(zoo_dir)
    finals = [r for r in zoo.final_rows() if r["dataset"] == data]
    if finals:
        report["zoo"] = {**_stats([r["test_acc"] for r in finals]),
                         "trained_epochs": sorted({int(r["epoch"]) for r in finals}),
                         "at_epoch": {k: _stats([r["test_acc"] for r in zoo.rows
                                                 if r["dataset"] == data and int(r["epoch"]) == int(k)])
                                      for k in keys}}
    report["memorization"] = _memorization(paths, cfg, zoo, data, task, load_space, model_from_config)
    return report


def _memorization(paths: list[Path], cfg: dict[str, Any], zoo, data: str, task, load_space,
                  model_from_config) -> dict[str, Any] | None:
    module = model_from_config(cfg, str(paths[0]))
    shapes = {n: tuple(p.shape) for n, p in module.named_parameters()}
    rows = [r for r in zoo.final_rows()]
    spaces, keep = [], []
    for r in rows:
        s = zoo.load(r)
        if {n: tuple(ref.shape) for n, ref in s.items()} == shapes:
            spaces.append(s.materialize(dtype=torch.float32))
            keep.append(r)
    if not keep:
        return None
    names = list((cfg.get("generated_by") or {}).get("generated_tensors") or shapes)
    std = {}
    for n in names:
        v = torch.stack([s[n].double() for s in spaces])
        sd = float(v.std(dim=0, unbiased=False).pow(2).mean().sqrt()) if len(spaces) > 1 else 0.0
        std[n] = sd if sd > 1e-12 else max(float(v.abs().mean()), 1e-12)
    zoo_flat = torch.stack([_flat_std(s, names, std) for s in spaces])
    numel = zoo_flat.shape[1]
    zoo_err = [_test_errors(module, s, task) for s in spaces]
    per_sample = []
    for p in paths:
        t = load_space(p).materialize(dtype=torch.float32)
        d = (zoo_flat - _flat_std(t, names, std)).pow(2).sum(1).div(numel).sqrt()
        j = int(d.argmin())
        err = _test_errors(module, t, task)
        per_sample.append({"sample": p.name, "nearest": keep[j]["model_id"], "nearest_dataset": keep[j]["dataset"],
                           "distance": float(d[j]), "jaccard": _jaccard(err, zoo_err[j]),
                           "accuracy": 1.0 - float(err.float().mean())})
    ref_idx = [i for i, r in enumerate(keep) if r["dataset"] == data] or list(range(len(keep)))
    ref_d, ref_j = [], []
    if len(keep) > 1:
        dist = torch.cdist(zoo_flat, zoo_flat) / numel ** 0.5
        dist.fill_diagonal_(float("inf"))
        for i in ref_idx:
            j = int(dist[i].argmin())
            ref_d.append(float(dist[i, j]))
            ref_j.append(_jaccard(zoo_err[i], zoo_err[j]))
    ds = [s["distance"] for s in per_sample]
    js = [s["jaccard"] for s in per_sample]
    return {
        "metric": "RMS of (sample - zoo model) / per-tensor zoo std over the generated tensors; "
                  "Jaccard of test-set error sets with that nearest model",
        "zoo_models": len(keep), "tensors": len(names),
        "distance": {"min": min(ds), "median": statistics.median(ds)},
        "jaccard": {"max": max(js), "median": statistics.median(js)},
        "zoo_reference": {"distance_median": statistics.median(ref_d) if ref_d else None,
                          "jaccard_median": statistics.median(ref_j) if ref_j else None,
                          "models": len(ref_idx)},
        "per_sample": per_sample,
    }
