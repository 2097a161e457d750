"""Open a checkpoint as a WeightSpace, reading headers only.

Accepted: a `.safetensors` file; a directory with `model.safetensors`; a
sharded directory with `model.safetensors.index.json`; `pytorch_model.bin` /
`.pt` / `.pth` (loaded with `torch.load(weights_only=True, mmap=True)`);
a Hub id `org/name[@revision]`; `base+adapter`, a base model with a peft LoRA
adapter applied tensor by tensor (see weightspace.lora). A name that exists on
disk is always a local path and never touches the network.
"""

from __future__ import annotations

import os
import pickle
import re
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from weightspace.errors import InputError, SpecError
from weightspace.files import read_json_object
from weightspace.inputs import check_regular, open_input, short_repr
from weightspace.ir import MemoryRef, SafetensorsRef, TensorRef, WeightSpace
from weightspace.paths import expand_user
from weightspace.safetensors_io import read_header

if TYPE_CHECKING:
    from weightspace.lora import Adapter

# Files carried from a model directory into a merge output when it is the tokenizer source.
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "tokenizer.model", "vocab.txt", "vocab.json", "merges.txt", "spiece.model",
    "sentencepiece.bpe.model", "chat_template.jinja", "chat_template.json",
    "generation_config.json",
)  # fmt: skip
HUB_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")
_TORCH_SUFFIXES = (".bin", ".pt", ".pth")


def _check_inside(root: Path, name: str, index: Path) -> Path:
    """A shard named in an index must be a relative path inside the model directory.

    The name is judged, not where a symlink points: the Hugging Face cache links
    every snapshot file to a blob outside the snapshot directory.
    """
    p = Path(name)
    if p.is_absolute() or p.drive or ".." in p.parts:
        raise InputError(f"{index}: shard {short_repr(name)} leaves the model directory; refusing to read it")
    return root / p


def _load_config(d: Path) -> dict | None:
    cfg = d / "config.json"
    if not os.path.lexists(cfg):
        return None
    return read_json_object(cfg)  # a FIFO, directory or broken link named config.json is refused


def tokenizer_files(d: Path) -> dict[str, Path]:
    """The tokenizer files of model directory `d` an output would carry, by name. Whatever has
    such a name is listed; a copy checks it (weightspace.inputs.carried_file: a regular file
    inside `d`), so a symlink to a file elsewhere or a FIFO is refused, not skipped unseen."""
    return {n: d / n for n in TOKENIZER_FILES if os.path.lexists(d / n)}


def _dir_meta(d: Path, fmt: str, source: str) -> dict[str, Any]:
    return {"source": source, "path": d, "config": _load_config(d), "files": tokenizer_files(d),
            "format": fmt}


def _from_safetensors_files(files: list[Path], meta: dict) -> WeightSpace:
    refs: dict[str, TensorRef] = {}
    for f in files:
        entries, _ = read_header(f)
        for name, e in entries.items():
            if name in refs:
                raise InputError(f"{f}: tensor {name!r} also appears in another shard")
            refs[name] = SafetensorsRef(f, e)
    return WeightSpace(refs, meta)


def _from_index(d: Path, index: Path, meta: dict) -> WeightSpace:
    weight_map = read_json_object(index).get("weight_map")  # a key twice or deep nesting refused
    if not isinstance(weight_map, dict):
        raise InputError(f"{index}: not a valid index (needs a 'weight_map' object)")
    if not weight_map:
        raise InputError(f"{index}: corrupt index: its 'weight_map' lists no tensors")
    shards: dict[str, Path] = {}
    for shard in weight_map.values():
        if not isinstance(shard, str):
            raise InputError(f"{index}: shard names must be strings, got a {type(shard).__name__}")
        if shard not in shards:
            p = _check_inside(d, shard, index)
            if not os.path.lexists(p):
                raise InputError(f"{index}: shard file {short_repr(shard)} is missing from {d}")
            shards[shard] = p
    if index.name.endswith(".safetensors.index.json"):
        space = _from_safetensors_files(list(shards.values()), meta)
    else:
        parts = [_torch_space(p, meta) for p in shards.values()]
        refs = {k: v for part in parts for k, v in part._refs.items()}
        space = WeightSpace(refs, meta)
    for name, shard in weight_map.items():
        if name not in space:
            raise InputError(f"{index}: tensor {short_repr(name)} is listed in {short_repr(shard)} but not "
                             f"stored there")
    return space


