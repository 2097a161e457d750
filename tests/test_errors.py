"""Bad inputs get one clear error, the right exit code, and leave nothing half-written.

Exit codes: 2 for a bad spec or usage, 1 for a runtime failure (bad input
files, incompatible models, NaN/Inf, I/O). Every failing run must leave no
OUT directory and no hidden `.OUT.wsmerge-*` directory beside it; with
--overwrite, a good OUT that was already there must survive a failed run.
"""

from __future__ import annotations

import builtins
import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from weightspace.zoo.tiny import write_tiny_llama

import weightspace.safetensors_io as safetensors_io
import weightspace.sink as sink_mod
from weightspace.errors import InputError
from weightspace.sources import load_space

Q_PROJ = "model.layers.0.self_attn.q_proj.weight"
UP_PROJ = "model.layers.1.mlp.up_proj.weight"


# ---------------------------------------------------------------- helpers


def linear_spec(*models: Path, method: str = "linear", weights: list[float] | None = None,
                model_params: str = "weight: {w}", extra: str = "") -> str:
    weights = weights or [0.5] * len(models)
    lines = [f"merge_method: {method}", "models:"]
    for m, w in zip(models, weights):
        lines += [f"  - model: {m}", f"    parameters: {{{model_params.format(w=w)}}}"]
    return "\n".join(lines) + "\n" + extra


def hidden_leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.wsmerge-"))


def assert_nothing_written(out: Path) -> None:
    assert not out.exists(), f"{out} was created by a failed run"
    assert hidden_leftovers(out) == []


def snapshot(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def single_error_line(err: str) -> str:
    """The CLI's default error style: one `error: ...` message and no traceback."""
    assert "Traceback" not in err
    assert err.startswith("error: "), err
    return err


def save_tensors(d: Path, tensors: dict[str, torch.Tensor], config_from: Path | None = None) -> Path:
    d.mkdir(parents=True)
    save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})
    if config_from is not None:
        shutil.copy(config_from / "config.json", d / "config.json")
    return d


@pytest.fixture
def out(tmp_path: Path) -> Path:
    return tmp_path / "merged"


@pytest.fixture
def good_out(tiny_models, run_cli, write_spec, out) -> dict[str, bytes]:
    """A finished merge already at OUT; returns its files' bytes."""
    spec = write_spec(linear_spec(tiny_models.ft_a, tiny_models.ft_b), name="good.yaml")
    code, _, err = run_cli("run", spec, out)
    assert code == 0, err
    return snapshot(out)


def write_sharded(src: Path, dst: Path, shard_size: str = "20K") -> list[str]:
    """Re-save a checkpoint as several shards; returns the shard file names."""
    load_space(src).save(dst, shard_size=shard_size, config=json.loads((src / "config.json").read_text()))
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2
    return shards


# ---------------------------------------------------------------- spec errors (exit 2)


def test_unknown_method_suggests_closest_and_lists_known(tiny_models, run_cli, write_spec, out):
    spec = write_spec(linear_spec(tiny_models.ft_a, method="lienar"))
    code, stdout, err = run_cli("run", spec, out)
    assert code == 2
    single_error_line(err)
    assert "unknown merge_method 'lienar'" in err
    assert "Did you mean 'linear'?" in err
    known = err.split("Known methods:")[1]
    for name in ("linear", "task_arithmetic", "ties"):
        assert name in known
    assert stdout == ""
    assert_nothing_written(out)


@pytest.mark.parametrize(
    "where,spec_kw,bad,good",
    [
        ("models[0].parameters", {"model_params": "wieght: {w}"}, "wieght", "weight"),
        ("parameters", {"extra": "parameters: {normalise: false}\n"}, "normalise", "normalize"),
    ],
)
def test_unknown_parameter_suggests_closest(tiny_models, run_cli, write_spec, out, where, spec_kw,
                                            bad, good):
    spec = write_spec(linear_spec(tiny_models.ft_a, tiny_models.ft_b, **spec_kw))
    code, _, err = run_cli("run", spec, out)
    assert code == 2
    single_error_line(err)
    # the spec file, the field and its YAML line, then the message
    assert re.search(rf"{re.escape(str(spec))}: {re.escape(where)}\.{bad} \(line \d+\): "
                     rf"unknown parameter for merge_method 'linear'", err), err
    assert f"Did you mean '{good}'?" in err
    assert_nothing_written(out)


