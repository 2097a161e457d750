"""Small file helpers shared by every format this project writes or caches.

    with atomic_file("coeffs.safetensors") as tmp:     # write tmp; it replaces the target only on success
        save_file(tensors, tmp)
    save_safetensors_atomic(tensors, "a.fisher.safetensors", {"format": "pt"})
    atomic_dir(out, overwrite, lambda tmp: ..., inputs=[model_dir])   # a temporary sibling, then rename
    check_output(out, overwrite, inputs=[spec, *models])   # OUT is none of its inputs, holds none, is in none
    norms = FileCache();  norms.get(path, compute, what="Fisher file")   # once per file and process
    config = read_json_object(d / "config.json")       # a JSON object, or an InputError naming the file
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import secrets
import shutil
import socket
import threading
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from weightspace.errors import InputError, SpecError, WeightspaceError
from weightspace.inputs import parse_json, read_input_bytes
from weightspace.paths import expand_user


def read_json_object(path: Path) -> dict[str, Any]:
    """The JSON object in `path`; an InputError naming the file when it is not a regular file, is
    unreadable, is not JSON (a key twice and deep nesting included, see inputs.parse_json) or
    is not an object."""
    data = parse_json(read_input_bytes(path), path)
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
    is fsynced and replaces `path` (os.replace); when it fails it is removed. Stale temporary
    files of `path` left by a killed process are removed first (see `clean_stale`); commands
    check their output against their inputs before the work (`check_output_file`)."""
    path = Path(path)
    if path.is_dir():
        raise SpecError(f"output {path} is a directory; give a file name")
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(path)
    tmp = temp_sibling(path, suffix=".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())          # created 0600 until complete
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def save_safetensors_atomic(tensors: Mapping[str, torch.Tensor], path: str | Path,
                            metadata: Mapping[str, str] | None = None) -> Path:
    """`safetensors.torch.save_file`, atomically (see `atomic_file`); tensors made contiguous on CPU."""
    from safetensors.torch import save_file

    with atomic_file(path) as tmp:
        save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(tmp),
                  metadata=dict(metadata) if metadata is not None else None)
    return Path(path)


