"""Bad input files get one clear error (exit 1) and leave nothing written: missing, truncated
or corrupt safetensors, malformed headers and indexes, shards outside the model directory, and
pickles that would run code (refused; plain state dicts merge)."""

from __future__ import annotations

import builtins
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from _error_helpers import (
    UP_PROJ,
    assert_nothing_written,
    linear_spec,
    out_fixture,  # noqa: F401  (the out fixture)
    single_error_line,
    write_sharded,
)
from safetensors.torch import load_file

from weightspace.errors import InputError
from weightspace.sources import load_space

# ---------------------------------------------------------------- bad input files (exit 1)


def test_model_path_that_does_not_exist(tiny_models, run_cli, write_spec, out):
    missing = tiny_models.root / "models" / "ft_typo"
    spec = write_spec(linear_spec(tiny_models.ft_a, missing))
    code, _, err = run_cli("run", spec, out)
    assert code == 1
    single_error_line(err)
    assert f"{missing}: no such file or directory" in err
    assert_nothing_written(out)


def test_truncated_safetensors(tiny_models, run_cli, write_spec, out):
    f = tiny_models.ft_b / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    spec = write_spec(linear_spec(tiny_models.ft_a, tiny_models.ft_b))
    code, _, err = run_cli("run", spec, out)
    assert code == 1
    single_error_line(err)
    assert f"{f}: truncated safetensors file" in err
    assert f"file has {len(data) // 2}" in err
    assert_nothing_written(out)


@pytest.mark.parametrize(
    "garbage,expect",
    [
        (b"\x93\x17garbage-bytes" * 300, "not a safetensors file"),
        ((64).to_bytes(8, "little") + b"\xff\xfe not json at all" + b" " * 200, "corrupt safetensors header"),
        ((8).to_bytes(8, "little") + b"[1,2,3] " + b"\0" * 16, "corrupt safetensors header"),
    ],
    ids=["garbage", "bad-json", "not-an-object"],
)
def test_corrupt_header(tiny_models, run_cli, write_spec, out, garbage, expect):
    f = tiny_models.ft_b / "model.safetensors"
    f.write_bytes(garbage)
    spec = write_spec(linear_spec(tiny_models.ft_a, tiny_models.ft_b))
    code, _, err = run_cli("run", spec, out)
    assert code == 1
    single_error_line(err)
    assert f"{f}: {expect}" in err
    assert_nothing_written(out)


@pytest.mark.parametrize(
    "entry",
    [
        {"dtype": "F32", "shape": [2], "data_offsets": ["0", "8"]},
        {"dtype": "F32", "shape": [2], "data_offsets": [0, 8, 16]},
        {"dtype": "F32", "shape": "2", "data_offsets": [0, 8]},
        {"dtype": "F99", "shape": [2], "data_offsets": [0, 8]},
        {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]},
        "not-an-object",
    ],
)
def test_malformed_header_entry_names_file_and_tensor(tmp_path, entry):
    header = json.dumps({"w": entry}).encode()
    header += b" " * (-len(header) % 8)
    f = tmp_path / "bad.safetensors"
    f.write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 16)
    with pytest.raises(InputError) as ei:
        load_space(f)
    msg = str(ei.value)
    assert str(f) in msg
    assert "'w'" in msg