def test_misspelled_top_level_key_names_key_and_line(tiny_models, run_cli, write_spec, out):
    text = linear_spec(tiny_models.ft_a) + "dtpye: float32\n"
    line = text.splitlines().index("dtpye: float32") + 1
    spec = write_spec(text)
    code, _, err = run_cli("run", spec, out)
    assert code == 2
    single_error_line(err)
    assert str(spec) in err
    assert f"dtpye (line {line}): unknown key 'dtpye'" in err
    assert_nothing_written(out)


def test_misspelled_nested_key_names_its_own_line(tiny_models, run_cli, write_spec, out):
    text = (f"merge_method: linear\nmodels:\n  - model: {tiny_models.ft_a}\n"
            f"    parameters: {{weight: 1.0}}\n  - modle: {tiny_models.ft_b}\n")
    spec = write_spec(text)
    code, _, err = run_cli("run", spec, out)
    assert code == 2
    assert "models[1].modle (line 5): unknown key 'modle'" in err
    assert_nothing_written(out)


@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf", "1e400", "[0.5, .nan]",
                                   "[{filter: mlp, value: .nan}, {value: 0.5}]"])
def test_nonfinite_parameter_is_a_spec_error(tiny_models, run_cli, write_spec, out, value):
    spec = write_spec(f"""
        merge_method: linear
        models:
          - model: {tiny_models.ft_a}
            parameters:
              weight: {value}
          - model: {tiny_models.ft_b}
            parameters: {{weight: 0.5}}
    """)
    code, _, err = run_cli("run", spec, out)
    assert code == 2  # found while validating, not as NaN tensors halfway through
    single_error_line(err)
    assert "models[0].parameters (line 4): weight must be a finite number, got" in err
    assert_nothing_written(out)


def test_exponent_without_dot_is_a_number(tiny_models, run_cli, write_spec, out):
    """PyYAML reads `5e-1` as a string (YAML 1.1); mergekit configs write numbers that way."""
    spec = write_spec(linear_spec(tiny_models.ft_a, tiny_models.ft_b, weights=["5e-1", "5E-1"]))
    code, _, err = run_cli("run", spec, out)
    assert code == 0, err
    a, b = load_file(tiny_models.ft_a / "model.safetensors"), load_file(tiny_models.ft_b / "model.safetensors")
    assert torch.equal(load_file(out / "model.safetensors")[Q_PROJ], (a[Q_PROJ] * 0.5 + b[Q_PROJ] * 0.5) / 1.0)


def test_output_exists_needs_overwrite(tiny_models, run_cli, write_spec, out):
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    spec = write_spec(linear_spec(tiny_models.ft_a, tiny_models.ft_b))
    code, _, err = run_cli("run", spec, out)
    assert code == 2
    single_error_line(err)
    assert f"output {out} already exists; pass --overwrite" in err
    assert (out / "keep.txt").read_text() == "precious"
    assert hidden_leftovers(out) == []

    code, _, err = run_cli("run", spec, out, "--overwrite")
    assert code == 0, err
    assert not (out / "keep.txt").exists()  # replaced, not merged into
    a, b = load_file(tiny_models.ft_a / "model.safetensors"), load_file(tiny_models.ft_b / "model.safetensors")
    got = load_file(out / "model.safetensors")
    assert torch.equal(got[Q_PROJ], (a[Q_PROJ] * 0.5 + b[Q_PROJ] * 0.5) / 1.0)
    assert hidden_leftovers(out) == []


def test_missing_out_is_a_usage_error(tiny_models, run_cli, write_spec):
    spec = write_spec(linear_spec(tiny_models.ft_a))
    code, _, err = run_cli("run", spec)
    assert code == 2
    assert "missing OUT" in err


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
        (b"\x93\x17garbage-bytes" * 300, "corrupt or truncated safetensors file (header claims"),
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