def atomic_dir(out: str | Path, overwrite: bool, write: Callable[[Path], None], *,
               inputs: Iterable[str | Path]) -> Path:
    """Fill a temporary sibling of `out` with `write(tmp)` and rename it into place; an existing
    `out` (only with `overwrite`) is replaced at the end, and nothing is left on failure. `out`
    may not be, hold or lie inside any of `inputs` (see `check_output`)."""
    out = Path(out)
    check_output(out, overwrite, inputs=inputs)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(out)
    tmp.mkdir()
    try:
        write(tmp)
        replace_dir(tmp, out, overwrite=overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def replace_dir(tmp: Path, out: Path, *, overwrite: bool) -> None:
    """Rename the finished directory `tmp` to `out`; an existing `out` (only with `overwrite`) is
    moved aside first and removed after, or put back if the rename fails."""
    old = None
    if out.exists() or out.is_symlink():
        if not overwrite:
            raise WeightspaceError(f"{out} appeared while writing; not replacing it")
        old = temp_sibling(out, kind="old")
        os.replace(out, old)
    try:
        os.replace(tmp, out)
    except BaseException:
        if old is not None:  # put the good output back where it was
            os.replace(old, out)
        raise
    if old is not None:
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink()
    fsync_dir(out.parent)


def append_line(path: str | Path, line: bytes) -> None:
    """Append one log line whole (looping over short writes) and fsync it: a line is a log's
    unit, so a kill leaves at most a torn last line, which the reader skips."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        view = memoryview(line)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(d: Path) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ---------------------------------------------------------------- outputs and their inputs


def check_output(out: str | Path, overwrite: bool, *, inputs: Iterable[str | Path]) -> None:
    """Before anything is written to the directory `out`: it is none of `inputs`, holds none
    and lies in none (`check_disjoint`); an existing `out` needs `overwrite` and must be a
    directory; stale temporary directories of `out` left by killed runs are removed."""
    out = Path(out)
    check_disjoint(out, inputs)
    clean_stale(out)
    if (out.exists() or out.is_symlink()) and not overwrite:
        raise SpecError(f"output {out} already exists; pass --overwrite to replace it")
    if out.exists() and not out.is_dir():
        raise SpecError(f"output {out} exists and is not a directory")


def check_output_file(out: str | Path, overwrite: bool, *, inputs: Iterable[str | Path]) -> None:
    """`check_output` for a single output file (a Fisher, Gram, coefficient or signature file)."""
    out = Path(out)
    check_disjoint(out, inputs)
    clean_stale(out)
    if out.is_dir():
        raise SpecError(f"output {out} is a directory; give a file name")
    if (out.exists() or out.is_symlink()) and not overwrite:
        raise SpecError(f"output {out} already exists; pass --overwrite to replace it")


def _real(p: str | Path) -> Path:
    try:
        return Path(p).expanduser().resolve()
    except (OSError, RuntimeError):  # a symlink loop, or a `~user` that does not exist
        return Path(os.path.abspath(p))


def check_disjoint(out: str | Path, inputs: Iterable[str | Path]) -> None:
    """Refuse an output path that equals an input, contains one (replacing OUT would delete it)
    or lies inside an input directory (writing would change it), naming both. Paths are compared
    after resolving symlinks, so a link to an input is that input."""
    o = _real(out)
    # a Hub id, or a path with nothing there, cannot be harmed
    real = [(g, _real(g)) for g in inputs if g is not None and os.path.lexists(os.path.expanduser(g))]
    for given, i in real:  # the plainest reason first: OUT is an input
        same = o == i
        if not same and o.exists() and i.exists():
            with contextlib.suppress(OSError):
                same = os.path.samefile(o, i)
        if same:
            raise SpecError(f"output {out} is the input {given}: an output never replaces an input; "
                            f"choose another output")
    for given, i in real:
        if o in i.parents:
            raise SpecError(f"output {out} contains the input {given}: replacing it would delete "
                            f"that input; choose another output")
        if i in o.parents:
            raise SpecError(f"output {out} lies inside the input {given}: writing there would change "
                            f"that input; choose an output outside it")


# ---------------------------------------------------------------- temporary siblings

_HOST = hashlib.sha1(socket.gethostname().encode()).hexdigest()[:6]
_MAX_STEM = 160  # a temp name stays far below the usual 255-byte limit on a file name


def _stem(path: Path) -> str:
    """The output's name as temp names carry it: whole when short, else cut with a digest."""
    name = path.name
    if len(name.encode()) <= _MAX_STEM:
        return name
    cut = name.encode()[:100].decode(errors="ignore")
    return f"{cut}~{hashlib.sha1(name.encode()).hexdigest()[:12]}"


_TEMP_RE = re.compile(r"^\.(?P<stem>.+)\.wsmerge-(?:(?P<kind>old|stages|search)-)?(?P<host>[0-9a-f]{6})-"
                      r"(?P<pid>\d+)-(?P<start>\d+)-[0-9a-f]{8}(?:\.tmp)?$")


def _start_time(pid: int) -> int:
    """The process's start time in clock ticks since boot (Linux), 0 where unknown: with the
    pid it tells a live owner from a later process that reuses the pid."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        return int(stat[stat.rindex(b")") + 2:].split()[19])
    except (OSError, ValueError, IndexError):
        return 0


def temp_sibling(path: Path, *, kind: str = "", suffix: str = "") -> Path:
    """A hidden name beside `path` for work in progress: `.NAME.wsmerge-[KIND-]HOST-PID-START-TOKEN`,
    recording which process owns it, so that a later run can remove what a killed one left."""
    k = f"{kind}-" if kind else ""
    pid = os.getpid()  # read here, not at import: a forked worker is a process of its own
    return path.parent / (f".{_stem(path)}.wsmerge-{k}{_HOST}-{pid}-{_start_time(pid)}-"
                          f"{secrets.token_hex(4)}{suffix}")


def _alive(pid: int, start: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return start == 0 or _start_time(pid) in (0, start)


def _stale(directory: Path) -> Iterator[tuple[Path, re.Match]]:
    """Temporary entries in `directory` whose owner (recorded in the name) was a process on this
    host that is no longer running."""
    try:
        entries = list(directory.iterdir())
    except OSError:
        return
    for p in entries:
        m = _TEMP_RE.match(p.name)
        if m and m["host"] == _HOST and not _alive(int(m["pid"]), int(m["start"])):
            yield p, m


def _remove(p: Path) -> bool:
    try:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()
    except OSError:
        return False
    return True


def clean_stale(path: Path) -> list[Path]:
    """Remove temporary siblings of `path` whose owner (recorded in the name) was a process on
    this host that is no longer running: what `kill -9`, a power cut or a lost terminal left.
    A previous output moved aside (`-old-`) is put back when `path` itself is missing, since it
    is the last good result. Returns what was removed or restored."""
    path = Path(path)
    stem, done = _stem(path), []
    for p, m in _stale(path.parent):
        if m["stem"] != stem:
            continue
        if m["kind"] == "old" and not (path.exists() or path.is_symlink()):
            try:
                os.replace(p, path)
            except OSError:
                continue
            warnings.warn(f"restored {path} from {p.name}, which an interrupted run had moved aside",
                          stacklevel=2)
        elif not _remove(p):
            continue
        done.append(p)
    return done


def clean_stale_in(directory: Path) -> list[Path]:
    """`clean_stale` for every output in `directory` at once (a zoo's model folders), except
    outputs moved aside (`-old-`), which only `clean_stale` of their own path may put back."""
    return [p for p, m in _stale(Path(directory)) if m["kind"] != "old" and _remove(p)]


class FileCache:
    """Values computed from a file once per process, keyed by its resolved path, size and mtime
    (so an edited file is read again)."""

    def __init__(self) -> None:
        self._values: dict[tuple[str, int, int], Any] = {}
        self._lock = threading.Lock()

    def get(self, path: str | Path, compute: Callable[[Path], Any], *, what: str = "file") -> Any:
        p = expand_user(path)
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
