"""A failure or an interrupt while the output is written leaves nothing half-written, and an
existing output given with --overwrite survives it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from _error_helpers import (
    assert_nothing_written,
    good_out_fixture,  # noqa: F401  (the good_out fixture)
    hidden_leftovers,
    linear_spec,
    out_fixture,  # noqa: F401  (the out fixture)
    single_error_line,
    snapshot,
)

import weightspace.inputs as inputs_mod
import weightspace.safetensors_io as safetensors_io
import weightspace.sink as sink_mod

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

    monkeypatch.setattr(inputs_mod.shutil, "copyfileobj", broken_copy)  # every carried file's copy
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
