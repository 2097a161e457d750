"""Training a weight generator on a zoo of one architecture: chunker, chunk VAE, then d2nwg or kde.

    train_generator("zoo/", "gen/", method="d2nwg", tasks=["digits:classes=0-4"])
    train_generator("zoo/", "gen-head/", method="kde", subset="head.*")   # generate the head only

The steps, in order: read the zoo's checkpoints (one architecture), fit the
weight chunker on them and cut every model into chunks, train the chunk VAE
and encode every model to a latent; then

- d2nwg: embed every training dataset with a seeded set encoder (optionally
  aligned contrastively with the latents), standardize the embeddings
  (`condition_stats`), project the latents on their principal directions
  (`latent_pca`) and train the conditional latent DDPM on those coordinates;
- kde: fit kernel densities to the latents of the best models, pooled and
  per task.

The tensors left out by `subset` are copied from each task's best model.
Everything is written as a generator directory (`weightspace.zoo.gen.store`).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from weightspace.bounds import MAX_DEPTH, MAX_SIZE, check_sizes
from weightspace.errors import InputError, SpecError
from weightspace.ir import WeightSpace
from weightspace.zoo.gen.chunking import WeightChunker
from weightspace.zoo.gen.kde import KDE_SAMPLERS, KDESampler
from weightspace.zoo.gen.store import (
    FORMAT,
    FORMAT_VERSION,
    METHODS,
    ZOO_MODEL_TYPE,
    task_classes,
    write_generator,
)
from weightspace.zoo.gen.vae import ChunkVAE, tensor_weights

# sampled principal coordinates are clipped to the zoo's range widened by this fraction of it
# on each side: a guard against the rare sample that runs off (an undertrained denoiser)
CLIP_MARGIN = 0.5

Files = dict[str, dict[str, torch.Tensor]]      # {file name in the generator directory: tensors}


# ---------------------------------------------------------------- reading the zoo

def _arch_key(cfg: dict[str, Any]) -> str:
    return json.dumps({"arch": cfg.get("arch"), "input_shape": cfg.get("input_shape"),
                       "num_classes": cfg.get("num_classes")}, sort_keys=True)


def checkpoint_rows(zoo: Any, checkpoints: str) -> list[dict]:
    """The zoo's rows a generator learns from: each model's final checkpoint (`"final"`), or
    every trained epoch (`"all"`); `evaluate` picks the same rows as a sample's references."""
    return list(zoo.final_rows()) if checkpoints == "final" else [r for r in zoo.rows if int(r["epoch"]) > 0]


def _zoo_rows(zoo_dir: str | Path, tasks: Sequence[str] | None, checkpoints: str) -> tuple[Any, list[dict]]:
    from weightspace.zoo.store import Zoo

    if checkpoints not in ("final", "all"):
        raise SpecError(f"checkpoints: must be 'final' or 'all', got {checkpoints!r}")
    zoo = Zoo(zoo_dir)
    zoo.require_columns("dataset")
    if not zoo.rows:
        raise InputError(f"{zoo_dir}: the zoo is empty (no checkpoints in its catalog); build it "
                         f"first with `wsmerge zoo build SPEC -o {zoo_dir}`")
    zoo.check_weights()
    rows = checkpoint_rows(zoo, checkpoints)
    have = sorted({r["dataset"] for r in rows})
    if tasks:
        unknown = [t for t in tasks if t not in have]
        if unknown:
            raise InputError(f"--tasks {unknown[0]!r}: the zoo at {zoo_dir} has no models trained on it; "
                             f"its datasets are {', '.join(have)}")
        rows = [r for r in rows if r["dataset"] in set(tasks)]
    if not rows:
        raise InputError(f"{zoo_dir}: no trained checkpoints to learn from (checkpoints={checkpoints})")
    rows.sort(key=lambda r: (r["dataset"], r["model_id"], int(r["epoch"])))
    return zoo, rows


