"""The generator directory: its files, and the `Generator` that `load_generator` fills from them.

    gen = load_generator("gen/")      # gen.method, gen.tasks, gen.chunker, gen.vae, gen.ddpm, ...
    write_generator("gen/", files, meta, overwrite=False)   # what train_generator writes

    gen/generator.json          method, architecture, tasks seen (classes), chunker state (key
                                "tokenizer"), settings, training history
    gen/vae.safetensors         the chunk VAE
    gen/diffusion.safetensors   d2nwg: the latent DDPM (with its latent standardization)
    gen/encoder.safetensors     d2nwg: the dataset encoder
    gen/latent_pca.safetensors  d2nwg: latent mean, principal directions, clip range of the coordinates
    gen/kde.safetensors         kde: the anchor latents of every sampler ("pooled", "task.<i>")
    gen/kept.safetensors        with --subset: the tensors not generated, from each task's best model

No pickle: modules are rebuilt from generator.json and filled from safetensors.
The sizes generator.json gives are bounded, and every module is built first on the
meta device and compared with its file's safetensors header (weightspace.bounds),
so a claim the tensors do not back allocates nothing. A directory is written
atomically; a missing or malformed file raises InputError naming it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from weightspace.bounds import (
    MAX_DEPTH,
    MAX_SIZE,
    build_checked,
    check_size,
    check_sizes,
    header_shapes,
)
from weightspace.errors import InputError
from weightspace.files import atomic_dir, read_json_object
from weightspace.inputs import check_regular
from weightspace.zoo.gen.chunking import WeightChunker
from weightspace.zoo.gen.kde import KDESampler
from weightspace.zoo.gen.vae import ChunkVAE

FORMAT = "weightspace-generator"
FORMAT_VERSION = 1
GENERATOR_FILE = "generator.json"
METHODS = ("d2nwg", "kde")
ZOO_MODEL_TYPE = "weightspace-zoo"

# the size fields of each module's section of generator.json: field -> limit, or (minimum, limit)
SIZE_FIELDS = {
    "vae": {"n_chunks": MAX_SIZE, "chunk": MAX_SIZE, "latent_dim": MAX_SIZE, "hidden": MAX_SIZE,
            "depth": MAX_DEPTH, "pos_dim": MAX_SIZE},
    "encoder": {"input_dim": MAX_SIZE, "hidden": MAX_SIZE, "out_dim": MAX_SIZE},
    "diffusion": {"latent_dim": MAX_SIZE, "cond_dim": (0, MAX_SIZE), "hidden": MAX_SIZE,
                  "depth": (0, MAX_DEPTH), "timesteps": MAX_SIZE},
}


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


def task_classes(task) -> list[int]:
    """The sorted class labels of a task's training split (what generator.json records per task)."""
    return sorted(int(c) for c in torch.unique(task.train.y).tolist())


# ---------------------------------------------------------------- safetensors files

def _save_safetensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(path),
              metadata={"format": "pt", "weightspace.generator": "1"})


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not os.path.lexists(path):
        raise InputError(f"{path}: missing; the generator directory is incomplete")
    check_regular(path)  # a FIFO would block the reader
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise InputError(f"{path}: not a readable safetensors file ({e})") from None


def _build(gen_dir: Path, section: str, make, settings: dict[str, Any], file: str) -> torch.nn.Module:
    """The module `make()` builds from generator.json's `section`, once its sizes are bounded
    and its meta-device twin's shapes are those in `file`'s header; filled from `file`."""
    gf, path = gen_dir / GENERATOR_FILE, gen_dir / file
    check_sizes(settings, SIZE_FIELDS[section], gf, prefix=f"{section}.")
    if not path.is_file():
        raise InputError(f"{path}: missing; the generator directory is incomplete")
    fields = {f"{section}.{k}": v for k, v in settings.items() if k in SIZE_FIELDS[section]}
    try:
        header = header_shapes(path)
    except InputError as e:
        raise InputError(f"{path}: not a readable safetensors file ({str(e).removeprefix(f'{path}: ')})") from None
    try:
        module = build_checked(make, header, config=gf, tensors=path, fields=fields)
    except TypeError as e:
        raise InputError(f"{gf}: {section}: {e}") from None
    _load_module(module, path)
    return module


def _load_module(module: torch.nn.Module, path: Path) -> None:
    state = _load_safetensors(path)
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).splitlines()[0]
        raise InputError(f"{path}: does not fit the module described in {GENERATOR_FILE}: {first}") from None


# ---------------------------------------------------------------- writing

