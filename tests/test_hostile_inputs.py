"""Hostile input files (issue 17): every fixture is built here, nothing is downloaded.

Sections, one per class: files carried into outputs must come from inside their model directory
(the Hugging Face cache's blob links excepted); messages never echo a file's contents; only
regular files are opened (a FIFO is refused, never waited on); corrupt indexes, headers and zips
are refused and the writer never writes a header its reader refuses; deep JSON and pickles get
our one-line message, without torch's advice or warnings."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import struct
import threading
import warnings
import zipfile
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from _error_helpers import (
    assert_nothing_written,
    linear_spec,
    out_fixture,  # noqa: F401  (the out fixture)
    single_error_line,
    write_sharded,
)
from safetensors.torch import load_file

from weightspace import safetensors_io
from weightspace.errors import InputError, SpecError
from weightspace.files import read_json_object
from weightspace.safetensors_io import build_header, read_header
from weightspace.sources import load_space

SECRET = "TOP-SECRET do not publish 0123456789\n"


@pytest.fixture
def secret(tmp_path: Path) -> Path:
    """A file outside every model directory that must never reach an output."""
    p = tmp_path / "private" / "secret.txt"
    p.parent.mkdir()
    p.write_text(SECRET)
    return p


def _no_secret(out: Path) -> None:
    for f in out.rglob("*") if out.exists() else ():
        if f.is_file():
            assert SECRET.encode() not in f.read_bytes(), f"{f} carries the outside file"


# ---------------------------------------------------------------- 2. symlinks carrying foreign files


@pytest.mark.parametrize("name", ["tokenizer.json", "generation_config.json"])
def test_carried_file_symlinked_outside_is_refused(tiny_models, run_cli, write_spec, out, secret, name):
    link = tiny_models.ft_a / name
    link.symlink_to(secret)
    spec = write_spec(linear_spec(tiny_models.ft_a, tiny_models.ft_b))
    code, _, err = run_cli("run", spec, out)
    assert code == 1
    single_error_line(err)
    assert f"{link}: resolves outside the model directory" in err
    assert SECRET.strip() not in err and str(secret) not in err  # neither its contents nor its target
    assert_nothing_written(out)


def test_carried_file_symlinked_inside_is_copied(tiny_models, run_cli, write_spec, out):
    (tiny_models.ft_a / "shared").mkdir()
    (tiny_models.ft_a / "shared" / "tok.json").write_text('{"x": 1}')
    (tiny_models.ft_a / "tokenizer.json").symlink_to(Path("shared", "tok.json"))
    spec = write_spec(linear_spec(tiny_models.ft_a, tiny_models.ft_b))
    code, _, err = run_cli("run", spec, out)
    assert code == 0, err
    assert (out / "tokenizer.json").read_text() == '{"x": 1}'
    assert not (out / "tokenizer.json").is_symlink()


def test_learngene_fit_and_expand_refuse_outside_files(tiny_models, run_cli, secret, tmp_path):
    (tiny_models.ft_a / "tokenizer.json").symlink_to(secret)
    gene = tmp_path / "a.gene"
    code, _, err = run_cli("learngene", "fit", tiny_models.ft_a, "-o", gene)
    assert code == 1
    single_error_line(err)
    assert "tokenizer.json: resolves outside the model directory" in err
    assert_nothing_written(gene)

    # a clean gene, expanded with --tokenizer-from a directory whose tokenizer leaves it
    assert run_cli("learngene", "fit", tiny_models.ft_b, "-o", gene)[0] == 0
    x = tmp_path / "x3"
    code, _, err = run_cli("learngene", "expand", gene, "--depth", "3", "-o", x,
                           "--tokenizer-from", tiny_models.ft_a)
    assert code == 1
    single_error_line(err)
    assert "resolves outside the model directory" in err
    assert_nothing_written(x)

    # a gene directory (as received from someone) whose tokenizer.json links outside it
    (gene / "tokenizer.json").symlink_to(secret)
    code, _, err = run_cli("learngene", "expand", gene, "--depth", "3", "-o", x)
    assert code == 1
    assert f"{gene / 'tokenizer.json'}: resolves outside the model directory" in err
    assert_nothing_written(x)
    _no_secret(x)


def _hf_cache(root: Path, repo: str, model: Path, blobs_repo: str | None = None) -> Path:
    """`model`'s files laid out as huggingface_hub's cache does: the snapshot's files are
    relative links to `models--ORG--NAME/blobs/<hash>` (of `blobs_repo` when given)."""
    folder = root / f"models--{repo.replace('/', '--')}"
    blob_folder = root / f"models--{(blobs_repo or repo).replace('/', '--')}" / "blobs"
    snap = folder / "snapshots" / "0123abcd"
    snap.mkdir(parents=True)
    blob_folder.mkdir(parents=True, exist_ok=True)
    for i, f in enumerate(sorted(model.iterdir())):
        blob = blob_folder / f"{i:02d}{repo.replace('/', '')}deadbeef"
        shutil.copy(f, blob)
        (snap / f.name).symlink_to(os.path.relpath(blob, snap))
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text("0123abcd")
    return snap


def test_hugging_face_cache_blob_links_are_carried(tiny_models, run_cli, write_spec, out, tmp_path):
    (tiny_models.ft_a / "tokenizer.json").write_text('{"hub": true}')
    snap = _hf_cache(tmp_path / "hub", "org/tiny", tiny_models.ft_a)
    spec = write_spec(linear_spec(snap, tiny_models.ft_b))
    code, _, err = run_cli("run", spec, out)
    assert code == 0, err
    assert (out / "tokenizer.json").read_text() == '{"hub": true}'


def test_cache_link_into_another_repos_blobs_is_refused(tiny_models, run_cli, write_spec, out, tmp_path):
    (tiny_models.ft_a / "tokenizer.json").write_text('{"other": true}')
    snap = _hf_cache(tmp_path / "hub", "org/tiny", tiny_models.ft_a, blobs_repo="evil/other")
    spec = write_spec(linear_spec(snap, tiny_models.ft_b))
    code, _, err = run_cli("run", spec, out)
    assert code == 1
    single_error_line(err)
    assert f"{snap / 'tokenizer.json'}: resolves outside the model directory" in err
    assert_nothing_written(out)


def test_cache_layout_link_outside_blobs_is_refused(tiny_models, run_cli, write_spec, out, tmp_path, secret):
    snap = _hf_cache(tmp_path / "hub", "org/tiny", tiny_models.ft_a)
    (snap / "tokenizer.json").symlink_to(secret)
    spec = write_spec(linear_spec(snap, tiny_models.ft_b))
    code, _, err = run_cli("run", spec, out)
    assert code == 1
    assert "tokenizer.json: resolves outside the model directory" in err
    assert_nothing_written(out)


def test_weight_files_symlinked_from_elsewhere_still_load(tiny_models, tmp_path):
    """Reading is not copying: a big weight file symlinked from another disk is fine."""
    big = tmp_path / "disk2" / "weights.safetensors"
    big.parent.mkdir()
    shutil.move(tiny_models.ft_a / "model.safetensors", big)
    (tiny_models.ft_a / "model.safetensors").symlink_to(big)
    assert set(load_space(tiny_models.ft_a)) == set(load_file(big))


# ---------------------------------------------------------------- 3. messages never echo contents


TEXT = b"hello world, this is a text file and not weights\n" * 3


def test_safetensors_symlinked_to_a_text_file(tiny_models, run_cli, write_spec, out, tmp_path):
    text = tmp_path / "notes.txt"
    text.write_bytes(TEXT)
    f = tiny_models.ft_b / "model.safetensors"
    f.unlink()
    f.symlink_to(text)
    spec = write_spec(linear_spec(tiny_models.ft_a, tiny_models.ft_b))
    code, _, err = run_cli("run", spec, out)
    assert code == 1
    single_error_line(err)
    assert f"{f}: not a safetensors file" in err
    (claimed,) = struct.unpack("<Q", TEXT[:8])
    assert str(claimed) not in err and f"{claimed:,}" not in err
    assert "hello" not in err
    assert_nothing_written(out)


def test_truncated_header_does_not_show_its_claimed_length(tmp_path):
    f = tmp_path / "t.safetensors"
    f.write_bytes(struct.pack("<Q", 4242) + b"{" + b" " * 10)
    with pytest.raises(InputError, match="runs past the end of the file") as e:
        read_header(f)
    assert "4242" not in str(e.value) and "4,242" not in str(e.value)


def test_bin_that_is_a_text_file_is_not_quoted(tmp_path):
    d = tmp_path / "m"
    d.mkdir()
    (d / "pytorch_model.bin").write_bytes(TEXT)
    with pytest.raises(InputError) as e:
        load_space(d)
    msg = str(e.value)
    assert msg.startswith(f"{d / 'pytorch_model.bin'}: not a PyTorch checkpoint")
    assert "'h'" not in msg and "hello" not in msg


def test_json_errors_quote_no_text(tmp_path):
    cfg = tmp_path / "config.json"
    cfg.write_text('{"api_key": "sk-live-123", oops}')
    with pytest.raises(InputError) as e:
        read_json_object(cfg)
    assert str(e.value).startswith(f"{cfg}: not valid JSON (")
    assert "sk-live" not in str(e.value)


def test_a_huge_tensor_name_is_cut_in_messages(tmp_path):
    name = "w" * 100_000
    header = json.dumps({name: {"dtype": "F99", "shape": [1], "data_offsets": [0, 4]}}).encode()
    header += b" " * (-len(header) % 8)
    f = tmp_path / "n.safetensors"
    f.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 4)
    with pytest.raises(InputError, match="unsupported dtype") as e:
        read_header(f)
    assert len(str(e.value)) < 600


# ---------------------------------------------------------------- 4. only regular files are opened


@contextmanager
def _fifo(path: Path):
    """A FIFO at `path` and a guard that unblocks (and reports) any reader waiting on it, so a
    regression fails the test instead of hanging it."""
    if path.exists() or path.is_symlink():
        path.unlink()
    os.mkfifo(path)
    waited: list[bool] = []
    stop = threading.Event()

    def unblock():
        while not stop.is_set():
            try:
                fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)  # succeeds only while a reader waits
            except OSError:
                stop.wait(0.02)
                continue
            os.close(fd)
            if not waited:
                waited.append(True)

    t = threading.Thread(target=unblock, daemon=True)
    t.start()
    try:
        yield waited
    finally:
        stop.set()
        t.join()


needs_fifo = pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this platform")


@needs_fifo
@pytest.mark.parametrize("name", ["model.safetensors", "config.json"])
def test_fifo_in_a_model_directory_is_refused(tiny_models, run_cli, write_spec, out, name):
    f = tiny_models.ft_b / name
    spec = write_spec(linear_spec(tiny_models.ft_a, tiny_models.ft_b))
    with _fifo(f) as waited:
        code, _, err = run_cli("run", spec, out)
    assert not waited, "a reader opened the FIFO and waited on it"
    assert code == 1
    single_error_line(err)
    assert f"{f}: a named pipe (FIFO), not a regular file" in err
    assert_nothing_written(out)


@needs_fifo
@pytest.mark.parametrize("what", ["shard", "index", "bin", "tokenizer"])
def test_fifo_anywhere_an_input_is_read_is_refused(tiny_models, run_cli, write_spec, out, tmp_path, what):
    d = tmp_path / "m"
    if what in ("shard", "index"):
        shards = write_sharded(tiny_models.ft_b, d)
        f = d / (shards[1] if what == "shard" else "model.safetensors.index.json")
    elif what == "bin":
        d.mkdir()
        shutil.copy(tiny_models.ft_b / "config.json", d / "config.json")
        f = d / "pytorch_model.bin"
    else:
        shutil.copytree(tiny_models.ft_b, d)
        f = d / "tokenizer.json"
    spec = write_spec(linear_spec(d, tiny_models.ft_a))
    with _fifo(f) as waited:
        code, _, err = run_cli("run", spec, out)
    assert not waited
    assert code == 1, err
    assert f"{f}: a named pipe (FIFO), not a regular file" in err
    assert_nothing_written(out)


@needs_fifo
def test_fifo_companion_and_inspect(tiny_models, run_cli, tmp_path):
    fisher = tmp_path / "a.fisher.safetensors"
    with _fifo(fisher) as waited:
        with pytest.raises(InputError, match="a named pipe"):
            read_header(fisher)
        code, _, err = run_cli("inspect", fisher)
    assert not waited
    assert code == 1 and "a named pipe (FIFO)" in err


# ---------------------------------------------------------------- 7. corrupt indexes, headers, zips; written headers


def test_index_with_an_empty_weight_map_is_refused(tiny_models, run_cli, tmp_path):
    d = tmp_path / "empty"
    d.mkdir()
    (d / "model.safetensors.index.json").write_text('{"metadata": {}, "weight_map": {}}')
    code, _, err = run_cli("inspect", d)
    assert code == 1
    single_error_line(err)
    assert f"{d / 'model.safetensors.index.json'}: corrupt index: its 'weight_map' lists no tensors" in err


def _raw_safetensors(path: Path, header_text: str, data: bytes) -> Path:
    raw = header_text.encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def test_duplicate_key_in_a_safetensors_header(tmp_path):
    f = _raw_safetensors(tmp_path / "dup.safetensors",
                         '{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},'
                         '"w":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}', struct.pack("<ff", 1, 2))
    with pytest.raises(InputError) as e:
        load_space(f)
    assert str(e.value) == f"{f}: corrupt safetensors header (key 'w' appears twice)"


def test_duplicate_keys_in_index_and_config(tiny_models, run_cli, write_spec, out, tmp_path):
    d = tmp_path / "sharded"
    write_sharded(tiny_models.ft_b, d)
    index = d / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    name, shard = next(iter(data["weight_map"].items()))
    index.write_text(index.read_text().replace('"weight_map": {', f'"weight_map": {{"{name}": "{shard}", ', 1))
    spec = write_spec(linear_spec(tiny_models.ft_a, d))
    code, _, err = run_cli("run", spec, out)
    assert code == 1
    assert f"{index}: not valid JSON (key {name!r} appears twice)" in err
    assert_nothing_written(out)

    cfg = tiny_models.ft_b / "config.json"
    cfg.write_text(cfg.read_text().replace("{", '{"num_hidden_layers": 99, ', 1))
    with pytest.raises(InputError, match=r"config.json: not valid JSON \(key 'num_hidden_layers' appears twice\)"):
        load_space(tiny_models.ft_b)


def _flip_tensor_byte(path: Path) -> str:
    """Flip one byte of a tensor's stored data in a torch.save zip; the member's name."""
    b = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as z:
        info = next(i for i in z.infolist() if "/data/" in i.filename and i.file_size)
    h = info.header_offset
    n_name, n_extra = struct.unpack("<HH", bytes(b[h + 26:h + 30]))  # the local header's, not the directory's
    b[h + 30 + n_name + n_extra] ^= 0xFF
    path.write_bytes(bytes(b))
    return info.filename


def test_crc_corrupt_bin_is_refused(tiny_models, run_cli, write_spec, out, tmp_path):
    d = tmp_path / "crc"
    d.mkdir()
    torch.save(load_file(tiny_models.ft_b / "model.safetensors"), d / "pytorch_model.bin")
    member = _flip_tensor_byte(d / "pytorch_model.bin")
    spec = write_spec(linear_spec(tiny_models.ft_a, d))
    code, _, err = run_cli("run", spec, out)
    assert code == 1
    single_error_line(err)
    assert f"{d / 'pytorch_model.bin'}: corrupt PyTorch checkpoint: member {member!r} fails its CRC check" in err
    assert_nothing_written(out)


def test_written_headers_stay_within_the_readers_limit(tiny_models, run_cli, write_spec, out, monkeypatch):
    """A 120 MB `name:` once wrote an output `wsmerge inspect` refused; the limit is lowered here
    so the test stays small."""
    monkeypatch.setattr(safetensors_io, "MAX_HEADER", 20_000)
    name = "n" * 30_000
    spec = write_spec(f"name: {name}\n" + linear_spec(tiny_models.ft_a, tiny_models.ft_b))
    code, _, err = run_cli("run", spec, out)
    assert code == 2
    single_error_line(err)
    assert "over the 20,000 bytes safetensors readers accept" in err
    assert "'weightspace_spec'" in err and name not in err
    assert_nothing_written(out)

    spec = write_spec(linear_spec(tiny_models.ft_a, tiny_models.ft_b), name="ok.yaml")
    assert run_cli("run", spec, out)[0] == 0
    read_header(out / "model.safetensors")  # what it writes, it reads


def test_build_header_refuses_what_read_header_would(monkeypatch):
    monkeypatch.setattr(safetensors_io, "MAX_HEADER", 1000)
    specs = [(f"t{i}" * 20, torch.float32, (1,)) for i in range(40)]
    with pytest.raises(SpecError, match="40 tensors"):
        build_header(specs, {"format": "pt"})


# ---------------------------------------------------------------- 12. deep JSON, pickles


DEEP = "[" * 100_000 + "]" * 100_000


@pytest.mark.parametrize("where", ["header", "index", "config"])
def test_deeply_nested_json_is_refused(tiny_models, run_cli, tmp_path, where):
    if where == "header":
        target = _raw_safetensors(tmp_path / "deep.safetensors", '{"x":' + DEEP + "}", b"")
        arg = target
    elif where == "index":
        arg = tmp_path / "deep"
        arg.mkdir()
        target = arg / "model.safetensors.index.json"
        target.write_text('{"weight_map": ' + DEEP + "}")
    else:
        arg = tiny_models.ft_b
        target = arg / "config.json"
        target.write_text('{"x": ' + DEEP + "}")
    code, _, err = run_cli("inspect", arg)
    assert code == 1
    single_error_line(err)
    assert f"{target}: " in err and "(nested too deeply)" in err
    assert "RecursionError" not in err


class _Evil:
    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_message_gives_no_unsafe_advice(tmp_path, run_cli):
    marker = tmp_path / "PWNED"
    d = tmp_path / "evil"
    d.mkdir()
    torch.save({"w": torch.ones(2), "x": _Evil(marker)}, d / "pytorch_model.bin")
    code, _, err = run_cli("inspect", d)
    assert not marker.exists()
    assert code == 1
    single_error_line(err)
    assert f"{d / 'pytorch_model.bin'}: refused by torch.load(weights_only=True)" in err
    assert "weights_only=False" not in err and "`weights_only` set to `False`" not in err
    assert "system" not in err  # the pickle's own text (the global it names) is not shown
    assert len(err.splitlines()) == 1


def test_protocol_5_pickle_prints_no_torch_warning(tmp_path, run_cli):
    d = tmp_path / "p5"
    d.mkdir()
    (d / "pytorch_model.bin").write_bytes(pickle.dumps({"w": torch.ones(2)}, protocol=5))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        code, _, err = run_cli("inspect", d)
    assert code == 1
    single_error_line(err)
    assert len(err.splitlines()) == 1
    assert "UserWarning" not in err and "Unpickler" not in err
    assert not [w for w in seen if issubclass(w.category, UserWarning)]
    assert f"{d / 'pytorch_model.bin'}: refused by torch.load(weights_only=True)" in err