def _check_one_architecture(spaces: list[WeightSpace], rows: list[dict]) -> dict[str, Any]:
    """The shared config (arch, input_shape, num_classes); mixed ones raise naming two models."""
    cfgs = [s.meta.get("config") or {} for s in spaces]
    for c, r in zip(cfgs, rows):
        if c.get("model_type") != ZOO_MODEL_TYPE:
            raise InputError(f"{r['path']}: not a zoo checkpoint (config.json model_type is not "
                             f"{ZOO_MODEL_TYPE})")
    first = _arch_key(cfgs[0])
    for c, r in zip(cfgs, rows):
        if _arch_key(c) != first:
            raise InputError(
                f"a zoo with mixed architectures for one generator: model {rows[0]['model_id']} is "
                f"{first} but model {r['model_id']} is {_arch_key(c)}; train one generator per "
                f"architecture (pick tasks of one architecture with --tasks, or build separate zoos)")
    return cfgs[0]



# ---------------------------------------------------------------- training

def train_generator(zoo_dir: str | Path, out_dir: str | Path, *, method: str = "d2nwg",
                    subset: str | None = None, tasks: Sequence[str] | None = None,
                    checkpoints: str = "final", chunk: int = 64, latent_dim: int = 16,
                    vae_hidden: int = 512, vae_epochs: int = 500, vae_lr: float = 2e-3,
                    diffusion_epochs: int = 1000, diffusion_hidden: int = 256, diffusion_depth: int = 3,
                    diffusion_lr: float = 1e-3, timesteps: int = 1024, schedule: str = "sqrt_linear",
                    pca_dim: int | None = 64, encoder: str = "joint", embed_dim: int = 32,
                    embed_k: int = 5, contrastive_epochs: int = 0, fraction: float = 0.3,
                    kde_sampler: str = "anchor", bandwidth: str | float | None = None, seed: int = 0,
                    vae_from: str | Path | None = None, overwrite: bool = False, progress: bool = False) -> Path:
    """Train a weight generator on the zoo at `zoo_dir` and write it to `out_dir` (atomically).

        train_generator("zoo/", "gen/", method="d2nwg", tasks=["digits:classes=0-4"])
        train_generator("zoo/", "gen-head/", method="kde", subset="head.*")   # generate the head only

    `subset` (fnmatch on tensor names) generates only the matching tensors; the
    others are copied from the best zoo model (validation accuracy) of the task
    at sampling time. `tasks` restricts training to these dataset references
    (default: every dataset of the zoo). `checkpoints="all"` learns from every
    trained checkpoint (epoch > 0), not only each model's last.

    The defaults are the authors' where the miniature can follow them (README,
    "Weight generators"): d2nwg trains its dataset encoder with the diffusion loss
    (`encoder="joint"`; "random" keeps it the seeded random map), conditions on
    `embed_k=5` examples per class redrawn for every row and every sample, and uses
    latent diffusion's sqrt-linear schedule over 1024 steps; kde samples near the
    anchors (`kde_sampler="anchor"`, bandwidth 0.002) as the hyper-representation code
    does, "independent" is per-dimension sampling (bandwidth "scott" by default).

    `vae_from` reuses the chunk VAE of a generator trained on the same models (same
    zoo, tasks, checkpoints and subset), so that several generators differ only in
    what comes after the autoencoder, as the hyper-representation authors compare
    their samplers on one representation.
    """
    from weightspace.files import check_output
    from weightspace.zoo.data import load_task

    if method not in METHODS:
        raise SpecError(f"--method: unknown method {method!r}; choose {' or '.join(METHODS)}")
    if encoder not in ENCODER_MODES:
        raise SpecError(f"--encoder: must be one of {', '.join(ENCODER_MODES)}, got {encoder!r}")
    if kde_sampler not in KDE_SAMPLERS:
        raise SpecError(f"--kde-sampler: must be one of {', '.join(KDE_SAMPLERS)}, got {kde_sampler!r}")
    check_sizes({"chunk": chunk, "latent_dim": latent_dim, "vae_hidden": vae_hidden,
                 "diffusion_hidden": diffusion_hidden, "diffusion_depth": diffusion_depth,
                 "timesteps": timesteps, "embed_dim": embed_dim, "embed_k": embed_k},
                {"chunk": 65_536, "latent_dim": 4096, "vae_hidden": MAX_SIZE, "diffusion_hidden": MAX_SIZE,
                 "diffusion_depth": (0, MAX_DEPTH), "timesteps": MAX_SIZE, "embed_dim": MAX_SIZE,
                 "embed_k": 10_000}, error=SpecError)
    out = Path(out_dir)
    check_output(out, overwrite, inputs=[zoo_dir, vae_from])
    t0 = time.perf_counter()
    zoo, rows = _zoo_rows(zoo_dir, tasks, checkpoints)
    spaces = [zoo.load(r) for r in rows]
    cfg = _check_one_architecture(spaces, rows)
    labels = [f"model {r['model_id']} epoch {r['epoch']}" for r in rows]
    chunker = WeightChunker.fit(spaces, chunk=chunk, include=subset, labels=labels)
    tokens = chunker.encode_many(spaces)
    kept_names = [n for n in spaces[0] if n not in chunker.names]

    task_data = {ref: load_task(ref) for ref in sorted({r["dataset"] for r in rows})}
    scores = torch.tensor([float(r.get("val_acc") if r.get("val_acc") is not None else float("nan"))
                           for r in rows])
    task_info = _task_table(rows, scores, task_data)
    # fine-tuning a sample (evaluate, zoo.train init=) reuses the training settings of the best model
    best_train = (spaces[_best(range(len(rows)), scores)].meta.get("config") or {}).get("train")

    if vae_from is not None:
        vae, vae_hist, settings = _shared_vae(vae_from, chunker)
        latent_dim, vae_epochs, vae_lr = settings["latent_dim"], settings["vae_epochs"], settings["vae_lr"]
    else:
        torch.manual_seed(seed)
        vae = ChunkVAE(chunker.n_chunks, chunker.chunk, latent_dim=latent_dim, hidden=vae_hidden)
        vae_hist = vae.fit(tokens, epochs=vae_epochs, lr=vae_lr, seed=seed, progress=progress,
                           weight=tensor_weights(chunker))
    latents = vae.encode_models(tokens)
    recon = float(((vae.decode_models(latents) - tokens)[:, chunker.mask()] ** 2).mean())

    files: Files = {"vae.safetensors": vae.state_dict()}
    meta: dict[str, Any] = {
        "format": FORMAT, "version": FORMAT_VERSION, "method": method,
        "arch": cfg["arch"], "input_shape": list(cfg["input_shape"]), "num_classes": int(cfg["num_classes"]),
        "train": best_train, "zoo": str(Path(zoo_dir).resolve()), "checkpoints": checkpoints,
        "subset": subset, "generated_tensors": chunker.names, "kept_tensors": kept_names,
        "tasks": task_info, "tokenizer": chunker.state_dict(), "vae": vae.settings(),
        "settings": {"chunk": chunk, "latent_dim": latent_dim, "vae_epochs": vae_epochs, "vae_lr": vae_lr,
                     "seed": seed, "models": len(rows)},
        "history": {"vae_loss": [vae_hist[0], vae_hist[-1]] if vae_hist else [],
                    "vae_reconstruction_mse": recon},
    }
    if vae_from is not None:
        meta["vae_from"] = str(Path(vae_from).resolve())
    if method == "d2nwg":
        files.update(_train_d2nwg(meta, rows, latents, task_data, embed_dim=embed_dim, embed_k=embed_k,
                                  encoder_mode=encoder, contrastive_epochs=contrastive_epochs,
                                  hidden=diffusion_hidden, depth=diffusion_depth, timesteps=timesteps,
                                  schedule=schedule, pca_dim=pca_dim, epochs=diffusion_epochs,
                                  lr=diffusion_lr, seed=seed, progress=progress))
    else:
        files.update(_train_kde(meta, rows, latents, scores, task_info, fraction, kde_sampler, bandwidth))
    if kept_names:
        files.update(_kept_tensors(meta, rows, spaces, task_info, kept_names))
    meta["seconds"] = round(time.perf_counter() - t0, 2)
    return write_generator(out, files, meta, overwrite, inputs=(zoo_dir, vae_from))


