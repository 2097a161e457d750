"""Weight generators trained on a zoo: D2NWG latent diffusion, or KDE on hyper-representations.

    gen = train_generator("zoo/", "gen/", method="d2nwg")           # or method="kde"
    paths = sample("gen/", "digits:classes=0-4", 20, "samples/", seed=0)
    open_model(paths[0])            # a zoo checkpoint like any other (inspect, merge, fine-tune)

Both methods share the first stage: the zoo's checkpoints (one architecture)
are cut into chunks (`weightspace.zoo.gen.chunking`: per-tensor normalization, chunks) and a
chunk VAE (`weightspace.zoo.gen.vae`) maps every model to a latent vector.

- d2nwg (Soro et al., "Diffusion-Based Neural Network Weights Generation",
  ICLR 2025): a dataset encoder (`weightspace.zoo.gen.setenc`, a seeded random Deep Set,
  optionally aligned contrastively with the latents) embeds every row's
  dataset, and a conditional latent DDPM (`weightspace.zoo.gen.diffusion`) learns
  p(latent | dataset embedding). Sampling embeds the requested dataset, so an
  unseen dataset with seen classes (a rotation, a corruption) gets weights too.
  The DDPM runs on the latents' principal coordinates (at most N - 1 for N
  checkpoints, at most `pca_dim`), which a small zoo needs: see `latent_pca`.
- kde (Schürholt et al., "Hyper-Representations as Generative Models", NeurIPS
  2022): per-dimension kernel densities on the latents of the top 30 % of the
  zoo by validation accuracy (`weightspace.zoo.gen.kde`), one sampler per task plus a
  pooled one; the dataset only picks the sampler.

A generator directory:

    gen/generator.json          method, architecture, tasks seen (classes), chunker state (key "tokenizer"), settings
    gen/vae.safetensors         the chunk VAE
    gen/diffusion.safetensors   d2nwg: the latent DDPM (with its latent standardization)
    gen/encoder.safetensors     d2nwg: the dataset encoder
    gen/latent_pca.safetensors  d2nwg: latent mean, principal directions, clip range of the coordinates
    gen/kde.safetensors         kde: the anchor latents of every sampler ("pooled", "task.<i>")
    gen/kept.safetensors        with --subset: the tensors not generated, from each task's best model

No pickle: modules are rebuilt from generator.json and filled from safetensors.
A sample is a zoo checkpoint directory (model.safetensors + config.json with
model_type weightspace-zoo, arch, input_shape, num_classes, train, and
`generated_by`).
"""

from __future__ import annotations

import json
import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from weightspace.zoo.gen.chunking import WeightChunker
from weightspace.zoo.gen.kde import KDESampler
from weightspace.zoo.gen.vae import ChunkVAE, tensor_weights

from weightspace.errors import InputError, SpecError
from weightspace.files import atomic_dir
from weightspace.ir import WeightSpace

FORMAT = "weightspace-generator"
FORMAT_VERSION = 1
GENERATOR_FILE = "generator.json"
METHODS = ("d2nwg", "kde")
# sampled principal coordinates are clipped to the zoo's range widened by this fraction of it
# on each side: a guard against the rare sample that runs off (an undertrained denoiser)
CLIP_MARGIN = 0.5
ZOO_MODEL_TYPE = "weightspace-zoo"


@dataclass
class Generator:
    """A loaded generator: its description (generator.json) and its modules."""

    path: Path
    meta: dict[str, Any]
    chunker: WeightChunker
    vae: ChunkVAE
    ddpm: Any = None                       # LatentDDPM (d2nwg)
    encoder: Any = None                    # DatasetEncoder (d2nwg)
    samplers: dict[str, KDESampler] = field(default_factory=dict)   # kde: "pooled", "task.<i>"
    kept: dict[str, torch.Tensor] = field(default_factory=dict)     # "<key>/<tensor name>"
    pca: dict[str, torch.Tensor] = field(default_factory=dict)     # d2nwg: latent principal coordinates

    @property
    def method(self) -> str:
        return self.meta["method"]

    @property
    def tasks(self) -> list[dict[str, Any]]:
        return self.meta["tasks"]


# ---------------------------------------------------------------- helpers

def _progress_bar(enabled: bool, total: int, desc: str):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="model", dynamic_ncols=True, leave=False)


def _task_classes(task) -> list[int]:
    return sorted(int(c) for c in torch.unique(task.train.y).tolist())


