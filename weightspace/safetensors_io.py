"""Bounded-memory safetensors reading and writing.

Reading uses positioned reads (`os.preadv`, or a seek and `readinto` on a file
of its own where the platform has no preadv, as on Windows) of exactly one
tensor's bytes, not a memory map of the whole file: mapped pages that were touched stay resident,
so a mapped reader's RSS grows with the model, which is what a streaming merge
must avoid. Writing streams: every output tensor's name, dtype and shape are
known from the plan before any data exists, so a shard's header is written
first and tensor bytes are appended as they are computed. The safetensors
Python API only writes whole in-memory dicts; the format itself (8-byte
little-endian header length, JSON header, packed data) is simple and is pinned
by a golden test against `safetensors.torch.save`.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from weightspace.buffers import read_buffer
from weightspace.errors import InputError, SpecError, WeightspaceError
from weightspace.inputs import open_input, open_input_fd, parse_json, short_repr

# safetensors dtype tag <-> torch dtype
DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "U16": torch.uint16,
    "U32": torch.uint32,
    "U64": torch.uint64,
}
TAGS: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}

# The order safetensors itself lays tensors out in: dtype (this rank, high first), then name.
_DTYPE_RANK = [
    "BOOL", "U8", "I8", "F8_E5M2", "F8_E4M3", "I16", "U16", "F16", "BF16",
    "I32", "U32", "F32", "F64", "I64", "U64",
]  # fmt: skip
# the largest header read (and written): the safetensors library's own limit
MAX_HEADER = 100_000_000


def dtype_tag(dtype: torch.dtype) -> str:
    try:
        return TAGS[dtype]
    except KeyError:
        raise WeightspaceError(f"dtype {dtype} cannot be stored in safetensors") from None


def nbytes_of(shape: Sequence[int], dtype: torch.dtype) -> int:
    return math.prod(shape) * torch.empty((), dtype=dtype).element_size()


@dataclass(frozen=True)
class Entry:
    """Where one tensor lives in a safetensors file."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    nbytes: int


def read_header(path: str | Path) -> tuple[dict[str, Entry], dict[str, str]]:
    """Parse and validate a safetensors header: entries by name, and `__metadata__`.

    Rejects a truncated file, a malformed header, unknown dtypes, offsets that
    overlap or leave the file, and sizes that disagree with shapes.
    """
    path = Path(path)
    try:
        with open_input(path) as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(8)
            if len(head) < 8:
                raise InputError(f"{path}: not a safetensors file (only {size} bytes)")
            (n,) = struct.unpack("<Q", head)
            # the length is the file's first 8 bytes: never shown, since for a file that is not
            # safetensors (a text file behind a symlink) they are its contents
            if n > MAX_HEADER:
                raise InputError(f"{path}: not a safetensors file (it does not start with the length "
                                 f"of a header of at most {MAX_HEADER:,} bytes)")
            if 8 + n > size:
                raise InputError(f"{path}: corrupt or truncated safetensors file (its header runs past "
                                 f"the end of the file, which has {size} bytes)")
            raw = f.read(n)
    except OSError as e:
        raise InputError(f"{path}: cannot read: {e.strerror or e}") from None
    header = parse_json(raw, path, "corrupt safetensors header")
    if not isinstance(header, dict):
        raise InputError(f"{path}: corrupt safetensors header (not a JSON object)")
    data_start = 8 + n
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict):
        raise InputError(f"{path}: corrupt safetensors header (__metadata__ is not an object)")
    entries: dict[str, Entry] = {}
    spans = []
    for name, info in header.items():
        try:
            tag, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
            # exact types: a string offset or shape would fail later as a bare TypeError
            if not (isinstance(tag, str) and isinstance(shape, list) and isinstance(offsets, list)
                    and len(offsets) == 2 and all(type(x) is int for x in (*shape, *offsets))):
                raise TypeError
        except (KeyError, TypeError):
            raise InputError(f"{path}: corrupt header entry for tensor {short_repr(name)}") from None
        shape, (b, e) = tuple(shape), offsets
        if tag not in DTYPES:
            raise InputError(f"{path}: tensor {short_repr(name)} has unsupported dtype {short_repr(tag, 16)}")
        dtype = DTYPES[tag]
        if any(s < 0 for s in shape) or b < 0 or e < b or e - b != nbytes_of(shape, dtype):
            raise InputError(
                f"{path}: tensor {short_repr(name)} offsets {b}..{e} do not match shape "
                f"{short_repr(list(shape), 60)[1:-1]} {tag}"
            )
        entries[name] = Entry(name, dtype, shape, data_start + b, e - b)
        spans.append((b, e))
    spans.sort()
    end = 0
    for b, e in spans:
        if b < end:
            raise InputError(f"{path}: corrupt safetensors file (tensor data overlaps)")
        end = e
    if data_start + end > size:
        raise InputError(
            f"{path}: truncated safetensors file: tensor data needs {data_start + end} bytes, "
            f"file has {size}"
        )
    return entries, {str(k): str(v) for k, v in meta.items()}


# os.preadv is POSIX; elsewhere each read opens the file itself and seeks (no shared position)
HAS_PREADV = hasattr(os, "preadv")


def read_tensor(path: str | Path, entry: Entry, fd: int | None = None) -> torch.Tensor:
    """Read one tensor's bytes with positioned reads into a fresh CPU tensor (`fd`: an open
    descriptor of `path` to read from, where the platform has positioned reads). Inside a
    `weightspace.buffers.buffer_pool` block the buffer may be one an earlier, dropped tensor used."""
    buf = read_buffer(entry.nbytes)
    if entry.nbytes:
        view = memoryview(buf.numpy()).cast("B")
        if HAS_PREADV:
            _pread_into(path, entry, view, fd)
        else:
            _seek_read_into(path, entry, view)
    if entry.dtype == torch.uint8:
        return buf.reshape(entry.shape)
    return buf.view(entry.dtype).reshape(entry.shape)


