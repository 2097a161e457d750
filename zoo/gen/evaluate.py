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
The reference models are the zoo checkpoints the generator learned from (its
tasks, named in every sample's `generated_by`). For every sample:

- its nearest reference model by the RMS distance over the generated tensors in
  units of each tensor's standard deviation over the reference models,
  ((s - z) / std_t): 0 is a copy, about sqrt(2) two independent draws from the
  zoo's weight distribution;
- how alike their mistakes are on DATA's test split: error consistency normalized
  by chance and by the most the two accuracies allow (`error_consistency`: 0 no
  more alike than chance, 1 as alike as possible, so a noisy copy scores 1 even
  when it is much weaker). The Jaccard overlap of error sets, which this replaces,
  cannot exceed the smaller error set over the larger one, so a weak copy of a
  strong model looked "new".

Both are read against two references on the same data: `zoo_reference`, every
reference model of DATA's task (all of them for a task the generator did not see)
against its nearest other reference model (independently trained neighbours), and
`autoencoder_copy`, the same models against their reconstruction by the
generator's autoencoder (a copy that went through it; only when the generator
directory is still where the samples say). A sample as close and as alike as an
autoencoder copy is a copy; one as far and as different as zoo neighbours is as
new as a retrained model. Weight distance does not see permutations of hidden
units; the consistency does, which is why both are reported.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from weightspace.errors import InputError, SpecError
from weightspace.files import read_json_object
from weightspace.zoo.gen.training import checkpoint_rows


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
    cfg = read_json_object(path / "config.json")
    if cfg.get("model_type") != "weightspace-zoo":
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
    zoo.require_columns("dataset")
    report["zoo_dir"] = str(zoo_dir)
    finals = [r for r in zoo.final_rows() if r["dataset"] == data]
    if finals:
        report["zoo"] = {**_stats([r["test_acc"] for r in finals if r.get("test_acc") is not None]),
                         "trained_epochs": sorted({int(r["epoch"]) for r in finals}),
                         "at_epoch": {k: _stats([r["test_acc"] for r in zoo.rows
                                                 if r["dataset"] == data and int(r["epoch"]) == int(k)
                                                 and r.get("test_acc") is not None])
                                      for k in keys}}
    report["memorization"] = _memorization(paths, cfg, zoo, data, task, load_space, model_from_config)
    return report


def error_consistency(right_a: torch.Tensor, right_b: torch.Tensor) -> dict[str, float | None]:
    """How alike two models' mistakes are (bool (N,) "right" masks), against chance and the most possible.

        error_consistency(pred_a == y, pred_b == y)["normalized"]     # 1: as alike as possible

    Error consistency (Geirhos et al., "Beyond accuracy: quantifying trial-by-trial
    behaviour of CNNs and humans by measuring error consistency", NeurIPS 2020), divided
    by its maximum: with accuracies a and b,
    observed c = share of examples both get right or both get wrong;
    chance c_exp = a b + (1 - a)(1 - b), two independent models with those accuracies;
    most c_max = 1 - |a - b|, what the two accuracies allow (all of the weaker model's
    right answers among the stronger one's);
    normalized = (c - c_exp) / (c_max - c_exp): 0 is no more alike than chance, 1 as alike
    as the accuracies allow -- a noisy copy, right only where its original is right, is 1
    even when it is much weaker. (The Jaccard overlap of error sets cannot show this: it is
    at most the smaller error set over the larger one.) None when c_max = c_exp (one of
    the models is always right or always wrong).
    """
    ra, rb = right_a.bool(), right_b.bool()
    a, b = float(ra.double().mean()), float(rb.double().mean())
    c = float((ra == rb).double().mean())
    c_exp = a * b + (1 - a) * (1 - b)
    c_max = 1 - abs(a - b)
    norm = (c - c_exp) / (c_max - c_exp) if c_max - c_exp > 1e-12 else None
    return {"observed": c, "chance": c_exp, "most": c_max, "normalized": norm}


def _predictions(module: torch.nn.Module, tensors: dict[str, torch.Tensor], task) -> torch.Tensor:
    with torch.no_grad():
        return torch.func.functional_call(module, tensors, (task.test.x,)).argmax(-1)


def _consistency(pred_a: torch.Tensor, pred_b: torch.Tensor, task) -> dict[str, float | None]:
    """error_consistency of two models' test predictions, and the share of equal labels."""
    return {**error_consistency(pred_a == task.test.y, pred_b == task.test.y),
            "same_label": float((pred_a == pred_b).double().mean())}


def _reference_rows(zoo, generated_by: dict[str, Any]) -> tuple[list[dict], str]:
    """The zoo checkpoints the generator learned from (its tasks and checkpoints), else all final ones."""
    tasks = generated_by.get("train_tasks")
    if not tasks:
        return list(zoo.final_rows()), "all final zoo models (the samples do not name their training tasks)"
    rows = checkpoint_rows(zoo, generated_by.get("checkpoints", "final"))
    return [r for r in rows if r["dataset"] in set(tasks)], "the generator's training models"


def _median(values: list[float | None]) -> float | None:
    v = [x for x in values if x is not None]
    return statistics.median(v) if v else None


