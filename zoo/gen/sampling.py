"""Sampling from a trained generator: check the requested dataset, draw latents, decode, write.

    paths = sample("gen/", "digits:classes=0-4", 20, "samples/", seed=0)   # zoo checkpoints
    models = generate_weights(load_generator("gen/"), "digits:rotate=90", 4)   # {name: tensor} each

d2nwg embeds the requested dataset and runs the latent DDPM conditioned on
it, so an unseen dataset whose classes were all seen gets weights too; kde
draws from the sampler of the training task the dataset is (else the pooled
one). Either way the chunk VAE decodes the latents and the weight chunker
turns the chunks back into tensors; tensors kept with --subset come from the
best zoo model of the task.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from weightspace.bounds import MAX_SAMPLES
from weightspace.errors import InputError, SpecError
from weightspace.files import atomic_dir, check_output
from weightspace.ir import WeightSpace
from weightspace.zoo.gen.store import ZOO_MODEL_TYPE, Generator, load_generator, task_classes

# the support sets of a sample run are drawn from their own stream, not the DDPM noise's
SUPPORT_SEED_OFFSET = 1_000_003


def check_data(gen: Generator, data: str) -> tuple[Any, dict[str, Any] | None, list[str]]:
    """The task of `data`, the training task it is (or None) and notes; refuses data the
    generator cannot serve (input shape, labels beyond the head, classes never seen)."""
    from weightspace.zoo.data import load_task

    task = load_task(data)
    meta = gen.meta
    if list(task.input_shape) != list(meta["input_shape"]):
        raise InputError(f"--data {data}: inputs have shape {list(task.input_shape)}, but the generator "
                         f"makes models for inputs of shape {meta['input_shape']}")
    classes = task_classes(task)
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
    """Class labels as ranges: [0, 1, 2, 5, 7, 8] -> "0-2,5,7-8"."""
    out, vals = [], sorted(values)
    i = 0
    while i < len(vals):
        j = i
        while j + 1 < len(vals) and vals[j + 1] == vals[j] + 1:
            j += 1
        out.append(str(vals[i]) if i == j else f"{vals[i]}-{vals[j]}")
        i = j + 1
    return ",".join(out)


def _diffusion_latents(gen: Generator, task, n: int, *, seed: int, steps: int | None,
                       eta: float) -> tuple[torch.Tensor, str]:
    """d2nwg: n latents from the DDPM conditioned on the task's standardized embedding, mapped back
    from principal coordinates (clipped to the zoo's widened range) to the VAE's latent space.

    Every sample is conditioned on its own support set of k examples per class, drawn from
    the task's train split with `seed`, as the authors' `sample_cond` (mlp_sampling.py of
    github:sorobedio/DNNWG) draws one per generated model. A generator written before that
    (no "support" in its encoder settings) embeds one fixed draw, as it was trained."""
    from weightspace.zoo.gen.setenc import SupportSets, embed_task

    e = gen.meta["encoder"]
    if e.get("support") == "fresh":
        sets = SupportSets(task).draw(n, e["k"], torch.Generator().manual_seed(seed + SUPPORT_SEED_OFFSET))
        with torch.no_grad():
            raw = gen.encoder(sets)
    else:
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


def sample_latents(gen: Generator, data: str, n: int, *, seed: int = 0, steps: int | None = None,
                   eta: float = 1.0, task=None, match: dict | None = None) -> tuple[torch.Tensor, str]:
    """(n, latent) latents for `data` and which sampler made them (see `sample` for steps/eta)."""
    if gen.method == "d2nwg":
        from weightspace.zoo.data import load_task

        task = task if task is not None else load_task(data)
        return _diffusion_latents(gen, task, n, seed=seed, steps=steps, eta=eta)
    key = match["key"] if match is not None and match["key"] in gen.samplers else "pooled"
    return gen.samplers[key].sample(n, seed=seed), f"kde:{key}"


def generate_weights(gen: Generator, data: str, n: int, *, seed: int = 0, steps: int | None = None,
                     eta: float = 1.0, note: Callable[[str], None] | None = None
                     ) -> list[dict[str, torch.Tensor]]:
    """n generated models for `data`, as {name: tensor} in the zoo architecture's order."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise SpecError(f"-n: must be a positive integer, got {n!r}")
    if n > MAX_SAMPLES:
        raise SpecError(f"-n: {n:,} models is more than the {MAX_SAMPLES:,} one call makes; sample in batches")
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
    check_output(Path(out_dir), overwrite, inputs=[gen_dir])  # before the work, not only at the end
    gen = load_generator(gen_dir)
    models = generate_weights(gen, data, n, seed=seed, steps=steps, eta=eta, note=note)
    sampler = ("ddpm" if steps is None else f"ddim:{steps}:eta={eta:g}") if gen.method == "d2nwg" else "kde"
    out = Path(out_dir)
    names = [f"sample-{i:03d}" for i in range(n)]

    def write(tmp: Path) -> None:
        for i, (name, tensors) in enumerate(zip(names, models)):
            config = _sample_config(gen.meta, gen_dir, data, seed=seed, index=i, sampler=sampler)
            space = WeightSpace.from_tensors(tensors, {"source": f"{gen_dir}:{name}"})
            space.save(tmp / name, config=config,
                       metadata={"weightspace.generated_by": json.dumps(config["generated_by"])})

    atomic_dir(out, overwrite, write, inputs=[gen_dir])
    return [out / name for name in names]


def _sample_config(meta: dict[str, Any], gen_dir: str | Path, data: str, *, seed: int, index: int,
                   sampler: str) -> dict[str, Any]:
    """config.json of one sample: a zoo checkpoint's, plus `generated_by` (and the zoo's `train`)."""
    config = {"model_type": ZOO_MODEL_TYPE, "arch": meta["arch"], "input_shape": meta["input_shape"],
              "num_classes": meta["num_classes"], "dataset": data,
              "generated_by": {"generator": str(Path(gen_dir).resolve()), "method": meta["method"], "seed": seed,
                               "index": index, "sampler": sampler,
                               "zoo": meta.get("zoo"), "generated_tensors": meta["generated_tensors"],
                               # what the generator learned from: `evaluate` checks copying against it
                               "train_tasks": [t["dataset"] for t in meta["tasks"]],
                               "checkpoints": meta.get("checkpoints", "final")}}
    if meta.get("train"):
        config["train"] = meta["train"]
    return config