def _torch_load_error(e: Exception) -> str:
    """What went wrong in torch.load, in our words. torch's own text is not passed on: it
    advises retrying with weights_only=False (which runs the file's code, and which we never
    do), carries terminal escape codes, and quotes the pickle's contents (a global's name, a
    load key byte)."""
    text = str(e)
    if isinstance(e, pickle.UnpicklingError) or "Weights only load failed" in text \
            or "WeightsUnpickler error" in text:
        return ("refused by torch.load(weights_only=True): it holds objects other than tensors and "
                "plain containers (unpickling it could run code). Convert a checkpoint you trust to "
                "safetensors")
    what = " (a damaged zip archive)" if "zip archive" in text or "PytorchStreamReader" in text else ""
    return f"not a PyTorch checkpoint torch.load(weights_only=True) can read{what}"


def _check_zip_crcs(path: Path) -> None:
    """A zip-format torch file (torch.save's default) with every member's CRC checked: torch.load
    itself never checks them, so a flipped byte in a tensor would load as a different weight."""
    try:
        with open_input(path) as f:
            if not zipfile.is_zipfile(f):
                return  # the legacy pickle format: nothing to check
            f.seek(0)
            with zipfile.ZipFile(f) as z:
                bad = z.testzip()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError, ValueError, NotImplementedError):
        raise InputError(f"{path}: {_torch_load_error(zipfile.BadZipFile('zip archive'))}") from None
    if bad is not None:
        raise InputError(f"{path}: corrupt PyTorch checkpoint: member {short_repr(bad)} fails its CRC "
                         f"check (the file was damaged)")


def _torch_space(path: Path, meta: dict) -> WeightSpace:
    check_regular(path)
    _check_zip_crcs(path)
    try:
        with warnings.catch_warnings():
            # e.g. "The weights_only Unpickler might not support all instructions implemented by
            # this protocol": a refusal follows, in our words, or the load succeeds
            warnings.simplefilter("ignore", UserWarning)
            try:
                obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as e:
                if "mmap" not in str(e) and "zip" not in str(e):
                    raise
                obj = torch.load(path, map_location="cpu", weights_only=True)  # legacy format
    except Exception as e:  # torch raises many types for bad/unsafe pickles
        raise InputError(f"{path}: {_torch_load_error(e)}") from None
    if isinstance(obj, dict) and len(obj) == 1 and next(iter(obj)) in ("state_dict", "model"):
        obj = next(iter(obj.values()))
    if not isinstance(obj, dict):
        raise InputError(f"{path}: expected a state dict (name -> tensor), got a {type(obj).__name__}")
    tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if not tensors:
        raise InputError(f"{path}: contains no tensors")
    return WeightSpace({k: MemoryRef(k, v) for k, v in tensors.items()}, meta)


def load_local(path: str | Path) -> WeightSpace:
    """Open a local checkpoint file or directory (headers only); meta["location"] is its absolute
    path, and meta["hub_id"] the Hub repo when the path is a snapshot in the Hugging Face cache."""
    space = _load_local(Path(path))
    space.meta["location"] = Path(path).resolve()
    origin = hub_origin(space.meta["location"])
    if origin:
        space.meta.setdefault("hub_id", origin)
    return space


def hub_origin(path: Path) -> str | None:
    """`org/name` for a path inside the Hugging Face cache's `models--org--name/snapshots/REV/`
    (where the Hub's files live on disk), else None: the one place a local directory records
    which Hub repo it came from (a repo id never contains `--`)."""
    parts = path.parts
    for i in range(len(parts) - 2):
        if parts[i].startswith("models--") and parts[i + 1] == "snapshots":
            org, sep, name = parts[i][len("models--"):].partition("--")
            return f"{org}/{name}" if sep and org and name else None
    return None