def _memorization(paths: list[Path], cfg: dict[str, Any], zoo, data: str, task, load_space,
                  model_from_config) -> dict[str, Any] | None:
    """Is every sample a copy of a model the generator learned from? Distance and agreement to its
    nearest training model, next to the same between training models and their nearest other one,
    and between training models and their own autoencoder reconstruction (a copy, as far as the
    generator's autoencoder can copy)."""
    module = model_from_config(cfg, str(paths[0]), tensors=load_space(paths[0]))
    shapes = {n: tuple(p.shape) for n, p in module.named_parameters()}
    generated_by = cfg.get("generated_by") or {}
    rows, reference = _reference_rows(zoo, generated_by)
    spaces, keep = [], []
    for r in rows:
        s = zoo.load(r)
        if {n: tuple(ref.shape) for n, ref in s.items()} == shapes:
            spaces.append(s.materialize(dtype=torch.float32))
            keep.append(r)
    if not keep:
        return None
    names = list(generated_by.get("generated_tensors") or shapes)
    std = {}
    for n in names:
        v = torch.stack([s[n].double() for s in spaces])
        sd = float(v.std(dim=0, unbiased=False).pow(2).mean().sqrt()) if len(spaces) > 1 else 0.0
        std[n] = sd if sd > 1e-12 else max(float(v.abs().mean()), 1e-12)
    zoo_flat = torch.stack([_flat_std(s, names, std) for s in spaces])
    numel = zoo_flat.shape[1]
    zoo_pred = [_predictions(module, s, task) for s in spaces]

    def dist_to_zoo(t: dict[str, torch.Tensor]) -> torch.Tensor:
        return (zoo_flat - _flat_std(t, names, std)).pow(2).sum(1).div(numel).sqrt()

    per_sample = []
    for p in paths:
        t = load_space(p).materialize(dtype=torch.float32)
        d = dist_to_zoo(t)
        j = int(d.argmin())
        pred = _predictions(module, t, task)
        per_sample.append({"sample": p.name, "nearest": keep[j]["model_id"], "nearest_dataset": keep[j]["dataset"],
                           "distance": float(d[j]), "consistency": _consistency(pred, zoo_pred[j], task),
                           "accuracy": float((pred == task.test.y).double().mean())})
    ref_idx = [i for i, r in enumerate(keep) if r["dataset"] == data] or list(range(len(keep)))
    neighbours = []
    if len(keep) > 1:
        dist = torch.cdist(zoo_flat, zoo_flat) / numel ** 0.5
        dist.fill_diagonal_(float("inf"))
        for i in ref_idx:
            j = int(dist[i].argmin())
            neighbours.append({"distance": float(dist[i, j]),
                               "consistency": _consistency(zoo_pred[i], zoo_pred[j], task)})
    copies = _autoencoder_copies(generated_by, [spaces[i] for i in ref_idx], names, std, module, task,
                                 [zoo_pred[i] for i in ref_idx])

    def summary(items: list[dict]) -> dict[str, Any]:
        if not items:
            return {"distance_median": None, "same_label_median": None, "consistency_median": None,
                    "models": 0}
        return {"distance_median": statistics.median(x["distance"] for x in items),
                "same_label_median": statistics.median(x["consistency"]["same_label"] for x in items),
                "consistency_median": _median([x["consistency"]["normalized"] for x in items]),
                "models": len(items)}

    ds = [s["distance"] for s in per_sample]
    norms = [s["consistency"]["normalized"] for s in per_sample]
    return {
        "metric": "distance: RMS of (sample - model) / per-tensor std over the reference models, over the "
                  "generated tensors (0: a copy); consistency: error consistency on DATA's test split, "
                  "normalized = (observed - chance) / (most the accuracies allow - chance), 1: as alike as "
                  "possible; same_label: share of test examples given the same label",
        "reference": reference, "zoo_models": len(keep), "tensors": len(names),
        "distance": {"min": min(ds), "median": statistics.median(ds)},
        "same_label": {"median": statistics.median(s["consistency"]["same_label"] for s in per_sample)},
        "consistency": {"median": _median(norms), "max": max((x for x in norms if x is not None), default=None)},
        "zoo_reference": summary(neighbours),
        "autoencoder_copy": summary(copies) if copies is not None else None,
        "per_sample": per_sample,
    }


def _autoencoder_copies(generated_by: dict[str, Any], spaces: list[dict[str, torch.Tensor]], names: list[str],
                        std: dict[str, float], module, task, preds: list[torch.Tensor]) -> list[dict] | None:
    """Each model against its reconstruction by the generator's autoencoder, if the generator is
    still where the samples say: how far and how alike a copy that passed through it is."""
    from weightspace.zoo.gen.store import GENERATOR_FILE, load_generator

    where = generated_by.get("generator")
    if not where or not (Path(where) / GENERATOR_FILE).is_file() or not spaces:
        return None
    gen = load_generator(where)
    if list(gen.chunker.names) != list(names):
        return None
    full = [{**s} for s in spaces]
    recon = gen.chunker.decode_many(gen.vae.decode_models(gen.vae.encode_models(gen.chunker.encode_many(full))))
    out = []
    for s, r, pred in zip(spaces, recon, preds):
        copy = {**s, **r}
        d = float((_flat_std(copy, names, std) - _flat_std(s, names, std)).pow(2).mean().sqrt())
        out.append({"distance": d, "consistency": _consistency(_predictions(module, copy, task), pred, task)})
    return out
