"""Reading input files safely: every file of an input model goes through here.

    fd = open_input_fd(path)                  # a regular file (never a FIFO, device or directory)
    with open_input(path) as f: ...           # the same, as a binary file object
    data = parse_json(raw, path)              # duplicate keys and deep nesting refused, naming the file
    src = carried_file(model_dir / "tokenizer.json")    # a file an output may copy: inside its directory
    copy_input_file(src, out_tmp / "tokenizer.json")

Inputs are untrusted. A FIFO or device named `model.safetensors` would block a
reader forever, so only regular files are opened (symlinks followed: a big
weight file symlinked from elsewhere is read as usual). A file *copied* into an
output is different: a symlinked `tokenizer.json` must not carry a file from
outside the model directory into OUT (and from there to the Hub). The one
symlink layout accepted is the Hugging Face cache's own, exactly
`.../models--ORG--NAME/snapshots/REV/FILE` pointing at a blob in the same
repo folder's `blobs/` (huggingface_hub's file_download.py).
"""

from __future__ import annotations

import json
import os
import shutil
import stat
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import IO, Any

from weightspace.errors import InputError

_OPEN_FLAGS = os.O_RDONLY | getattr(os, "O_BINARY", 0) | getattr(os, "O_NONBLOCK", 0)


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a named pipe (FIFO)"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "not a regular file"


def check_regular(path: str | Path) -> os.stat_result:
    """stat `path` (following symlinks); an InputError naming it unless it is a regular file."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise InputError(f"{path}: no such file" + (" (a broken symlink)" if os.path.islink(path) else "")) \
            from None
    except OSError as e:
        raise InputError(f"{path}: cannot read: {e.strerror or e}") from None
    if not stat.S_ISREG(st.st_mode):
        raise InputError(f"{path}: {_kind(st.st_mode)}, not a regular file; refusing to read it")
    return st


def open_input_fd(path: str | Path) -> int:
    """An O_RDONLY descriptor of the regular file `path`. Checked before opening (so a FIFO is
    never opened) and again on the descriptor (a file swapped in between is refused too);
    O_NONBLOCK is a second guard, and changes nothing for a regular file."""
    check_regular(path)
    try:
        fd = os.open(path, _OPEN_FLAGS)
    except OSError as e:
        raise InputError(f"{path}: cannot read: {e.strerror or e}") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise InputError(f"{path}: {_kind(st.st_mode)}, not a regular file; refusing to read it")
    return fd


def open_input(path: str | Path) -> IO[bytes]:
    """`open(path, "rb")` for an input file, through `open_input_fd`."""
    return os.fdopen(open_input_fd(path), "rb")


def read_input_bytes(path: str | Path) -> bytes:
    try:
        with open_input(path) as f:
            return f.read()
    except OSError as e:
        raise InputError(f"{path}: cannot read: {e.strerror or e}") from None


# ---------------------------------------------------------------- JSON


class _Duplicate(ValueError):
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise _Duplicate(k)
        out[k] = v
    return out


def short_repr(text: object, limit: int = 200) -> str:
    """repr of a name read from a file, cut to `limit` characters: an error names it, it does
    not reproduce a hostile file's megabytes."""
    text = str(text)
    return repr(text if len(text) <= limit else text[: limit - 3] + "...")


def parse_json(raw: bytes | str, where: str | Path, bad: str = "not valid JSON") -> Any:
    """Parse untrusted JSON; `bad` begins the error (after `where`, the file). A key given twice
    (readers disagree on which one wins) and nesting deep enough to exhaust the parser are
    refused; the message quotes no more of the text than such a key, and says where parsing
    stopped."""
    try:
        text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
    except UnicodeDecodeError as e:
        raise InputError(f"{where}: {bad} (not UTF-8 text at byte {e.start})") from None
    try:
        return json.loads(text, object_pairs_hook=_no_duplicates)
    except _Duplicate as e:
        raise InputError(f"{where}: {bad} (key {short_repr(e.args[0])} appears twice)") from None
    except RecursionError:
        raise InputError(f"{where}: {bad} (nested too deeply)") from None
    except json.JSONDecodeError as e:
        raise InputError(f"{where}: {bad} ({e.msg} at line {e.lineno} column {e.colno})") from None
    except ValueError:  # a number too long to convert, ...
        raise InputError(f"{where}: {bad}") from None


# ---------------------------------------------------------------- files copied into outputs


def _hf_blob_link(root: Path, path: Path, target: Path) -> bool:
    """True for the Hugging Face cache's own link: `root` (resolved) is, or is inside, a
    `models--ORG--NAME/snapshots/REV` directory, `path` is a symlink in it, and its target is a
    file directly in that repo folder's `blobs/`."""
    parts = root.parts
    for i in range(len(parts) - 2):
        if parts[i].startswith("models--") and parts[i + 1] == "snapshots":
            repo = Path(*parts[: i + 1])
            return path.is_symlink() and target.parent == repo / "blobs"
    return False


def carried_file(path: str | Path, root: str | Path | None = None) -> Path:
    """`path`, checked as a file an output may copy from the input directory `root` (default:
    its parent): a regular file whose real location is inside `root`, or a Hugging Face cache
    blob link (see `_hf_blob_link`). Anything else is an InputError naming the file; what it
    points at is never read or shown."""
    path = Path(path)
    root = Path(root) if root is not None else path.parent
    check_regular(path)
    real_root, target = root.resolve(), path.resolve()
    try:
        lexical = real_root / path.relative_to(root)  # where the name sits, in the real directory
    except ValueError:
        lexical = None
    if lexical is not None and (target.is_relative_to(real_root) or _hf_blob_link(real_root, lexical, target)):
        return path
    raise InputError(f"{path}: resolves outside the model directory {root} (a symlink); refusing to copy "
                     f"it into the output. Copy the file into {root} if it belongs to this model")


def check_carried(files: Mapping[str, Path] | Iterable[Path]) -> None:
    """`carried_file` for every file an output will copy (a name -> path mapping or paths)."""
    for p in (files.values() if isinstance(files, Mapping) else files):
        carried_file(p)


def copy_input_file(src: str | Path, dst: str | Path, root: str | Path | None = None) -> None:
    """Copy an input's file into an output: `carried_file(src, root)`, then its bytes, read
    through `open_input_fd` (so a file swapped for a FIFO after the check is refused too)."""
    src = carried_file(src, root)
    try:
        with open_input(src) as f, open(dst, "wb") as g:
            shutil.copyfileobj(f, g)
    except OSError as e:
        raise InputError(f"{src}: cannot copy: {e.strerror or e}") from None
