"""Streaming, atomic checkpoint output in the Hugging Face layout.

    sink = CheckpointSink(out, tensors, shard_size=5 * 10**9, metadata={...}, inputs=[...])
    for name in sink.order:          # the order tensors must arrive in
        sink.write(name, tensor)
    sink.finish(config=..., files=..., card=...)

Shards are `model-0000K-of-0000N.safetensors` plus
`model.safetensors.index.json`, or one `model.safetensors` when everything
fits. Everything is written into a hidden directory beside OUT and renamed
into place at the end; `abort()` (or any failure) removes it, so a failed run
never leaves a half-written OUT.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from weightspace.errors import SpecError, WeightspaceError
from weightspace.files import check_output, replace_dir, temp_sibling
from weightspace.inputs import check_carried, copy_input_file
from weightspace.safetensors_io import ShardWriter, build_header, layout_order, nbytes_of

DEFAULT_SHARD_SIZE = 5 * 1000**3

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B?\s*$", re.IGNORECASE)


def parse_size(text: str | int) -> int:
    """'5G' -> 5_000_000_000, '512M', '1GiB' -> 2**30, '2KB' -> 2000, '123' -> 123 bytes.

    A bare `B` ('1B') is refused: mergekit's --out-shard-size reads it as a billion, and
    elsewhere it means bytes, so either reading would surprise someone.
    """
    if isinstance(text, int):
        return text
    m = _SIZE_RE.match(str(text))
    if not m:
        raise SpecError(f"cannot read size {text!r}: use bytes or a K/M/G/T suffix, e.g. 5G or 500M")
    if not m[2] and not m[3] and str(text).strip()[-1:] in "bB":
        raise SpecError(f"size {text!r} is ambiguous: mergekit reads B as a billion, others as bytes; "
                        f"write {m[1]}G for {m[1]} x 10^9 bytes or {m[1]} for bytes "
                        f"(--out-shard-size takes mergekit's meaning)")
    num, unit, binary = float(m[1]), m[2].upper(), bool(m[3])
    base = 1024 if binary else 1000
    power = " KMGT".index(unit) if unit else 0
    size = int(num * base**power)
    if size <= 0:
        raise SpecError(f"size {text!r} must be positive")
    return size


def plan_shards(
    tensors: Sequence[tuple[str, torch.dtype, tuple[int, ...]]], shard_size: int
) -> list[list[tuple[str, torch.dtype, tuple[int, ...]]]]:
    """Split tensors (in plan order) into shards of at most `shard_size` bytes
    (a single larger tensor gets a shard of its own); within a shard, tensors
    follow safetensors' own layout order."""
    shards: list[list[tuple[str, torch.dtype, tuple[int, ...]]]] = []
    cur: list[tuple[str, torch.dtype, tuple[int, ...]]] = []
    cur_bytes = 0
    for spec in tensors:
        nb = nbytes_of(spec[2], spec[1])
        if cur and cur_bytes + nb > shard_size:
            shards.append(cur)
            cur, cur_bytes = [], 0
        cur.append(spec)
        cur_bytes += nb
    if cur or not shards:
        shards.append(cur)
    out = []
    for shard in shards:
        by_name = {s[0]: s for s in shard}
        out.append([by_name[n] for n in layout_order([(s[0], s[1]) for s in shard])])
    return out


def shard_names(n: int) -> list[str]:
    if n == 1:
        return ["model.safetensors"]
    return [f"model-{k:05d}-of-{n:05d}.safetensors" for k in range(1, n + 1)]


class MemorySink:
    """Collects the executor's results in memory (row blocks joined per tensor)."""

    out = None

    def __init__(self) -> None:
        self.parts: dict[str, list[torch.Tensor]] = {}

    def write(self, name: str, tensor: torch.Tensor) -> None:
        self.parts.setdefault(name, []).append(tensor)

    def abort(self) -> None:
        self.parts.clear()

    def result(self, name: str) -> torch.Tensor:
        parts = self.parts[name]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)