def _shared_vae(gen_dir: str | Path, chunker: WeightChunker) -> tuple[ChunkVAE, list[float], dict[str, Any]]:
    """The chunk VAE of the generator at `gen_dir`, its loss history and settings; refused unless its
    chunker (tensor names, shapes, zoo statistics) is the one fitted now."""
    from weightspace.zoo.gen.store import load_generator

    other = load_generator(gen_dir)
    if other.chunker.state_dict() != chunker.state_dict():
        raise InputError(f"--vae-from {gen_dir}: that generator was trained on other models (its tensors or "
                         f"their zoo statistics differ); train it with the same zoo, tasks, checkpoints "
                         f"and subset")
    return other.vae, list(other.meta["history"]["vae_loss"]), other.meta["settings"]


def _best(indices, scores: torch.Tensor) -> int:
    """The index of the best validation accuracy (NaN counts as -1; the first wins a tie)."""
    return max(indices, key=lambda j: (torch.nan_to_num(scores[j], -1.0).item(), -j))


def _task_table(rows: list[dict], scores: torch.Tensor, task_data: dict) -> list[dict[str, Any]]:
    """generator.json's "tasks": per training dataset its key, classes, checkpoints and best model."""
    task_info = []
    for i, ref in enumerate(sorted(task_data)):
        idx = [j for j, r in enumerate(rows) if r["dataset"] == ref]
        best = _best(idx, scores)
        task_info.append({"key": f"task.{i}", "dataset": ref, "classes": task_classes(task_data[ref]),
                          "num_classes": task_data[ref].num_classes, "checkpoints": len(idx),
                          "best_model": rows[best]["model_id"], "best_epoch": int(rows[best]["epoch"]),
                          "best_val_acc": rows[best].get("val_acc")})
    return task_info