# ---------------------------------------------------------------- incompatible models (exit 1)


def test_tensor_missing_from_one_model(tiny_models, run_cli, write_spec, out):
    tensors = load_file(tiny_models.ft_b / "model.safetensors")
    del tensors[UP_PROJ]
    partial = save_tensors(tiny_models.root / "partial", tensors, tiny_models.ft_b)
    spec = write_spec(linear_spec(tiny_models.ft_a, partial))
    code, _, err = run_cli("run", spec, out)
    assert code == 1
    single_error_line(err)
    assert f"tensor {UP_PROJ!r} is missing from model {str(partial)!r}" in err
    assert_nothing_written(out)


def test_tensor_only_in_one_model(tiny_models, run_cli, write_spec, out):
    tensors = load_file(tiny_models.ft_b / "model.safetensors")
    tensors["model.extra_head.weight"] = torch.zeros(4, 4)
    bigger = save_tensors(tiny_models.root / "bigger", tensors, tiny_models.ft_b)
    spec = write_spec(linear_spec(tiny_models.ft_a, bigger))
    code, _, err = run_cli("run", spec, out)
    assert code == 1
    single_error_line(err)
    assert "tensor 'model.extra_head.weight' is in model" in err
    assert str(bigger) in err and str(tiny_models.ft_a) in err
    assert_nothing_written(out)


def test_shapes_that_disagree(tiny_models, run_cli, write_spec, out):
    tensors = load_file(tiny_models.ft_b / "model.safetensors")
    tensors[UP_PROJ] = torch.zeros(48, 32)
    wrong = save_tensors(tiny_models.root / "wrong_shape", tensors, tiny_models.ft_b)
    spec = write_spec(linear_spec(tiny_models.ft_a, wrong))
    code, _, err = run_cli("run", spec, out)
    assert code == 1
    single_error_line(err)
    assert f"tensor {UP_PROJ!r}: shape [48, 32] in model {str(wrong)!r} does not match [64, 32]" in err
    assert_nothing_written(out)


def test_layer_counts_that_disagree(tiny_models, run_cli, write_spec, out):
    deeper = write_tiny_llama(tiny_models.root / "models" / "deeper", seed=0, layers=3)
    spec = write_spec(linear_spec(tiny_models.ft_a, deeper))
    code, _, err = run_cli("run", spec, out)
    assert code == 1
    single_error_line(err)
    assert "different numbers of layers" in err
    assert f"{str(tiny_models.ft_a)!r} has 2" in err and f"{str(deeper)!r} has 3" in err
    assert_nothing_written(out)


# ---------------------------------------------------------------- NaN / Inf


@pytest.fixture
def inf_model(tiny_models) -> Path:
    tensors = load_file(tiny_models.ft_b / "model.safetensors")
    tensors[Q_PROJ][3, 5] = float("inf")
    return save_tensors(tiny_models.root / "with_inf", tensors, tiny_models.ft_b)


def test_nonfinite_result_is_refused(tiny_models, inf_model, run_cli, write_spec, out):
    spec = write_spec(linear_spec(tiny_models.ft_a, inf_model))
    code, _, err = run_cli("run", spec, out)
    assert code == 1
    single_error_line(err)
    assert f"tensor {Q_PROJ!r}: the merge produced 1 NaN/Inf value(s)" in err
    assert "--allow-nonfinite" in err
    assert_nothing_written(out)


def test_nonfinite_refused_over_existing_output_keeps_it(tiny_models, inf_model, run_cli, write_spec,
                                                         out, good_out):
    spec = write_spec(linear_spec(tiny_models.ft_a, inf_model))
    code, _, err = run_cli("run", spec, out, "--overwrite")
    assert code == 1
    assert "NaN/Inf" in err
    assert snapshot(out) == good_out
    assert hidden_leftovers(out) == []