def _arch_key(cfg: dict[str, Any]) -> str:
    return json.dumps({"arch": cfg.get("arch"), "input_shape": cfg.get("input_shape"),
                       "num_classes": cfg.get("num_classes")}, sort_keys=True)


def _save_safetensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(path),
              metadata={"format": "pt", "weightspace.generator": "1"})


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise InputError(f"{path}: missing; the generator directory is incomplete")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise InputError(f"{path}: not a readable safetensors file ({e})") from None


def _load_module(module: torch.nn.Module, path: Path) -> None:
    state = _load_safetensors(path)
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).splitlines()[0]
        raise InputError(f"{path}: does not fit the module described in {GENERATOR_FILE}: {first}") from None


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


# ---------------------------------------------------------------- reading the zoo

def _zoo_rows(zoo_dir: str | Path, tasks: Sequence[str] | None, checkpoints: str) -> tuple[Any, list[dict]]:
    from weightspace.zoo.store import Zoo

    if checkpoints not in ("final", "all"):
        raise SpecError(f"checkpoints: must be 'final' or 'all', got {checkpoints!r}")
    zoo = Zoo(zoo_dir)
    if not zoo.rows:
        raise InputError(f"{zoo_dir}: the zoo is empty (no checkpoints in its catalog); build it "
                         f"first with `wsmerge zoo build SPEC -o {zoo_dir}`")
    zoo.check_weights()
    rows = zoo.final_rows() if checkpoints == "final" else [r for r in zoo.rows if int(r["epoch"]) > 0]
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
                    diffusion_lr: float = 1e-3, timesteps: int = 1000, pca_dim: int | None = 64,
                    embed_dim: int = 32,
                    embed_k: int = 16, contrastive_epochs: int = 0, fraction: float = 0.3,
                    bandwidth: str | float = "scott", seed: int = 0, overwrite: bool = False,
                    progress: bool = False) -> Path:
    """Train a weight generator on the zoo at `zoo_dir` and write it to `out_dir` (atomically).

        train_generator("zoo/", "gen/", method="d2nwg", tasks=["digits:classes=0-4"])
        train_generator("zoo/", "gen-head/", method="kde", subset="head.*")   # generate the head only

    `subset` (fnmatch on tensor names) generates only the matching tensors; the
    others are copied from the best zoo model (validation accuracy) of the task
    at sampling time. `tasks` restricts training to these dataset references
    (default: every dataset of the zoo). `checkpoints="all"` learns from every
    trained checkpoint (epoch > 0), not only each model's last.
    """
    from weightspace.zoo.data import load_task

    from weightspace.sink import check_output

    if method not in METHODS:
        raise SpecError(f"--method: unknown method {method!r}; choose {' or '.join(METHODS)}")
    out = Path(out_dir)
    check_output(out, overwrite)
    t0 = time.perf_counter()
    zoo, rows = _zoo_rows(zoo_dir, tasks, checkpoints)
    spaces = [zoo.load(r) for r in rows]
    cfg = _check_one_architecture(spaces, rows)
    labels = [f"model {r['model_id']} epoch {r['epoch']}" for r in rows]
    tok = WeightChunker.fit(spaces, chunk=chunk, include=subset, labels=labels)
    tokens = tok.encode_many(spaces)
    kept_names = [n for n in spaces[0] if n not in tok.names]

    task_refs = sorted({r["dataset"] for r in rows})
    task_data = {ref: load_task(ref) for ref in task_refs}
    scores = torch.tensor([float(r.get("val_acc") if r.get("val_acc") is not None else float("nan"))
                           for r in rows])
    task_info = []
    for i, ref in enumerate(task_refs):
        idx = [j for j, r in enumerate(rows) if r["dataset"] == ref]
        best = max(idx, key=lambda j: (torch.nan_to_num(scores[j], -1.0).item(), -j))
        task_info.append({"key": f"task.{i}", "dataset": ref, "classes": _task_classes(task_data[ref]),
                          "num_classes": task_data[ref].num_classes, "checkpoints": len(idx),
                          "best_model": rows[best]["model_id"], "best_epoch": int(rows[best]["epoch"]),
                          "best_val_acc": rows[best].get("val_acc")})

    # fine-tuning a sample (evaluate, zoo.train init=) reuses the training settings of the best model
    best_row = max(range(len(rows)), key=lambda j: (torch.nan_to_num(scores[j], -1.0).item(), -j))
    best_train = (spaces[best_row].meta.get("config") or {}).get("train")

    torch.manual_seed(seed)
    vae = ChunkVAE(tok.n_chunks, tok.chunk, latent_dim=latent_dim, hidden=vae_hidden)
    vae_hist = vae.fit(tokens, epochs=vae_epochs, lr=vae_lr, seed=seed, progress=progress,
                       weight=tensor_weights(tok))
    latents = vae.encode_models(tokens)
    recon = float(((vae.decode_models(latents) - tokens)[:, tok.mask()] ** 2).mean())

    files: dict[str, dict[str, torch.Tensor]] = {"vae.safetensors": vae.state_dict()}
    meta: dict[str, Any] = {
        "format": FORMAT, "version": FORMAT_VERSION, "method": method,
        "arch": cfg["arch"], "input_shape": list(cfg["input_shape"]), "num_classes": int(cfg["num_classes"]),
        "train": best_train, "zoo": str(Path(zoo_dir).resolve()), "checkpoints": checkpoints,
        "subset": subset, "generated_tensors": tok.names, "kept_tensors": kept_names,
        "tasks": task_info, "tokenizer": tok.state_dict(), "vae": vae.settings(),
        "settings": {"chunk": chunk, "latent_dim": latent_dim, "vae_epochs": vae_epochs, "vae_lr": vae_lr,
                     "seed": seed, "models": len(rows)},
        "history": {"vae_loss": [vae_hist[0], vae_hist[-1]] if vae_hist else [],
                    "vae_reconstruction_mse": recon},
    }
    if method == "d2nwg":
        files.update(_train_d2nwg(meta, rows, latents, task_data, embed_dim=embed_dim, embed_k=embed_k,
                                  contrastive_epochs=contrastive_epochs, hidden=diffusion_hidden,
                                  depth=diffusion_depth, timesteps=timesteps, pca_dim=pca_dim,
                                  epochs=diffusion_epochs,
                                  lr=diffusion_lr, seed=seed, progress=progress))
    else:
        files.update(_train_kde(meta, rows, latents, scores, task_info, fraction, bandwidth))
    if kept_names:
        kept: dict[str, torch.Tensor] = {}
        best_all = max(task_info, key=lambda t: t["best_val_acc"] if t["best_val_acc"] is not None else -1)
        sources = {t["key"]: (t["best_model"], t["best_epoch"]) for t in task_info}
        sources["pooled"] = (best_all["best_model"], best_all["best_epoch"])
        for key, (mid, epoch) in sources.items():
            j = next(j for j, r in enumerate(rows) if r["model_id"] == mid and int(r["epoch"]) == epoch)
            for n in kept_names:
                kept[f"{key}/{n}"] = spaces[j][n].load("cpu")
        files["kept.safetensors"] = kept
        meta["kept_from"] = {k: {"model_id": m, "epoch": e} for k, (m, e) in sources.items()}
    meta["seconds"] = round(time.perf_counter() - t0, 2)

    def write(tmp: Path) -> None:
        for name, tensors in files.items():
            _save_safetensors(tensors, tmp / name)
        (tmp / GENERATOR_FILE).write_text(json.dumps(meta, indent=1, allow_nan=False) + "\n", encoding="utf-8")

    return atomic_dir(out, overwrite, write)


