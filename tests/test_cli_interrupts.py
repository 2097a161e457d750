"""Interrupted wsmerge commands exit 130, say what was kept, and leave nothing half-written."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from _cli_helpers import EXAMPLES, REPO, ZOO_SPEC, _digits

# ---------------------------------------------------------------------------------------------
# interrupted work exits 130, says what was kept, and leaves nothing half-written

def _interrupt_on_call(monkeypatch, module, name: str, at: int = 1):
    """Make `module.name` raise KeyboardInterrupt (Ctrl-C, or SIGTERM through main's handler) on
    call number `at`; earlier calls run the real function."""
    real = getattr(module, name)
    calls = []

    def fake(*args, **kwargs):
        calls.append(1)
        if len(calls) >= at:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, fake)
    return calls


def test_interrupted_zoo_build_exits_130_and_resumes(tmp_path, run_cli, monkeypatch):
    from weightspace.zoo import build as zoo_build

    spec = tmp_path / "zoo.yaml"
    spec.write_text(ZOO_SPEC)
    root = tmp_path / "z"
    # two batches (one per width) trained in this process; Ctrl-C while the second one trains
    calls = _interrupt_on_call(monkeypatch, zoo_build, "train_unit", at=2)
    code, _, err = run_cli("zoo", "build", spec, "-o", root, "--workers", "1", "--no-progress")
    assert len(calls) == 2
    assert code == 130
    assert err == f"interrupted: 2 models are saved in {root}; run the same command to resume\n"
    assert [d.name for d in (root / "models").iterdir() if d.name.startswith(".")] == []
    monkeypatch.undo()
    code, out, err = run_cli("zoo", "build", spec, "-o", root, "--workers", "1", "--no-progress")
    assert code == 0, err
    assert "trained 2, already built 2" in out


def test_interrupted_zoo_metrics_exits_130_and_keeps_what_it_computed(tmp_path, run_cli, monkeypatch):
    from weightspace.zoo import survey as zoo_survey

    spec = tmp_path / "zoo.yaml"
    spec.write_text(ZOO_SPEC)
    root = tmp_path / "z"
    assert run_cli("zoo", "build", spec, "-o", root, "--workers", "1", "--no-progress")[0] == 0
    _interrupt_on_call(monkeypatch, zoo_survey, "metrics_unit", at=2)
    code, _, err = run_cli("zoo", "metrics", root, "--workers", "1", "--no-progress", "--no-pairs")
    assert code == 130
    assert err == (f"interrupted: 1 checkpoint(s) of {root} have their metrics saved; "
                   f"run the same command to compute the rest\n")
    monkeypatch.undo()
    code, out, err = run_cli("zoo", "metrics", root, "--workers", "1", "--no-progress", "--no-pairs")
    assert code == 0, err
    assert "metrics for 3 checkpoint(s)" in out


# (command line with OUT for the output, module, function to interrupt)
LONG_COMMANDS = [
    (["fisher", _digits("ft0"), "--data", "digits:classes=0-3", "-o", "OUT.safetensors", "--n-examples", "32"],
     "weightspace.merges.fisher", "fisher_diagonal"),
    (["gram", _digits("ft0"), "--data", "digits:classes=0-3", "-o", "OUT.safetensors", "--n-examples", "32"],
     "weightspace.merges.regmean", "gram_matrices"),
    (["atlas", "learn", "--base", _digits("base"), "--task-vectors", _digits("ft0"), _digits("ft1"),
      "--data", "digits", "-o", "OUT.safetensors", "--steps", "2"], "weightspace.merges.atlas", "learn_coefficients"),
    (["learngene", "train", "--teacher", _digits("base"), "--data", "digits", "--aux-depth", "2",
      "--steps", "2", "-o", "OUT"], "weightspace.merges.learngene", "train_gene"),
    (["learngene", "fit", str(EXAMPLES / "models" / "base"), "-o", "OUT"], "weightspace.merges.learngene", "fit_gene"),
    (["rws", "extract", "--pretrained", _digits("base"), "--clean", _digits("ft0"), "--robust", _digits("ft1"),
      "-o", "OUT.rws.safetensors"], "weightspace.merges.signatures", "extract_signature"),
    (["align", _digits("ft0"), _digits("ft1"), "-o", "OUT"], "weightspace.merges.rebasin", "align"),
    (["generate", "train", "ZOO", "-o", "OUT"], "weightspace.zoo.gen.generator", "train_generator"),
    (["generate", "sample", "GEN", "--data", "digits", "-o", "OUT"], "weightspace.zoo.gen.generator", "sample"),
    (["generate", "eval", "ZOO", "--data", "digits"], "weightspace.zoo.gen.evaluate", "evaluate_samples"),
    (["run", str(EXAMPLES / "ties.yaml"), "OUT", "--no-progress"], "weightspace.merges.ties", "Ties.merge"),
]


@pytest.mark.parametrize("argv, module, function", LONG_COMMANDS, ids=lambda v: " ".join(v[:2])
                         if isinstance(v, list) else None)
def test_every_long_command_exits_130_when_interrupted(tmp_path, run_cli, monkeypatch, argv, module,
                                                       function):
    import importlib

    mod = importlib.import_module(module)
    owner, _, attr = function.rpartition(".")
    target = getattr(mod, owner) if owner else mod
    _interrupt_on_call(monkeypatch, target, attr)
    (tmp_path / "ZOO").mkdir()
    (tmp_path / "GEN").mkdir()
    args = [a.replace("OUT", str(tmp_path / "OUT")).replace("ZOO", str(tmp_path / "ZOO"))
            .replace("GEN", str(tmp_path / "GEN")) if a.startswith(("OUT", "ZOO", "GEN")) else a for a in argv]
    code, out, err = run_cli(*args)
    assert code == 130, err
    assert err.endswith("interrupted; nothing was written\n") and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["GEN", "ZOO"]   # no output, no temporary


def test_interrupt_while_writing_a_statistics_file_leaves_nothing(tmp_path, run_cli, monkeypatch):
    import safetensors.torch

    real = safetensors.torch.save_file

    def half_written(tensors, filename, metadata=None):
        real(dict(list(tensors.items())[:1]), filename, metadata=metadata)
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "save_file", half_written)
    code, _, err = run_cli("fisher", _digits("ft0"), "--data", "digits:classes=0-3", "--n-examples", "32",
                           "-o", tmp_path / "f.safetensors", "--no-progress")
    assert code == 130 and "interrupted; nothing was written" in err
    assert list(tmp_path.iterdir()) == []


def _children(pid: int) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(d.name))
    return out


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds the worker processes in /proc")
def test_sigterm_stops_a_zoo_build_with_workers_at_once(tmp_path):
    """A real build on two worker processes gets SIGTERM while both train: it exits 130 within
    seconds (it does not wait for the batches in flight), says how to resume, stops its workers
    and leaves a consistent zoo."""
    from weightspace.zoo.store import Zoo

    spec = tmp_path / "s.yaml"
    spec.write_text(ZOO_SPEC.replace("epochs: 1, batch_size: 128", "epochs: 400, batch_size: 16"))
    root = tmp_path / "z"
    cmd = [sys.executable, "-m", "weightspace.cli.main", "zoo", "build", str(spec), "-o", str(root), "--workers", "2",
           "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.time() + 60
        while time.time() < deadline and len(_children(proc.pid)) < 3:  # resource tracker + 2 workers
            time.sleep(0.1)
        time.sleep(1.0)
        workers = _children(proc.pid)
        assert proc.poll() is None and len(workers) >= 3
        t0 = time.time()
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
        took = time.time() - t0
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert took < 10, f"took {took:.1f} s to stop"
    assert err.decode().endswith(f"interrupted: 0 models are saved in {root}; run the same command to resume\n")
    time.sleep(0.5)
    assert not [p for p in workers if Path(f"/proc/{p}").exists() and
                "spawn_main" in Path(f"/proc/{p}/cmdline").read_text(errors="replace")]
    z = Zoo(root, create=True)
    assert z.missing_weights() == [] and z.model_ids == set()
