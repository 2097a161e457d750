"""Small file helpers shared by every format this project writes or caches.

    with atomic_file("coeffs.safetensors") as tmp:     # write tmp; it replaces the target only on success
        save_file(tensors, tmp)
    save_safetensors_atomic(tensors, "a.fisher.safetensors", {"format": "pt"})
    atomic_dir(out, overwrite, lambda tmp: ...)        # fill a temporary sibling directory, then rename
    norms = FileCache();  norms.get(path, compute, what="Fisher file")   # once per file and process
    config = read_json_object(d / "config.json")       # a JSON object, or an InputError naming the file
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from weightspace.errors import InputError


def read_json_object(path: Path) -> dict[str, Any]:
    """The JSON object in `path`; an InputError naming the file when it is unreadable or not an object."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, OSError) as e:
        raise InputError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected a JSON object")
    return data


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; when the block succeeds it gets the usual file mode,
    is fsynced and replaces `path` (os.replace); when it fails it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())          # mkstemp makes 0600
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_safetensors_atomic(tensors: Mapping[str, torch.Tensor], path: str | Path,
                            metadata: Mapping[str, str] | None = None) -> Path:
    """`safetensors.torch.save_file`, atomically (see `atomic_file`); tensors made contiguous on CPU."""
    from safetensors.torch import save_file

    with atomic_file(path) as tmp:
        save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(tmp),
                  metadata=dict(metadata) if metadata is not None else None)
    return Path(path)


def atomic_dir(out: str | Path, overwrite: bool, write: Callable[[Path], None]) -> Path:
    """Fill a temporary sibling of `out` with `write(tmp)` and rename it into place; an existing
    `out` (only with `overwrite`) is replaced at the end, and nothing is left on failure."""
    from weightspace.sink import check_output

    out = Path(out)
    check_output(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.wsmerge-{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        write(tmp)
        old = None
        if out.exists():
            old = out.parent / f".{out.name}.wsmerge-old-{secrets.token_hex(4)}"
            os.replace(out, old)
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


class FileCache:
    """Values computed from a file once per process, keyed by its resolved path, size and mtime
    (so an edited file is read again)."""

    def __init__(self) -> None:
        self._values: dict[tuple[str, int, int], Any] = {}
        self._lock = threading.Lock()

    def get(self, path: str | Path, compute: Callable[[Path], Any], *, what: str = "file") -> Any:
        p = Path(path).expanduser()
        try:
            st = p.stat()
        except OSError:
            raise InputError(f"{path}: no such {what}") from None
        key = (str(p.resolve()), st.st_size, st.st_mtime_ns)
        with self._lock:
            value = self._values.get(key)
        if value is None:
            value = compute(p)
            with self._lock:
                self._values[key] = value
        return value