def test_malformed_metadata_is_an_input_error(tmp_path):
    header = json.dumps({"__metadata__": ["not", "a", "map"],
                         "w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}).encode()
    header += b" " * (-len(header) % 8)
    f = tmp_path / "bad.safetensors"
    f.write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 8)
    with pytest.raises(InputError, match="__metadata__"):
        load_space(f)


def test_index_with_missing_shard(tiny_models, run_cli, write_spec, out):
    sharded = tiny_models.root / "sharded"
    shards = write_sharded(tiny_models.ft_b, sharded)
    (sharded / shards[1]).unlink()
    spec = write_spec(linear_spec(tiny_models.ft_a, sharded))
    code, _, err = run_cli("run", spec, out)
    assert code == 1
    single_error_line(err)
    assert f"{sharded / 'model.safetensors.index.json'}: shard file {shards[1]!r} is missing" in err
    assert_nothing_written(out)


def test_sharded_input_merges_like_a_single_file(tiny_models, run_cli, write_spec, out):
    """Control for the index tests: a valid sharded input gives the same result."""
    sharded = tiny_models.root / "sharded"
    write_sharded(tiny_models.ft_b, sharded)
    spec = write_spec(linear_spec(tiny_models.ft_a, sharded))
    assert run_cli("run", spec, out)[0] == 0
    single = tiny_models.root / "single"
    spec = write_spec(linear_spec(tiny_models.ft_a, tiny_models.ft_b), name="single.yaml")
    assert run_cli("run", spec, single)[0] == 0
    assert load_file(out / "model.safetensors").keys() == load_file(single / "model.safetensors").keys()
    for k, v in load_file(single / "model.safetensors").items():
        assert torch.equal(load_file(out / "model.safetensors")[k], v)


@pytest.fixture
def open_spy(monkeypatch):
    """Records every path opened through open()/os.open() during the test."""
    opened: list[Path] = []
    real_open, real_os_open = builtins.open, os.open

    def spy_open(file, *a, **kw):
        if isinstance(file, (str, os.PathLike)):
            opened.append(Path(file).resolve())
        return real_open(file, *a, **kw)

    def spy_os_open(path, *a, **kw):
        opened.append(Path(path).resolve())
        return real_os_open(path, *a, **kw)

    monkeypatch.setattr(builtins, "open", spy_open)
    monkeypatch.setattr(os, "open", spy_os_open)
    return opened


@pytest.mark.parametrize("how", ["dotdot", "absolute", "nested-dotdot"])
def test_index_shard_leaving_the_directory_is_refused_unopened(tiny_models, run_cli, write_spec,
                                                                out, open_spy, how):
    # a perfectly valid checkpoint outside the model directory
    outside = tiny_models.root / "outside.safetensors"
    shutil.copy(tiny_models.ft_b / "model.safetensors", outside)
    victim = tiny_models.root / "models" / "victim"
    shards = write_sharded(tiny_models.ft_b, victim)
    name = {"dotdot": "../../outside.safetensors", "absolute": str(outside),
            "nested-dotdot": "sub/../../../outside.safetensors"}[how]
    index_path = victim / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"] = {k: (name if v == shards[1] else v) for k, v in index["weight_map"].items()}
    index_path.write_text(json.dumps(index))
    assert (victim / name).resolve() == outside.resolve()  # the name really points at it

    spec = write_spec(linear_spec(tiny_models.ft_a, victim))
    open_spy.clear()  # setup copied the outside file; only the run counts
    code, _, err = run_cli("run", spec, out)
    assert code == 1
    single_error_line(err)
    assert f"{index_path}: shard {name!r} leaves the model directory" in err
    assert (tiny_models.ft_a / "model.safetensors").resolve() in open_spy  # the spy sees reads
    assert outside.resolve() not in open_spy
    assert_nothing_written(out)


def test_pytorch_bin_index_leaving_the_directory_is_refused(tiny_models, tmp_path):
    marker = tmp_path / "PWNED"
    outside = tmp_path / "evil.bin"
    torch.save({"w": _Evil(marker)}, outside)
    d = tmp_path / "m"
    d.mkdir()
    (d / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": {"w": "../evil.bin"}}))
    with pytest.raises(InputError, match="leaves the model directory"):
        load_space(d)
    assert not marker.exists()


def test_symlinked_shards_inside_the_directory_load(tiny_models, tmp_path):
    """The Hugging Face cache links each snapshot file to a blob outside the snapshot
    directory; the shard *names* stay inside, so such a checkpoint must load."""
    staging = tmp_path / "staging"
    write_sharded(tiny_models.ft_b, staging)
    blobs = tmp_path / "hub" / "blobs"
    snap = tmp_path / "hub" / "snapshots" / "0123abcd"
    blobs.mkdir(parents=True)
    snap.mkdir(parents=True)
    for f in staging.iterdir():
        shutil.move(f, blobs / f"blob-{f.name}")
        (snap / f.name).symlink_to(Path("..", "..", "blobs", f"blob-{f.name}"))
    space = load_space(snap)
    want = load_file(tiny_models.ft_b / "model.safetensors")
    assert set(space) == set(want)
    assert torch.equal(space[UP_PROJ].load(), want[UP_PROJ])


# ---------------------------------------------------------------- pickles


class _Evil:
    """Unpickling this calls open(marker, "w"): proof that code ran."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("zipfile", [True, False], ids=["zip", "legacy"])
def test_bin_with_malicious_pickle_is_refused(tiny_models, run_cli, write_spec, out, tmp_path,
                                              zipfile):
    marker = tmp_path / "PWNED"
    state = load_file(tiny_models.ft_b / "model.safetensors")
    state["payload"] = _Evil(marker)
    evil = tmp_path / "evil_model"
    evil.mkdir()
    torch.save(state, evil / "pytorch_model.bin", _use_new_zipfile_serialization=zipfile)
    shutil.copy(tiny_models.ft_b / "config.json", evil / "config.json")

    spec = write_spec(linear_spec(tiny_models.ft_a, evil))
    code, _, err = run_cli("run", spec, out)
    assert not marker.exists(), "the pickle payload ran"
    assert code == 1
    single_error_line(err)
    assert str(evil / "pytorch_model.bin") in err
    assert "weights_only" in err
    assert "\x1b[" not in err  # no terminal escape codes from torch's message
    assert len(err.splitlines()) == 1
    assert_nothing_written(out)

    with pytest.raises(InputError, match="weights_only"):
        load_space(evil / "pytorch_model.bin")
    assert not marker.exists()


@pytest.mark.parametrize("zipfile", [True, False], ids=["zip", "legacy"])
def test_plain_bin_state_dict_merges(tiny_models, run_cli, write_spec, out, tmp_path, zipfile):
    """Control for the pickle test: an honest .bin loads and merges bit-exactly."""
    state = load_file(tiny_models.ft_b / "model.safetensors")
    honest = tmp_path / "honest"
    honest.mkdir()
    torch.save(state, honest / "pytorch_model.bin", _use_new_zipfile_serialization=zipfile)
    spec = write_spec(linear_spec(tiny_models.ft_a, honest))
    code, _, err = run_cli("run", spec, out)
    assert code == 0, err
    a = load_file(tiny_models.ft_a / "model.safetensors")
    got = load_file(out / "model.safetensors")
    assert torch.equal(got[UP_PROJ], (a[UP_PROJ] * 0.5 + state[UP_PROJ] * 0.5) / 1.0)


@pytest.mark.parametrize("text,expect", [("{not json", "not valid JSON"), ("[1, 2]", "expected a JSON object")])
def test_bad_model_config_names_the_file(tiny_models, run_cli, write_spec, out, text, expect):
    cfg = tiny_models.ft_b / "config.json"
    cfg.write_text(text)
    spec = write_spec(linear_spec(tiny_models.ft_a, tiny_models.ft_b))
    code, _, err = run_cli("run", spec, out)
    assert code == 1
    single_error_line(err)
    assert f"{cfg}: {expect}" in err
    assert_nothing_written(out)


@pytest.mark.parametrize("text,expect", [("{not json", "not valid JSON"), ('"lora"', "expected a JSON object")])
def test_bad_adapter_config_names_the_file(tmp_path, text, expect):
    from weightspace.lora.adapter import read_adapter_config

    d = tmp_path / "adapter"
    d.mkdir()
    (d / "adapter_config.json").write_text(text)
    with pytest.raises(InputError) as e:
        read_adapter_config(d)
    assert str(e.value).startswith(f"{d / 'adapter_config.json'}: {expect}")