def _train_d2nwg(meta: dict, rows: list[dict], latents: torch.Tensor, task_data: dict, *, embed_dim: int,
                 embed_k: int, contrastive_epochs: int, hidden: int, depth: int, timesteps: int,
                 pca_dim: int | None,
                 epochs: int, lr: float, seed: int, progress: bool) -> dict[str, dict[str, torch.Tensor]]:
    from weightspace.zoo.gen.diffusion import LatentDDPM
    from weightspace.zoo.gen.setenc import DatasetEncoder, embed_task

    input_dim = math.prod(meta["input_shape"])
    encoder = DatasetEncoder(input_dim, hidden=64, out_dim=embed_dim, seed=seed)
    con_hist: list[float] = []
    if contrastive_epochs > 0:
        con_hist = _align_encoder(encoder, rows, latents, task_data, k=embed_k, epochs=contrastive_epochs,
                                  seed=seed)
    encoder.eval()
    refs = sorted(task_data)
    raw = torch.stack([embed_task(encoder, task_data[ref], k=embed_k, seed=seed) for ref in refs])
    shift, scale = condition_stats(raw)
    emb = dict(zip(refs, (raw - shift) / scale))
    cond = torch.stack([emb[r["dataset"]] for r in rows])
    pca = latent_pca(latents, pca_dim)
    coords = (latents - pca["mean"]) @ pca["components"].T
    torch.manual_seed(seed)
    ddpm = LatentDDPM(coords.shape[1], cond_dim=embed_dim, hidden=hidden, depth=depth, timesteps=timesteps)
    hist = ddpm.fit(coords, cond, epochs=epochs, batch_size=64, lr=lr, seed=seed, progress=progress)
    ddpm.eval()
    meta["encoder"] = {"input_dim": input_dim, "hidden": 64, "out_dim": embed_dim, "k": embed_k,
                       "seed": seed, "contrastive_epochs": contrastive_epochs,
                       "cond_shift": shift.tolist(), "cond_scale": scale}
    meta["diffusion"] = {"latent_dim": coords.shape[1], "cond_dim": embed_dim, "hidden": hidden,
                         "depth": depth, "timesteps": timesteps, "epochs": epochs, "lr": lr,
                         "pca": {"components": coords.shape[1], "of": latents.shape[1],
                                 "variance_kept": pca["variance_kept"], "clip_margin": CLIP_MARGIN}}
    meta["history"]["diffusion_loss"] = [hist[0], hist[-1]] if hist else []
    if con_hist:
        meta["history"]["contrastive_loss"] = [con_hist[0], con_hist[-1]]
    span = coords.max(0).values - coords.min(0).values
    pca_state = {"mean": pca["mean"], "components": pca["components"],
                 "low": coords.min(0).values - CLIP_MARGIN * span, "high": coords.max(0).values + CLIP_MARGIN * span}
    return {"diffusion.safetensors": ddpm.state_dict(), "encoder.safetensors": encoder.state_dict(),
            "latent_pca.safetensors": pca_state}


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