def _pread_into(path: str | Path, entry: Entry, view: memoryview, fd: int | None) -> None:
    own = fd is None
    if own:
        fd = open_input_fd(path)
    try:
        done = 0
        while done < entry.nbytes:
            got = os.preadv(fd, [view[done:]], entry.start + done)
            if got <= 0:
                raise InputError(f"{path}: unexpected end of file reading tensor {entry.name!r}")
            done += got
    finally:
        if own:
            os.close(fd)


def _seek_read_into(path: str | Path, entry: Entry, view: memoryview) -> None:
    """The same bytes without preadv: a file of this read's own, so threads never share a
    position; unbuffered, so no second copy of the tensor sits in a buffer."""
    with os.fdopen(open_input_fd(path), "rb", buffering=0) as f:
        f.seek(entry.start)
        done = 0
        while done < entry.nbytes:
            got = f.readinto(view[done:])
            if not got:
                raise InputError(f"{path}: unexpected end of file reading tensor {entry.name!r}")
            done += got


def layout_order(items: Iterable[tuple[str, torch.dtype]]) -> list[str]:
    """Names in the order safetensors lays them out (dtype rank desc, then name)."""
    return [
        name
        for name, dt in sorted(
            items, key=lambda it: (-_DTYPE_RANK.index(dtype_tag(it[1])), it[0])
        )
    ]


def build_header(
    specs: Sequence[tuple[str, torch.dtype, tuple[int, ...]]], metadata: dict[str, str] | None
) -> tuple[bytes, list[int]]:
    """Header bytes for tensors written in the given order, and each tensor's size."""
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    offset = 0
    sizes = []
    for name, dtype, shape in specs:
        nb = nbytes_of(shape, dtype)
        header[name] = {"dtype": dtype_tag(dtype), "shape": list(shape), "data_offsets": [offset, offset + nb]}
        offset += nb
        sizes.append(nb)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    if len(raw) > MAX_HEADER:
        _header_too_big(len(raw), specs, metadata or {})
    return struct.pack("<Q", len(raw)) + raw, sizes


def _header_too_big(size: int, specs: Sequence[tuple[str, torch.dtype, tuple[int, ...]]],
                    metadata: dict[str, str]) -> None:
    """Refuse a header no reader accepts (`read_header`, the safetensors library), before the
    file exists: every output must be readable by the tool that wrote it. Names what fills it."""
    limit = f"over the {MAX_HEADER:,} bytes safetensors readers accept"
    big = max(metadata, key=lambda k: len(str(metadata[k])), default=None)
    if big is not None and len(json.dumps(metadata)) * 2 > size:
        raise SpecError(f"the safetensors header would be {size:,} bytes, {limit}: its metadata "
                        f"{short_repr(big)} alone is {len(str(metadata[big])):,} characters (it records "
                        f"the recipe, whose text includes the spec's fields such as name:); shorten it")
    raise SpecError(f"the safetensors header would be {size:,} bytes, {limit}: {len(specs):,} tensors "
                    f"whose names and shapes do not fit in one shard; use a smaller shard size")


class ShardWriter:
    """Write one safetensors file whose tensors are declared up front.

    >>> w = ShardWriter(path, [("a", torch.float32, (2,))], {"format": "pt"})
    >>> w.write("a", torch.ones(2)); w.close()
    """

    def __init__(
        self,
        path: str | Path,
        specs: Sequence[tuple[str, torch.dtype, tuple[int, ...]]],
        metadata: dict[str, str] | None = None,
    ):
        self.path = Path(path)
        self.specs = list(specs)
        head, self._sizes = build_header(self.specs, metadata)
        self._next = 0
        self._rows = 0
        self._f = open(self.path, "wb")
        self._f.write(head)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Append a whole tensor, or the next block of its rows (dim 0) in order."""
        want_name, dtype, shape = self.specs[self._next]
        if name != want_name:
            raise WeightspaceError(f"internal: expected tensor {want_name!r} next, got {name!r}")
        whole = tuple(tensor.shape) == tuple(shape)
        block = (len(shape) > 0 and tuple(tensor.shape[1:]) == tuple(shape[1:])
                 and self._rows + tensor.shape[0] <= shape[0])
        if tensor.dtype != dtype or not (whole and self._rows == 0 or block):
            raise WeightspaceError(
                f"internal: tensor {name!r} is {tensor.dtype} {list(tensor.shape)}, "
                f"declared {dtype} {list(shape)} ({self._rows} rows written)"
            )
        t = tensor.detach().to("cpu").contiguous().reshape(-1)
        if t.numel():
            self._f.write(memoryview(t.view(torch.uint8).numpy()))
        self._rows += tensor.shape[0] if len(shape) else 1
        if not len(shape) or self._rows == shape[0]:
            self._next += 1
            self._rows = 0

    @property
    def tensor_done(self) -> bool:
        """True between tensors (no row block of a tensor is pending)."""
        return self._rows == 0

    @property
    def done(self) -> bool:
        return self._next == len(self.specs)

    def close(self) -> None:
        if not self._f.closed:
            if not self.done:
                self._f.close()
                raise WeightspaceError(
                    f"internal: {self.path.name} closed after {self._next} of {len(self.specs)} tensors"
                )
            self._f.flush()
            os.fsync(self._f.fileno())
            self._f.close()

    def abort(self) -> None:
        if not self._f.closed:
            self._f.close()