def _load_local(p: Path) -> WeightSpace:
    src = str(p)
    if not p.exists():
        raise InputError(f"{src}: no such file or directory")
    if not p.is_dir():  # a file, or a FIFO or device, which the readers refuse by name
        bare = {"source": src, "path": p.parent, "config": None, "files": {}}
        if p.suffix == ".safetensors":
            return _from_safetensors_files([p], {**bare, "format": "safetensors"})
        if p.suffix in _TORCH_SUFFIXES:
            return _torch_space(p, {**bare, "format": "torch"})
        if p.name.endswith(".index.json"):
            return _from_index(p.parent, p, _dir_meta(p.parent, "safetensors", src))
        raise InputError(f"{src}: unsupported file type (expected .safetensors, .bin, .pt or .pth)")
    if os.path.lexists(p / "model.safetensors.index.json"):
        return _from_index(p, p / "model.safetensors.index.json", _dir_meta(p, "safetensors", src))
    if os.path.lexists(p / "model.safetensors"):
        return _from_safetensors_files([p / "model.safetensors"], _dir_meta(p, "safetensors", src))
    if os.path.lexists(p / "pytorch_model.bin.index.json"):
        return _from_index(p, p / "pytorch_model.bin.index.json", _dir_meta(p, "torch", src))
    if os.path.lexists(p / "pytorch_model.bin"):
        return _torch_space(p / "pytorch_model.bin", _dir_meta(p, "torch", src))
    singles = sorted(p.glob("*.safetensors"))
    if len(singles) == 1:
        return _from_safetensors_files(singles, _dir_meta(p, "safetensors", src))
    found = ", ".join(sorted(x.name for x in p.iterdir())[:8]) or "nothing"
    raise InputError(
        f"{src}: no checkpoint found (looked for model.safetensors, model.safetensors.index.json, "
        f"pytorch_model.bin); the directory has: {found}"
    )


@dataclass(frozen=True)
class LoraParts:
    """`base+adapter`: the two references as written, and where each points."""

    base: str
    base_at: Located
    adapter: str
    adapter_at: Located


@dataclass(frozen=True)
class Located:
    """Where a model reference points: a local path, a Hub id to resolve, or (`lora`) a base
    model and a LoRA adapter. Callers that want a file check `path`, which a LoRA reference
    leaves None, so for them it is a missing path."""

    path: Path | None = None
    hub_id: str | None = None
    # set when a spec-relative reference was found only relative to the working directory
    note: str | None = None
    looked: tuple[Path, ...] = ()  # the local places tried, for error messages
    lora: LoraParts | None = None


def _looks_local(ref: str, anchors: list[Path]) -> bool:
    """True when `ref` cannot be a Hub id `org/name[@revision]`: it is written as a path, or its
    first component is a folder where it would be looked up (`models/base` beside a `models/`
    folder is a missing path, not a Hub repo)."""
    if not HUB_ID_RE.match(ref) or ref.startswith((".", "/", "~")):
        return True
    first = ref.split("/")[0]
    return any((a / first).is_dir() for a in anchors)


def locate(ref: str | Path, base_dir: str | Path | None = None) -> Located:
    """Resolve a reference as a spec means it, the same from any working directory.

    A relative path is read against `base_dir` (the directory of the spec that
    names it). If it exists only relative to the working directory (mergekit's
    habit), that is used, with a `note` saying so. If it exists in both places as
    different files, that is an error naming both. A reference found nowhere on
    disk that looks like a Hub id `org/name[@revision]` is a Hub id; anything
    else is a missing path.

    `base+adapter` that is not itself a path on disk is a base model with a LoRA
    adapter (mergekit's `model+lora`): each part is located by the same rules,
    and `lora` holds both (see `locate_lora`).
    """
    found = _locate_one(str(ref), base_dir)
    if found.path is None and "+" in str(ref):
        return locate_lora(str(ref), base_dir, found.looked)
    return found


def _locate_one(s: str, base_dir: str | Path | None) -> Located:
    p = expand_user(s)
    cwd = Path.cwd()
    if p.is_absolute() or base_dir is None:
        anchors = [cwd]
        places = [p if p.is_absolute() else cwd / p]
        if places[0].exists():
            return Located(path=p)  # as the user wrote it; load_local records the absolute location
    else:
        anchors = [Path(base_dir).resolve(), cwd]
        in_spec, in_cwd = anchors[0] / p, cwd / p
        places = [in_spec] if anchors[0] == cwd else [in_spec, in_cwd]
        found = [q for q in places if q.exists()]
        if len(found) == 2 and not os.path.samefile(found[0], found[1]):
            raise SpecError(
                f"{s!r} names two different things: {found[0]} (beside the spec) and {found[1]} "
                f"(in the working directory); a spec's relative paths are read against its own "
                f"folder, so move or rename one, or write the path you mean in full")
        if found and found[0] == in_spec:
            return Located(path=in_spec)
        if found:
            return Located(path=in_cwd, note=(
                f"{s!r} is not beside the spec ({in_spec}); using {in_cwd.resolve()} from the working "
                f"directory. Write it relative to the spec's folder so the spec means the same "
                f"from anywhere"))
    if not _looks_local(s, anchors):
        return Located(hub_id=s, looked=tuple(places))
    return Located(looked=tuple(places))