def _train_kde(meta: dict, rows: list[dict], latents: torch.Tensor, scores: torch.Tensor,
               task_info: list[dict], fraction: float, bandwidth: str | float
               ) -> dict[str, dict[str, torch.Tensor]]:
    anchors: dict[str, torch.Tensor] = {}
    samplers = {"pooled": list(range(len(rows)))}
    if len(task_info) > 1:
        for t in task_info:
            samplers[t["key"]] = [i for i, r in enumerate(rows) if r["dataset"] == t["dataset"]]
    report = {}
    for key, idx in samplers.items():
        kde = KDESampler(fraction=fraction, bandwidth=bandwidth).fit(latents[idx], scores[idx])
        anchors[key] = torch.from_numpy(kde.anchors).float()
        report[key] = {"anchors": int(kde.anchors.shape[0]), "of": len(idx),
                       "median_bandwidth": float(sorted(kde.h)[len(kde.h) // 2])}
    meta["kde"] = {"fraction": fraction, "bandwidth": bandwidth, "per_task": len(task_info) > 1,
                   "samplers": report, "clip": "anchor range per dimension"}
    return {"kde.safetensors": anchors}


# ---------------------------------------------------------------- loading

def load_generator(path: str | Path) -> Generator:
    """Open a generator directory written by `train_generator`; malformed files raise InputError."""
    d = Path(path)
    gf = d / GENERATOR_FILE
    if not gf.is_file():
        what = "does not exist" if not d.exists() else f"has no {GENERATOR_FILE}"
        raise InputError(f"{d}: not a weight generator ({what}); train one with "
                         f"`wsmerge generate train ZOO -o {d}`")
    try:
        meta = json.loads(gf.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise InputError(f"{gf}: not valid JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise InputError(f"{gf}: not a generator file (format {FORMAT!r} expected)")
    if meta.get("version") != FORMAT_VERSION or meta.get("method") not in METHODS:
        raise InputError(f"{gf}: version {meta.get('version')} / method {meta.get('method')!r} "
                         f"is not one this weightspace reads")
    try:
        tok = WeightChunker.from_state(meta["tokenizer"])
        vae = ChunkVAE(**meta["vae"])
    except (KeyError, TypeError) as e:
        raise InputError(f"{gf}: incomplete ({e!r})") from None
    _load_module(vae, d / "vae.safetensors")
    vae.eval()
    gen = Generator(d, meta, tok, vae)
    if meta["method"] == "d2nwg":
        from weightspace.zoo.gen.diffusion import LatentDDPM
        from weightspace.zoo.gen.setenc import DatasetEncoder

        try:
            e, dd = meta["encoder"], meta["diffusion"]
            gen.encoder = DatasetEncoder(e["input_dim"], hidden=e["hidden"], out_dim=e["out_dim"], seed=None)
            gen.ddpm = LatentDDPM(dd["latent_dim"], cond_dim=dd["cond_dim"], hidden=dd["hidden"],
                                  depth=dd["depth"], timesteps=dd["timesteps"])
        except (KeyError, TypeError) as err:
            raise InputError(f"{gf}: incomplete ({err!r})") from None
        _load_module(gen.encoder, d / "encoder.safetensors")
        _load_module(gen.ddpm, d / "diffusion.safetensors")
        gen.pca = _load_safetensors(d / "latent_pca.safetensors")
        if set(gen.pca) != {"mean", "components", "low", "high"}:
            raise InputError(f"{d / 'latent_pca.safetensors'}: expected mean, components, low, high")
        gen.encoder.eval()
        gen.ddpm.eval()
    else:
        kde_meta = meta.get("kde") or {}
        for key, anchors in _load_safetensors(d / "kde.safetensors").items():
            gen.samplers[key] = KDESampler(kde_meta.get("fraction", 0.3),
                                           kde_meta.get("bandwidth", "scott")).fit_anchors(anchors.double().numpy())
    if meta.get("kept_tensors"):
        gen.kept = _load_safetensors(d / "kept.safetensors")
    return gen


# ---------------------------------------------------------------- sampling

def check_data(gen: Generator, data: str) -> tuple[Any, dict[str, Any] | None, list[str]]:
    """The task of `data`, the training task it is (or None) and notes; refuses data the
    generator cannot serve (input shape, labels beyond the head, classes never seen)."""
    from weightspace.zoo.data import load_task

    task = load_task(data)
    meta = gen.meta
    if list(task.input_shape) != list(meta["input_shape"]):
        raise InputError(f"--data {data}: inputs have shape {list(task.input_shape)}, but the generator "
                         f"makes models for inputs of shape {meta['input_shape']}")
    classes = _task_classes(task)
    head = int(meta["num_classes"])
    beyond = [c for c in classes if c >= head]
    if beyond or task.num_classes > head:
        raise InputError(f"--data {data}: has labels up to {max(classes + [task.num_classes - 1])}, beyond the "
                         f"generated models' head of {head} classes (0-{head - 1})")
    seen = sorted({c for t in gen.tasks for c in t["classes"]})
    unseen = [c for c in classes if c not in seen]
    if unseen:
        trained = "; ".join(f"{t['dataset']} (classes {_ranges(t['classes'])})" for t in gen.tasks)
        raise InputError(f"--data {data}: classes {_ranges(unseen)} were never seen by this generator; it "
                         f"was trained on {trained}. Train a generator on a zoo that covers them")
    notes = []
    match = next((t for t in gen.tasks if t["dataset"] == data), None)
    if match is None:
        if not any(t["classes"] == classes for t in gen.tasks):
            notes.append(f"{data}: this class set ({_ranges(classes)}) was never trained on as one task; "
                         f"every class was seen, but expect weaker samples")
        if gen.method == "d2nwg":
            notes.append(f"{data} is not one of the training datasets; sampling from its embedding")
        elif meta.get("kde", {}).get("per_task"):
            notes.append(f"{data} is not one of the training datasets; using the pooled KDE sampler "
                         f"(all {len(gen.tasks)} tasks)")
    return task, match, notes


def _ranges(values: Sequence[int]) -> str:
    out, vals = [], sorted(values)
    i = 0
    while i < len(vals):
        j = i
        while j + 1 < len(vals) and vals[j + 1] == vals[j] + 1:
            j += 1
        out.append(str(vals[i]) if i == j else f"{vals[i]}-{vals[j]}")
        i = j + 1
    return ",".join(out)


def sample_latents(gen: Generator, data: str, n: int, *, seed: int = 0, steps: int | None = None,
                   eta: float = 1.0, task=None, match: dict | None = None) -> tuple[torch.Tensor, str]:
    """(n, latent) latents for `data` and which sampler made them (see `sample` for steps/eta)."""
    if gen.method == "d2nwg":
        from weightspace.zoo.data import load_task
        from weightspace.zoo.gen.setenc import embed_task

        task = task if task is not None else load_task(data)
        e = gen.meta["encoder"]
        raw = embed_task(gen.encoder, task, k=e["k"], seed=e["seed"])
        cond = (raw - torch.tensor(e["cond_shift"])) / e["cond_scale"]
        g = torch.Generator().manual_seed(seed)
        if steps is None:
            c = gen.ddpm.sample(n, cond, method="ddpm", generator=g)
            how = f"diffusion (ancestral DDPM, {gen.ddpm.timesteps} steps)"
        else:
            c = gen.ddpm.sample(n, cond, steps=steps, eta=eta, generator=g)
            how = f"diffusion (DDIM, {steps} steps, eta {eta:g})"
        c = torch.maximum(torch.minimum(c, gen.pca["high"]), gen.pca["low"])
        return c @ gen.pca["components"] + gen.pca["mean"], how
    key = match["key"] if match is not None and match["key"] in gen.samplers else "pooled"
    return gen.samplers[key].sample(n, seed=seed), f"kde:{key}"


def generate_weights(gen: Generator, data: str, n: int, *, seed: int = 0, steps: int | None = None,
                     eta: float = 1.0, note: Callable[[str], None] | None = None
                     ) -> list[dict[str, torch.Tensor]]:
    """n generated models for `data`, as {name: tensor} in the zoo architecture's order."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise SpecError(f"-n: must be a positive integer, got {n!r}")
    task, match, notes = check_data(gen, data)
    for msg in notes:
        (note or (lambda m: warnings.warn(m, stacklevel=3)))(msg)
    z, _ = sample_latents(gen, data, n, seed=seed, steps=steps, eta=eta, task=task, match=match)
    tokens = gen.vae.decode_models(z)
    models = [gen.chunker.decode(t) for t in tokens]
    if gen.kept:
        key = match["key"] if match is not None else "pooled"
        prefix = f"{key}/"
        kept = {k[len(prefix):]: v for k, v in gen.kept.items() if k.startswith(prefix)}
        models = [{**m, **kept} for m in models]
    order = gen.meta["generated_tensors"] + gen.meta.get("kept_tensors", [])
    return [{name: m[name] for name in order} for m in models]


def sample(gen_dir: str | Path, data: str, n: int, out_dir: str | Path, *, seed: int = 0,
           steps: int | None = None, eta: float = 1.0, overwrite: bool = False,
           note: Callable[[str], None] | None = None) -> list[Path]:
    """Generate n models for dataset `data` into out_dir/sample-000 ... (zoo checkpoints).

        sample("gen/", "digits:classes=0-4", 20, "samples/", seed=0)

    d2nwg: `steps=None` runs the full ancestral DDPM chain (`timesteps` denoiser
    calls; well under a second for tiny models), the sampler of D2NWG and p-diff
    and the one whose samples land closest to the zoo's latents in our tests;
    `steps=k` runs DDIM with k steps and noise `eta` (1.0: DDPM-like; 0.0, the
    deterministic DDIM, drifts far off the latents of a small zoo). KDE ignores
    both. Seeded: the same seed gives the same samples. Written atomically; notes
    (an unseen dataset, a new class set) go to `note` (default: warnings)."""
    gen = load_generator(gen_dir)
    models = generate_weights(gen, data, n, seed=seed, steps=steps, eta=eta, note=note)
    meta = gen.meta
    sampler = ("ddpm" if steps is None else f"ddim:{steps}:eta={eta:g}") if gen.method == "d2nwg" else "kde"
    out = Path(out_dir)
    names = [f"sample-{i:03d}" for i in range(n)]

    def write(tmp: Path) -> None:
        for i, (name, tensors) in enumerate(zip(names, models)):
            config = {"model_type": ZOO_MODEL_TYPE, "arch": meta["arch"], "input_shape": meta["input_shape"],
                      "num_classes": meta["num_classes"], "dataset": data,
                      "generated_by": {"generator": str(Path(gen_dir)), "method": meta["method"], "seed": seed,
                                       "index": i, "sampler": sampler,
                                       "zoo": meta.get("zoo"), "generated_tensors": meta["generated_tensors"]}}
            if meta.get("train"):
                config["train"] = meta["train"]
            space = WeightSpace.from_tensors(tensors, {"source": f"{gen_dir}:{name}"})
            space.save(tmp / name, config=config,
                       metadata={"weightspace.generated_by": json.dumps(config["generated_by"])})

    atomic_dir(out, overwrite, write)
    return [out / name for name in names]