def test_allow_nonfinite_writes_it(tiny_models, inf_model, run_cli, write_spec, out):
    spec = write_spec(linear_spec(tiny_models.ft_a, inf_model))
    code, _, err = run_cli("run", spec, out, "--allow-nonfinite")
    assert code == 0, err
    got = load_file(out / "model.safetensors")[Q_PROJ]
    a = load_file(tiny_models.ft_a / "model.safetensors")[Q_PROJ]
    b = load_file(inf_model / "model.safetensors")[Q_PROJ]
    assert got[3, 5] == float("inf")
    assert int(torch.isfinite(got).sum()) == got.numel() - 1
    assert torch.equal(got, (a * 0.5 + b * 0.5) / 1.0)
    assert hidden_leftovers(out) == []


def test_overflow_in_output_dtype_is_refused(tiny_models, run_cli, write_spec, out):
    """Finite in float32, Inf once cast to float16 (max 65504): still refused."""
    tensors = load_file(tiny_models.ft_b / "model.safetensors")
    tensors["model.norm.weight"][0] = 1e5
    big = save_tensors(tiny_models.root / "big", tensors, tiny_models.ft_b)
    spec = write_spec(linear_spec(big, big))
    code, _, err = run_cli("run", spec, out, "--out-dtype", "float16")
    assert code == 1
    single_error_line(err)
    assert "tensor 'model.norm.weight': the merge produced 1 NaN/Inf value(s)" in err
    assert "beyond the range of float16" in err
    assert_nothing_written(out)

    code, _, err = run_cli("run", spec, out, "--out-dtype", "bfloat16")  # same range as float32
    assert code == 0, err
    norm = load_file(out / "model.safetensors")["model.norm.weight"]
    assert norm.dtype == torch.bfloat16
    assert abs(float(norm[0]) - 1e5) < 1e3


# ---------------------------------------------------------------- failures while writing


def _fail_after(monkeypatch, n: int, exc: BaseException) -> list[str]:
    """Make ShardWriter.write raise `exc` after `n` tensors; returns the names it was
    given: n written, then the one that failed."""
    real = safetensors_io.ShardWriter.write
    written: list[str] = []

    def write(self, name, tensor):
        if len(written) >= n:
            written.append(name)
            raise exc
        real(self, name, tensor)
        written.append(name)

    monkeypatch.setattr(safetensors_io.ShardWriter, "write", write)
    return written


@pytest.mark.parametrize("shard_size", ["5G", "12K"])
def test_write_failing_midway_leaves_nothing(tiny_models, run_cli, write_spec, out, monkeypatch,
                                             shard_size):
    written = _fail_after(monkeypatch, 7, OSError(28, "No space left on device"))
    spec = write_spec(linear_spec(tiny_models.ft_a, tiny_models.ft_b))
    code, _, err = run_cli("run", spec, out, "--shard-size", shard_size)
    assert len(written) == 8  # it really failed midway, after 7 tensors were on disk
    assert code == 1
    single_error_line(err)
    assert f"writing tensor {written[-1]!r} to {out}: OSError: [Errno 28] No space left" in err
    assert_nothing_written(out)


def test_write_failing_midway_keeps_existing_output(tiny_models, run_cli, write_spec, out,
                                                    monkeypatch, good_out):
    _fail_after(monkeypatch, 7, OSError(28, "No space left on device"))
    spec = write_spec(linear_spec(tiny_models.ft_a, tiny_models.ft_b, weights=[0.9, 0.1]))
    code, _, err = run_cli("run", spec, out, "--overwrite", "--shard-size", "12K")
    assert code == 1
    assert "No space left on device" in err
    assert snapshot(out) == good_out
    assert hidden_leftovers(out) == []


def test_interrupt_midway_keeps_existing_output(tiny_models, run_cli, write_spec, out, monkeypatch,
                                                good_out):
    from weightspace.merges import linear

    real = linear.weighted_average
    calls: list[int] = []

    def interrupted(*a, **kw):  # Ctrl-C while the fourth tensor is being merged
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(linear, "weighted_average", interrupted)
    spec = write_spec(linear_spec(tiny_models.ft_a, tiny_models.ft_b, weights=[0.9, 0.1]))
    code, _, err = run_cli("run", spec, out, "--overwrite")
    assert len(calls) == 4
    assert code == 130
    assert "Traceback" not in err
    assert snapshot(out) == good_out
    assert hidden_leftovers(out) == []