def locate_lora(ref: str, base_dir: str | Path | None, looked: tuple[Path, ...] = ()) -> Located:
    """`base+adapter`, each part located as `locate` does (spec folder, then working
    directory with a note, then the Hub). mergekit splits at the one `+`; a name with more
    than one (a folder called `clean+noise`) is split where both parts exist on disk."""
    cuts = [i for i, c in enumerate(ref) if c == "+"]
    options = []
    for i in cuts:
        base, adapter = ref[:i].strip(), ref[i + 1:].strip()
        if not base or not adapter:
            raise SpecError(f"{ref!r}: a LoRA reference is base+adapter, with a model before the "
                            f"'+' and a peft adapter after it")
        options.append(LoraParts(base, _locate_one(base, base_dir), adapter,
                                 _locate_one(adapter, base_dir)))
    if len(options) > 1:
        on_disk = [o for o in options if o.base_at.path is not None and o.adapter_at.path is not None]
        if len(on_disk) != 1:
            splits = ", ".join(f"{o.base!r} + {o.adapter!r}" for o in (on_disk or options))
            raise SpecError(f"{ref!r}: cannot tell the base model from the LoRA adapter ({splits}); "
                            f"write it as base+adapter with a single '+'")
        options = on_disk
    parts = options[0]
    notes = [f"the {what} {n}" for what, n in (("base model", parts.base_at.note),
                                               ("LoRA adapter", parts.adapter_at.note)) if n]
    return Located(note="; ".join(notes) or None, looked=looked, lora=parts)


def missing_path(ref: str, looked: tuple[Path, ...]) -> str:
    where = " or ".join(str(q) for q in looked)
    return f"{ref}: no such file or directory" + (f" (looked for {where})" if looked and
                                                  str(looked[0]) != ref else "")


def load_space(ref: str | Path, *, base_dir: str | Path | None = None) -> WeightSpace:
    """Open a model by local path or Hub id (`org/name[@revision]`), headers only.

    A relative path is read against `base_dir` (the directory of the spec that
    names it; see `locate`), else against the working directory. Only a name
    that exists nowhere on disk and looks like a Hub id goes to the Hub.
    """
    return open_located(str(ref), locate(ref, base_dir))


def open_located(ref: str, loc: Located) -> WeightSpace:
    """Open what `locate` found: the local path, the Hub id (cached or downloaded), or a base
    model with a LoRA adapter applied (lazily, see weightspace.lora)."""
    if loc.lora is not None:
        return _open_lora(ref, loc.lora)
    if loc.path is not None:
        return load_local(loc.path)
    if loc.hub_id is None:
        raise InputError(missing_path(ref, loc.looked))
    from weightspace.hub import resolve_hub

    try:
        local = resolve_hub(loc.hub_id)
    except InputError as e:
        where = " or ".join(str(q) for q in loc.looked)
        raise InputError(f"{e}" + (f"; on disk, looked for {where}" if where else "")) from None
    space = load_local(local)
    space.meta["source"] = loc.hub_id
    space.meta["hub_id"] = loc.hub_id.split("@")[0]
    return space


def _open_lora(ref: str, parts: LoraParts) -> WeightSpace:
    """`base+adapter` as `locate` found it, the adapter applied lazily; errors say which part."""
    from weightspace.lora import apply_adapter, resolve_adapter_on_hub

    try:
        base = open_located(parts.base, parts.base_at)
    except InputError as e:
        raise InputError(f"{ref}: the base model {e}") from None
    try:
        if parts.adapter_at.path is not None:
            folder = Path(parts.adapter_at.path)
        elif parts.adapter_at.hub_id is not None:
            folder = resolve_adapter_on_hub(parts.adapter_at.hub_id)
        else:
            raise InputError(missing_path(parts.adapter, parts.adapter_at.looked))
        space = apply_adapter(base, read_adapter(folder), source=ref)
        hub = (parts.adapter_at.hub_id or "").split("@")[0] or hub_origin(folder.resolve())
        if hub:
            space.meta["adapter_hub_id"] = hub  # the model card names it too, as mergekit's does
        return space
    except InputError as e:
        raise InputError(f"{ref}: the LoRA adapter {e}") from None


def read_adapter(folder: str | Path) -> Adapter:
    """A peft LoRA adapter directory (weightspace.lora.Adapter): its checked config and its
    weights' headers (adapter_model.safetensors, or .bin loaded with weights_only)."""
    from weightspace.lora import Adapter, read_adapter_config

    config, weights = read_adapter_config(folder)
    return Adapter(Path(folder), weights, config, load_local(weights))