def _kept_tensors(meta: dict, rows: list[dict], spaces: list[WeightSpace], task_info: list[dict],
                  kept_names: list[str]) -> Files:
    """The tensors `subset` leaves out, from each task's best model and (as "pooled") the best of all."""
    kept: dict[str, torch.Tensor] = {}
    best_all = max(task_info, key=lambda t: t["best_val_acc"] if t["best_val_acc"] is not None else -1)
    sources = {t["key"]: (t["best_model"], t["best_epoch"]) for t in task_info}
    sources["pooled"] = (best_all["best_model"], best_all["best_epoch"])
    for key, (mid, epoch) in sources.items():
        j = next(j for j, r in enumerate(rows) if r["model_id"] == mid and int(r["epoch"]) == epoch)
        for n in kept_names:
            kept[f"{key}/{n}"] = spaces[j][n].load("cpu")
    meta["kept_from"] = {k: {"model_id": m, "epoch": e} for k, (m, e) in sources.items()}
    return {"kept.safetensors": kept}


# ---------------------------------------------------------------- d2nwg

def condition_stats(embeddings: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Shift and scale that standardize the training tasks' embeddings (T, E).

    A random set encoder gives every dataset a large shared component (cosine
    ~0.95 between digit class subsets); centring on the training tasks' mean
    and dividing by the RMS of what is left makes the differences between
    datasets the DDPM's condition, at unit scale. With one task the centred
    embedding is zero; the scale is then the embedding's own RMS, so an
    unseen dataset still lands at a meaningful distance."""
    shift = embeddings.mean(0)
    centred = embeddings - shift
    rms = float(centred.pow(2).mean().sqrt())
    if rms < 1e-8:
        rms = float(embeddings.pow(2).mean().sqrt()) or 1.0
    return shift, rms


ENCODER_MODES = ("joint", "random")


def _train_d2nwg(meta: dict, rows: list[dict], latents: torch.Tensor, task_data: dict, *, embed_dim: int,
                 embed_k: int, encoder_mode: str, contrastive_epochs: int, hidden: int, depth: int,
                 timesteps: int, schedule: str, pca_dim: int | None, epochs: int, lr: float, seed: int,
                 progress: bool) -> Files:
    """d2nwg's modules: the dataset encoder, the latent DDPM conditioned on its embeddings, and the
    latents' principal coordinates the DDPM works in; their settings and losses go into `meta`.

    encoder_mode "joint" (the authors' `cond_stage_trainable: True`): the dataset encoder is
    trained with the denoiser by the diffusion loss. "random": it stays the seeded random
    map it starts as. Either way every row of every batch is conditioned on a fresh support
    set of `embed_k` examples per class of its dataset, as the authors draw them."""
    from weightspace.zoo.gen.diffusion import LatentDDPM
    from weightspace.zoo.gen.setenc import DatasetEncoder, SupportSets

    input_dim = math.prod(meta["input_shape"])
    encoder = DatasetEncoder(input_dim, hidden=64, out_dim=embed_dim, seed=seed)
    con_hist: list[float] = []
    if contrastive_epochs > 0:
        con_hist = _align_encoder(encoder, rows, latents, task_data, k=embed_k, epochs=contrastive_epochs,
                                  seed=seed)
    refs = sorted(task_data)
    sets = {ref: SupportSets(task_data[ref]) for ref in refs}
    shift, scale = _condition_scale(encoder, sets, k=embed_k, seed=seed)
    row_task = [r["dataset"] for r in rows]
    condition = _row_conditions(encoder, sets, row_task, k=embed_k, shift=shift, scale=scale)
    pca = latent_pca(latents, pca_dim)
    coords = (latents - pca["mean"]) @ pca["components"].T
    torch.manual_seed(seed)
    ddpm = LatentDDPM(coords.shape[1], cond_dim=embed_dim, hidden=hidden, depth=depth, timesteps=timesteps,
                      schedule=schedule)
    joint = encoder_mode == "joint"
    encoder.train(joint)
    encoder.requires_grad_(joint)
    hist = ddpm.fit(coords, epochs=epochs, batch_size=64, lr=lr, seed=seed, progress=progress,
                    condition=condition, condition_params=list(encoder.parameters()) if joint else [])
    encoder.requires_grad_(True)
    encoder.eval()
    ddpm.eval()
    meta["encoder"] = {"input_dim": input_dim, "hidden": 64, "out_dim": embed_dim, "k": embed_k,
                       "seed": seed, "training": encoder_mode, "support": "fresh",
                       "contrastive_epochs": contrastive_epochs,
                       "cond_shift": shift.tolist(), "cond_scale": scale}
    meta["diffusion"] = {"latent_dim": coords.shape[1], "cond_dim": embed_dim, "hidden": hidden,
                         "depth": depth, "timesteps": timesteps, "schedule": schedule,
                         "beta_start": ddpm.beta_start, "beta_end": ddpm.beta_end, "epochs": epochs, "lr": lr,
                         "pca": {"components": coords.shape[1], "of": latents.shape[1],
                                 "variance_kept": pca["variance_kept"], "clip_margin": CLIP_MARGIN}}
    meta["history"]["diffusion_loss"] = [hist[0], hist[-1]] if hist else []
    if con_hist:
        meta["history"]["contrastive_loss"] = [con_hist[0], con_hist[-1]]
    return {"diffusion.safetensors": ddpm.state_dict(), "encoder.safetensors": encoder.state_dict(),
            "latent_pca.safetensors": _pca_state(pca, coords)}


def _condition_scale(encoder, sets: dict, *, k: int, seed: int, draws: int = 8) -> tuple[torch.Tensor, float]:
    """`condition_stats` of the training tasks' embeddings by the encoder as it starts (each task's
    mean over `draws` support sets): the fixed shift and scale between encoder and denoiser."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        raw = torch.stack([encoder(s.draw(draws, k, g)).mean(0) for s in sets.values()])
    return condition_stats(raw)


def _row_conditions(encoder, sets: dict, row_task: list[str], *, k: int, shift: torch.Tensor, scale: float):
    """The DDPM's `condition`: for rows idx, one fresh support set each from its dataset, embedded
    (with gradients when the encoder trains) and standardized with the fixed shift and scale."""
    refs = list(sets)
    task_of = torch.tensor([refs.index(t) for t in row_task])

    def condition(idx: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        tasks = task_of[idx.cpu()]
        parts, where = [], []
        for j, ref in enumerate(refs):        # tasks may differ in their classes: one encoder call each
            mine = torch.nonzero(tasks == j).flatten()
            if len(mine):
                parts.append(encoder(sets[ref].draw(len(mine), k, g)))
                where.append(mine)
        emb = torch.cat(parts)[torch.argsort(torch.cat(where))]
        return (emb - shift) / scale

    return condition


def _pca_state(pca: dict[str, Any], coords: torch.Tensor) -> dict[str, torch.Tensor]:
    """latent_pca.safetensors: mean, principal directions, and the clip range of sampled coordinates
    (the zoo's range widened by CLIP_MARGIN of it on each side)."""
    low, high = coords.min(0).values, coords.max(0).values
    span = high - low
    return {"mean": pca["mean"], "components": pca["components"],
            "low": low - CLIP_MARGIN * span, "high": high + CLIP_MARGIN * span}


def latent_pca(latents: torch.Tensor, max_dim: int | None) -> dict[str, Any]:
    """Centre the model latents and keep their top principal directions (at most N - 1, the rank
    of N centred points, and at most `max_dim`).

    The DDPM then works in these coordinates instead of the raw n_chunks * latent_dim
    latent: a zoo of N models spans at most N - 1 directions of it, and a denoiser that
    must first learn that most directions are empty underfits and lets ancestral
    sampling drift off the zoo (measured on a 12-model zoo: raw 192-d latents came out
    at 5-19x the zoo's scale after 2000 steps; 11 principal coordinates at ~1x)."""
    mean = latents.mean(0)
    centred = (latents - mean).double()
    _, svals, vh = torch.linalg.svd(centred, full_matrices=False)
    rank = int((svals > 1e-6 * svals[0]).sum()) if svals.numel() and svals[0] > 0 else 0
    k = max(1, min(rank, max_dim or rank or 1))
    var = svals.pow(2)
    kept = float(var[:k].sum() / var.sum()) if var.sum() > 0 else 1.0
    return {"mean": mean, "components": vh[:k].float(), "variance_kept": kept}


def _align_encoder(encoder, rows: list[dict], latents: torch.Tensor, task_data: dict, *, k: int,
                   epochs: int, seed: int) -> list[float]:
    """Optional: train the dataset encoder so a dataset's embedding points at its models' latents
    (CLIP-style, `contrastive_loss`, through a linear projection of the latents that is discarded).
    Every step draws fresh class samples, so the encoder sees each dataset through many subsets."""
    from weightspace.zoo.gen.setenc import contrastive_loss, embed_task

    refs = sorted(task_data)
    if len(refs) < 2:
        return []                                   # nothing to contrast
    g = torch.Generator().manual_seed(seed)
    proj = torch.nn.Linear(latents.shape[1], encoder.out_dim)
    opt = torch.optim.Adam([*encoder.parameters(), *proj.parameters()], lr=1e-3)
    # one latent per task per step: the mean latent of that task's rows, so the batch has no duplicates
    task_latent = torch.stack([latents[[i for i, r in enumerate(rows) if r["dataset"] == ref]].mean(0)
                               for ref in refs])
    hist = []
    encoder.train()
    for _ in range(epochs):
        s = int(torch.randint(0, 2**31 - 1, (1,), generator=g))
        d = torch.stack([embed_task(encoder, task_data[ref], k=k, seed=s + i, grad=True)
                         for i, ref in enumerate(refs)])
        loss = contrastive_loss(d, proj(task_latent))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        hist.append(float(loss.detach()))
    return hist


# ---------------------------------------------------------------- kde

def _train_kde(meta: dict, rows: list[dict], latents: torch.Tensor, scores: torch.Tensor,
               task_info: list[dict], fraction: float, sampler: str, bandwidth: str | float | None
               ) -> Files:
    """kde: the anchor latents of a pooled sampler and, with several tasks, one per task."""
    anchors: dict[str, torch.Tensor] = {}
    samplers = {"pooled": list(range(len(rows)))}
    if len(task_info) > 1:
        for t in task_info:
            samplers[t["key"]] = [i for i, r in enumerate(rows) if r["dataset"] == t["dataset"]]
    report = {}
    for key, idx in samplers.items():
        kde = KDESampler(fraction=fraction, sampler=sampler, bandwidth=bandwidth).fit(latents[idx], scores[idx])
        anchors[key] = torch.from_numpy(kde.anchors).float()
        spread = kde.anchors.std(axis=0, ddof=1) if kde.anchors.shape[0] > 1 else kde.anchors[0] * 0
        report[key] = {"anchors": int(kde.anchors.shape[0]), "of": len(idx),
                       "median_bandwidth": float(sorted(kde.h)[len(kde.h) // 2]),
                       "median_anchor_std": float(sorted(spread)[len(spread) // 2])}
    meta["kde"] = {"fraction": fraction, "sampler": sampler, "bandwidth": kde.bandwidth,
                   "per_task": len(task_info) > 1, "samplers": report,
                   "clip": "anchor range per dimension" if sampler == "independent" else None}
    return {"kde.safetensors": anchors}