class CheckpointSink:
    """Write a checkpoint directory tensor by tensor, atomically."""

    def __init__(
        self,
        out: str | Path,
        tensors: Sequence[tuple[str, torch.dtype, tuple[int, ...]]],
        *,
        shard_size: int = DEFAULT_SHARD_SIZE,
        metadata: Mapping[str, str] | None = None,
        overwrite: bool = False,
        inputs: Iterable[str | Path],
    ):
        self.out = Path(out)
        check_output(self.out, overwrite, inputs=inputs)
        self.overwrite = overwrite
        self.shards = plan_shards(tensors, shard_size)
        self.names = shard_names(len(self.shards))
        self.order = [s[0] for shard in self.shards for s in shard]
        self.total_size = sum(nbytes_of(s[2], s[1]) for shard in self.shards for s in shard)
        self.metadata = {"format": "pt", **(metadata or {})}
        for shard in self.shards:  # a header no reader accepts is refused before anything is written
            build_header(shard, self.metadata)
        self.tmp: Path | None = None
        self._writer: ShardWriter | None = None
        self._shard = -1
        self._written = 0

    def _start(self) -> None:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = temp_sibling(self.out)
        self.tmp.mkdir()

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if self.tmp is None:
            self._start()
        if self._writer is None or self._writer.done:
            if self._writer is not None:
                self._writer.close()
            self._shard += 1
            assert self.tmp is not None
            self._writer = ShardWriter(
                self.tmp / self.names[self._shard], self.shards[self._shard], self.metadata
            )
        self._writer.write(name, tensor)
        if self._writer.tensor_done:
            self._written += 1

    def finish(
        self,
        *,
        config: dict | None = None,
        files: Mapping[str, Path] | None = None,
        card: str | None = None,
        extra_json: Mapping[str, Any] | None = None,
        texts: Mapping[str, str] | None = None,
        tokenizer: Any | None = None,
    ) -> Path:
        """Close the last shard, write index, config, carried files, text files and card;
        rename into place.

        `tokenizer` writes the output tokenizer itself (`tokenizer.write(directory)`, see
        weightspace.tokenizers.Vocabulary); it may only write into the directory it is given."""
        if self.tmp is None:
            self._start()
        assert self.tmp is not None
        if self._written != len(self.order):
            raise WeightspaceError(f"internal: {self._written} of {len(self.order)} tensors written")
        if self._writer is not None:
            self._writer.close()
        for shard_name, shard in zip(self.names, self.shards):  # empty shards (no tensors)
            if not shard and not (self.tmp / shard_name).exists():
                ShardWriter(self.tmp / shard_name, [], self.metadata).close()
        if len(self.names) > 1:
            index = {
                "metadata": {"total_size": self.total_size},
                "weight_map": {s[0]: n for n, shard in zip(self.names, self.shards) for s in shard},
            }
            _write_text(self.tmp / "model.safetensors.index.json", json.dumps(index, indent=2) + "\n")
        if config is not None:
            _write_text(self.tmp / "config.json", json.dumps(config, indent=2, sort_keys=True) + "\n")
        for name, src in (files or {}).items():
            copy_input_file(src, self.tmp / name)  # only from inside its model directory
        if tokenizer is not None:
            tokenizer.write(self.tmp)
        for name, data in (extra_json or {}).items():
            _write_text(self.tmp / name, json.dumps(data, indent=2) + "\n")
        for name, text in (texts or {}).items():
            _write_text(self.tmp / name, text)
        if card is not None:
            _write_text(self.tmp / "README.md", card)
        self._commit()
        return self.out

    def _commit(self) -> None:
        assert self.tmp is not None
        replace_dir(self.tmp, self.out, overwrite=self.overwrite)
        self.tmp = None

    def abort(self) -> None:
        """Remove everything written so far; OUT is untouched."""
        if self._writer is not None:
            self._writer.abort()
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp = None


def _write_text(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def save_space(
    space: Any,
    out: str | Path,
    *,
    shard_size: int | str = DEFAULT_SHARD_SIZE,
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
    metadata: Mapping[str, str] | None = None,
    config: dict | None = None,
    device: str = "cpu",
    progress: bool = False,
    inputs: Iterable[str | Path] = (),
) -> Path:
    """Stream a WeightSpace (lazy expressions included) to a checkpoint directory. OUT may not
    be, hold or lie inside the files the space reads, nor any of `inputs`."""
    from weightspace.executor import Step, execute

    files = space.meta.get("files") or {}
    check_carried(files)  # a file that would be refused at the end is refused before the first tensor
    out_dt = {n: (dtype if dtype is not None and r.dtype.is_floating_point else r.dtype)
              for n, r in space.items()}
    sink = CheckpointSink(
        out, [(n, out_dt[n], r.shape) for n, r in space.items()],
        shard_size=parse_size(shard_size), metadata=metadata, overwrite=overwrite,
        inputs=[*inputs_of(space), *inputs],
    )
    steps = [Step(n, space[n].shape, out_dt[n], [space[n]], lambda ts: ts[0]) for n in sink.order]
    execute(steps, sink, device=device, compute_dtype=None, progress=progress, allow_nonfinite=True)
    cfg = config if config is not None else space.meta.get("config")
    return sink.finish(config=cfg, files=files)


def inputs_of(space: Any) -> list[Path]:
    """The files and directories a WeightSpace reads: every stored tensor's file, where the space
    was opened and the files it carries (tokenizer, generation config)."""
    found: dict[str, Path] = {}
    for ref in space.values():
        for leaf in ref.leaves():
            if (p := getattr(leaf, "path", None)) is not None:
                found.setdefault(str(p), Path(p))
    meta = getattr(space, "meta", {}) or {}
    if isinstance(meta.get("location"), (str, Path)):  # the file or directory that was opened
        found.setdefault(str(meta["location"]), Path(meta["location"]))
    for p in (meta.get("files") or {}).values():
        found.setdefault(str(p), Path(p))
    return list(found.values())
