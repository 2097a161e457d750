"""Bad inputs get one clear error, the right exit code, and leave nothing half-written.

Exit codes: 2 for a bad spec or usage, 1 for a runtime failure (bad input
files, incompatible models, NaN/Inf, I/O). Every failing run must leave no
OUT directory and no hidden `.OUT.wsmerge-*` directory beside it; with
--overwrite, a good OUT that was already there must survive a failed run.

This file: spec errors, incompatible models, NaN/Inf, tracebacks. Bad input
files and pickles are in test_errors_input_files.py, failures while writing in
test_errors_writing.py, the shared helpers and fixtures in _error_helpers.py.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from _error_helpers import (
    Q_PROJ,
    UP_PROJ,
    assert_nothing_written,
    good_out_fixture,  # noqa: F401  (the good_out fixture)
    hidden_leftovers,
    linear_spec,
    out_fixture,  # noqa: F401  (the out fixture)
    save_tensors,
    single_error_line,
    snapshot,
)
from safetensors.torch import load_file

from weightspace.zoo.tiny import write_tiny_llama

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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_the_output_finiteness_check_is_exact(dtype):
    """One reduction decides: any NaN or Inf entry makes min or max non-finite, at any position
    (vectorized body and tail alike); huge finite entries pass."""
    from weightspace.executor import _all_finite

    big = torch.finfo(dtype).max
    assert _all_finite(torch.full((64,), big, dtype=dtype))          # the sum overflows; entries fine
    assert _all_finite(torch.tensor([big, -big, 1.0], dtype=dtype))
    for bad in (float("nan"), float("inf"), -float("inf")):
        for n in (1, 7, 1000, 70_001):
            for pos in sorted({0, n // 2, n - 1, *range(max(0, n - 70), n)}):
                x = torch.randn(n).to(dtype)
                x[pos] = bad
                assert not _all_finite(x), (bad, n, pos)
                assert not _all_finite(x.reshape(1, n)[:, :].t())   # any layout
    assert not _all_finite(torch.tensor([float("inf"), -float("inf")], dtype=dtype))  # sum is NaN
    assert _all_finite(torch.arange(5))                               # integer buffers