def write_generator(out: Path, files: dict[str, dict[str, torch.Tensor]], meta: dict[str, Any],
                    overwrite: bool, *, inputs: tuple = ()) -> Path:
    """Write `files` ({file name: tensors}) and generator.json (`meta`) as the directory `out`,
    atomically; `out` may not be, hold or lie inside any of `inputs` (the zoo it learnt from)."""

    def write(tmp: Path) -> None:
        for name, tensors in files.items():
            _save_safetensors(tensors, tmp / name)
        (tmp / GENERATOR_FILE).write_text(json.dumps(meta, indent=1, allow_nan=False) + "\n", encoding="utf-8")

    return atomic_dir(out, overwrite, write, inputs=inputs)


# ---------------------------------------------------------------- loading

def _read_meta(d: Path) -> dict[str, Any]:
    """generator.json of `d`, checked for format, version and method."""
    gf = d / GENERATOR_FILE
    if not gf.is_file():
        what = "does not exist" if not d.exists() else f"has no {GENERATOR_FILE}"
        raise InputError(f"{d}: not a weight generator ({what}); train one with "
                         f"`wsmerge generate train ZOO -o {d}`")
    meta = read_json_object(gf)
    if meta.get("format") != FORMAT:
        raise InputError(f"{gf}: not a generator file (format {FORMAT!r} expected)")
    if meta.get("version") != FORMAT_VERSION or meta.get("method") not in METHODS:
        raise InputError(f"{gf}: version {meta.get('version')} / method {meta.get('method')!r} "
                         f"is not one this weightspace reads")
    return meta


def _load_d2nwg(gen: Generator) -> None:
    """The dataset encoder, the latent DDPM and the latent principal coordinates."""
    from weightspace.zoo.gen.diffusion import LatentDDPM
    from weightspace.zoo.gen.setenc import DatasetEncoder

    d, meta = gen.path, gen.meta
    try:
        e, dd = meta["encoder"], meta["diffusion"]
        enc = {k: e[k] for k in ("input_dim", "hidden", "out_dim")}
        ddpm = {k: dd[k] for k in ("latent_dim", "cond_dim", "hidden", "depth", "timesteps")}
        ddpm.update(schedule=dd.get("schedule", "linear"), beta_start=dd.get("beta_start"),
                    beta_end=dd.get("beta_end"))
    except (KeyError, TypeError) as err:
        raise InputError(f"{d / GENERATOR_FILE}: incomplete ({err!r})") from None
    if "k" in e:                  # examples per class of every support set drawn at sampling time
        check_size(e["k"], "encoder.k", d / GENERATOR_FILE, limit=10_000)
    gen.encoder = _build(d, "encoder", lambda: DatasetEncoder(**enc, seed=None), enc, "encoder.safetensors")
    gen.ddpm = _build(d, "diffusion", lambda: LatentDDPM(**ddpm), ddpm, "diffusion.safetensors")
    gen.pca = _load_safetensors(d / "latent_pca.safetensors")
    if set(gen.pca) != {"mean", "components", "low", "high"}:
        raise InputError(f"{d / 'latent_pca.safetensors'}: expected mean, components, low, high")
    gen.encoder.eval()
    gen.ddpm.eval()


def _load_kde(gen: Generator) -> None:
    """One KDE sampler per set of anchor latents."""
    kde_meta = gen.meta.get("kde") or {}
    # a generator written before the anchor sampler existed drew every dimension on its own
    sampler = kde_meta.get("sampler", "independent")
    for key, anchors in _load_safetensors(gen.path / "kde.safetensors").items():
        gen.samplers[key] = KDESampler(kde_meta.get("fraction", 0.3), kde_meta.get("bandwidth"),
                                       sampler=sampler).fit_anchors(anchors.double().numpy())


def load_generator(path: str | Path) -> Generator:
    """Open a generator directory written by `train_generator`; malformed files raise InputError."""
    d = Path(path)
    meta = _read_meta(d)
    try:
        chunker = WeightChunker.from_state(meta["tokenizer"])
        settings = dict(meta["vae"])
    except (KeyError, TypeError, ValueError) as e:
        raise InputError(f"{d / GENERATOR_FILE}: incomplete ({e!r})") from None
    vae = _build(d, "vae", lambda: ChunkVAE(**settings), settings, "vae.safetensors")
    if (chunker.n_chunks, chunker.chunk) != (vae.n_chunks, vae.chunk):
        raise InputError(f"{d / GENERATOR_FILE}: the weight chunker (\"tokenizer\") cuts {chunker.n_chunks} chunks "
                         f"of {chunker.chunk}, but the VAE reads {vae.n_chunks} of {vae.chunk}")
    vae.eval()
    gen = Generator(d, meta, chunker, vae)
    if meta["method"] == "d2nwg":
        _load_d2nwg(gen)
    else:
        _load_kde(gen)
    if meta.get("kept_tensors"):
        gen.kept = _load_safetensors(d / "kept.safetensors")
    return gen