def test_failure_copying_carried_files_leaves_nothing(tiny_models, run_cli, write_spec, out,
                                                      monkeypatch):
    (tiny_models.ft_a / "tokenizer.json").write_text("{}")

    def broken_copy(src, dst, *a, **kw):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(sink_mod.shutil, "copyfile", broken_copy)
    spec = write_spec(linear_spec(tiny_models.ft_a, tiny_models.ft_b))
    code, _, err = run_cli("run", spec, out)
    assert code == 1
    assert "Input/output error" in err
    assert_nothing_written(out)


def test_failed_final_rename_restores_existing_output(tiny_models, run_cli, write_spec, out,
                                                      monkeypatch, good_out):
    real_replace = os.replace

    def replace(src, dst, *a, **kw):
        # refuse only the move of the finished temp directory onto OUT
        if Path(src).name.startswith(f".{out.name}.wsmerge-") and "-old-" not in Path(src).name \
                and Path(dst) == out:
            raise OSError(18, "Invalid cross-device link")
        return real_replace(src, dst, *a, **kw)

    monkeypatch.setattr(sink_mod.os, "replace", replace)
    spec = write_spec(linear_spec(tiny_models.ft_a, tiny_models.ft_b, weights=[0.9, 0.1]))
    code, _, err = run_cli("run", spec, out, "--overwrite")
    assert code == 1
    assert "Invalid cross-device link" in err
    assert snapshot(out) == good_out
    assert hidden_leftovers(out) == []


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


# ---------------------------------------------------------------- tracebacks


@pytest.mark.parametrize(
    "argv_prefix,env,traceback",
    [
        ([], {}, False),
        (["-v"], {}, True),
        (["--verbose"], {}, True),
        ([], {"WSMERGE_DEBUG": "1"}, True),
        ([], {"WSMERGE_DEBUG": "0"}, False),
    ],
)
@pytest.mark.parametrize("kind", ["runtime", "spec"])
def test_traceback_only_when_asked(tiny_models, run_cli, write_spec, out, argv_prefix, env,
                                   traceback, kind):
    if kind == "runtime":
        spec = write_spec(linear_spec(tiny_models.ft_a, tiny_models.root / "nowhere"))
        want_code, want = 1, "no such file or directory"
    else:
        spec = write_spec(linear_spec(tiny_models.ft_a, method="lienar"))
        want_code, want = 2, "unknown merge_method 'lienar'"
    code, _, err = run_cli(*argv_prefix, "run", spec, out, env=env)
    assert code == want_code
    assert ("Traceback (most recent call last)" in err) is traceback
    assert err.rstrip().splitlines()[-1].startswith("error: ")
    assert want in err.rstrip().splitlines()[-1]
    if not traceback:
        assert len(err.splitlines()) == 1
    assert_nothing_written(out)


def test_error_inside_a_method_names_the_tensor(tiny_models, run_cli, write_spec, out, monkeypatch):
    from weightspace.merges import linear

    def boom(*a, **kw):
        raise ZeroDivisionError("synthetic")

    monkeypatch.setattr(linear, "weighted_average", boom)
    spec = write_spec(linear_spec(tiny_models.ft_a, tiny_models.ft_b))
    code, _, err = run_cli("run", spec, out)
    assert code == 1
    single_error_line(err)
    assert "computing tensor 'lm_head.weight': ZeroDivisionError: synthetic" in err
    assert_nothing_written(out)


def test_unexpected_exception_hints_at_debug(tiny_models, run_cli, write_spec, out, monkeypatch):
    import weightspace.merge

    def boom(*a, **kw):
        raise RuntimeError("synthetic")

    monkeypatch.setattr(weightspace.merge, "plan_merge", boom)
    spec = write_spec(linear_spec(tiny_models.ft_a, tiny_models.ft_b))
    code, _, err = run_cli("run", spec, out)
    assert code == 1
    assert err == "error: RuntimeError: synthetic (set WSMERGE_DEBUG=1 for a traceback)\n"
    code, _, err = run_cli("-v", "run", spec, out)
    assert "Traceback (most recent call last)" in err and "RuntimeError: synthetic" in err
    assert_nothing_written(out)
