"""The wsmerge commands behave alike: interrupts, -v, --device, error style, -o, the demo, help
examples that run, zoo build progress and the dry-run's memory figure."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import click
import pytest
import torch
from weightspace.cli.main import wsmerge

from weightspace import load_space

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
PACKAGES = {"cli", "merges", "tests", "weightspace", "zoo", "benchmarks", "docs"}


# a zoo of 4 MLPs in two batches (one per width), trained in seconds
ZOO_SPEC = """
name: tiny
dataset: digits
arch: {arch: mlp, depth: 1}
train: {epochs: 1, batch_size: 128}
grid:
  width: [4, 8]
  seed: [0, 1]
metrics: {max_examples: 64, hessian_iters: 2, trace_samples: 2, bezier_steps: 2}
"""


def _walk(cmd: click.Command, path: tuple[str, ...] = ("wsmerge",)):
    """(path, command) for every command of the tree, in the order they are defined."""
    yield path, cmd
    if isinstance(cmd, click.Group):
        for name, sub in cmd.commands.items():
            yield from _walk(sub, (*path, name))


COMMANDS = list(_walk(wsmerge))


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------------------------
# 1. interrupted work exits 130, says what was kept, and leaves nothing half-written

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


def _digits(name: str) -> str:
    return str(EXAMPLES / "digits" / name)


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


# ---------------------------------------------------------------------------------------------
# 4. -v/--verbose after any command; 5. --device: one option, default auto, everywhere


def test_every_command_takes_verbose_and_device_options_are_one_definition():
    from weightspace.cli.options import _resolve_device, _set_verbose

    devices = []
    for path, cmd in COMMANDS:
        verbose = [p for p in cmd.params if "--verbose" in getattr(p, "opts", [])]
        assert len(verbose) == 1 and verbose[0].opts == ["-v", "--verbose"], path
        assert verbose[0].callback is _set_verbose, path
        for p in cmd.params:
            if "--device" in getattr(p, "opts", []):
                devices.append(path)
                assert p.default == "auto" and p.callback is _resolve_device, path
    assert {" ".join(p[1:]) for p in devices} == {"run", "demo", "atlas learn", "learngene train"}


@pytest.mark.parametrize("where", ["before", "after"])
def test_verbose_shows_tracebacks_wherever_it_is(tmp_path, run_cli, where):
    spec = tmp_path / "missing.yaml"
    args = ["run", spec, tmp_path / "out"]
    code, _, err = run_cli(*(["-v", *args] if where == "before" else [*args, "-v"]))
    assert code == 2 and "Traceback (most recent call last)" in err
    assert err.rstrip().endswith("cannot read spec: No such file or directory")
    code, _, err = run_cli(*args)
    assert code == 2 and "Traceback" not in err
    code, _, err = run_cli("zoo", "show", tmp_path, "--verbose")    # a subcommand of a group too
    assert code == 1 and "Traceback (most recent call last)" in err


def test_device_auto_is_resolved_once_for_every_command(tmp_path, run_cli):
    # learngene train and atlas learn used to default to cpu and refuse `auto`
    code, out, err = run_cli("learngene", "train", "--teacher", _digits("base"), "--data", "digits",
                             "--aux-depth", "2", "--steps", "1", "--n-examples", "64", "--device", "auto",
                             "-o", tmp_path / "g", "--no-progress")
    assert code == 0, err
    code, out, err = run_cli("atlas", "learn", "--base", _digits("base"), "--task-vectors", _digits("ft0"),
                             "--data", "digits", "--steps", "1", "--n-examples", "64",
                             "-o", tmp_path / "c.safetensors", "--no-progress")
    assert code == 0, err
    for args in (["atlas", "learn", "--base", _digits("base"), "--task-vectors", _digits("ft0"), "--data",
                  "digits", "-o", tmp_path / "d.safetensors"],
                 ["learngene", "train", "--teacher", _digits("base"), "--data", "digits", "-o", tmp_path / "e"],
                 ["demo", tmp_path / "demo"]):
        code, _, err = run_cli(*args, "--device", "tpu")
        assert code == 1 and err == "error: unknown device 'tpu': use auto, cpu, cuda or cuda:N\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.safetensors", "g"]


# ---------------------------------------------------------------------------------------------
# 6. one error style, click's usage errors included


@pytest.mark.parametrize("argv, message", [
    (["run"], "error: Missing argument 'SPEC'."),
    (["nope"], "error: No such command 'nope'."),
    (["run", "x.yaml", "--shard-size", "lots"], "error: Invalid value for '--shard-size': cannot read size"),
    (["zoo", "build", "x.yaml"], "error: Missing option '-o' / '--out'."),
    (["fisher", "m", "-o", "x.safetensors", "--bogus"], "error: No such option '--bogus'."),
    (["generate", "eval", "no-such-dir", "--data", "digits"], "error: Invalid value for 'SAMPLES': Path"),
])
def test_usage_errors_use_our_style_with_clicks_usage_line(run_cli, argv, message):
    code, out, err = run_cli(*argv)
    assert code == 2 and out == ""
    assert "Error:" not in err
    lines = err.splitlines()
    assert lines[0].startswith("Usage: wsmerge") and lines[1].startswith("Try 'wsmerge")
    assert lines[-1].startswith(message)


def test_click_errors_without_a_usage_line_use_our_style_too(run_cli):
    code, out, err = run_cli("demo", "--device")       # click raises this one without a context
    assert (code, out, err) == (2, "", "error: Option '--device' requires an argument.\n")


def test_help_and_version_exit_0_and_a_bare_group_shows_its_help(run_cli):
    assert run_cli("--help")[0] == 0
    assert run_cli("zoo", "build", "-h")[0] == 0
    assert run_cli("--version")[0] == 0
    code, out, err = run_cli("zoo")
    assert code == 2 and err.startswith("Usage: wsmerge zoo") and "error:" not in err


# ---------------------------------------------------------------------------------------------
# 3. run takes OUT as an argument or as -o, like every other command


def test_run_takes_out_as_argument_or_option(tmp_path, run_cli):
    spec = EXAMPLES / "linear.yaml"
    code, _, err = run_cli("run", spec, "-o", tmp_path / "a", "--no-progress")
    assert code == 0, err
    code, _, err = run_cli("run", spec, tmp_path / "b", "--no-progress")
    assert code == 0, err
    assert _snapshot(tmp_path / "a") == _snapshot(tmp_path / "b")
    code, _, err = run_cli("run", spec, tmp_path / "c", "--out", str(tmp_path / "c") + "/", "--no-progress")
    assert code == 0, err                                   # the same directory twice is fine
    code, _, err = run_cli("run", spec, tmp_path / "d", "-o", tmp_path / "e")
    assert code == 2
    assert err.splitlines()[-1] == (f"error: OUT {tmp_path / 'd'} and -o/--out {tmp_path / 'e'} name "
                                    f"different directories; give the output once")
    assert not (tmp_path / "d").exists() and not (tmp_path / "e").exists()
    code, _, err = run_cli("run", spec)
    assert code == 2 and "missing OUT" in err


# ---------------------------------------------------------------------------------------------
# 7. demo refuses what it did not write; 8. its printed commands work


def test_demo_refuses_a_directory_it_did_not_write(tmp_path, run_cli):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    (out / ".wsmerge-demo").write_text("not the demo's marker")
    before = _snapshot(out)
    code, stdout, err = run_cli("demo", out, "--device", "cpu")
    assert code == 2 and stdout == ""
    assert err == (f"error: {out} exists and was not written by `wsmerge demo`; pass --overwrite to replace "
                   f"it, or name another OUT (wsmerge demo OTHER_DIR)\n")
    assert _snapshot(out) == before and sorted(p.name for p in tmp_path.iterdir()) == ["mine"]
    (tmp_path / "file").write_text("x")
    code, _, err = run_cli("demo", tmp_path / "file")
    assert code == 2 and "is a file" in err
    code, stdout, err = run_cli("demo", out, "--device", "cpu", "--overwrite")
    assert code == 0, err
    assert stdout.startswith(f"replacing {out}/ (--overwrite)\n")
    assert not (out / "notes.txt").exists() and (out / "merges" / "ties").is_dir()


def test_demo_twice_in_the_same_folder_replaces_its_own_output(tmp_path, run_cli, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli("demo")
    assert code == 0, err
    assert "replacing" not in out
    (tmp_path / "wsmerge-demo" / "ties-again").mkdir()        # what the printed rerun command makes
    code, out, err = run_cli("demo")
    assert code == 0, err
    assert out.startswith("replacing the demo written earlier in wsmerge-demo/\n")
    assert not (tmp_path / "wsmerge-demo" / "ties-again").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["wsmerge-demo"]     # no temporary left


@pytest.mark.parametrize("relative", [True, False])
def test_demo_printed_commands_run_from_another_directory(tmp_path, run_cli, monkeypatch, relative):
    """The demo names its models relative to the specs (../models/base): the printed rerun and
    inspect commands work from a working directory that is not the demo's root."""
    here = tmp_path / "work"
    here.mkdir()
    monkeypatch.chdir(here)
    code, out, err = run_cli("demo", "demo" if relative else here / "demo", "--device", "cpu")
    assert code == 0, err
    assert "model: ../models/ft_a" in (here / "demo" / "specs" / "ties.yaml").read_text()
    rerun = re.search(r"rerun one with: (wsmerge .*)", out)[1]
    inspect = re.search(r"inspect a result with: (wsmerge .*)", out)[1]
    if not relative:                     # absolute paths: run them from anywhere
        monkeypatch.chdir(tmp_path)
    for line in (rerun, inspect):
        code, _, err = run_cli(*shlex.split(line)[1:])
        assert code == 0, (line, err)
    again = load_space(here / "demo" / "ties-again")
    ties = load_space(here / "demo" / "merges" / "ties")
    for n in ties:
        assert torch.equal(again[n].load(), ties[n].load())


# ---------------------------------------------------------------------------------------------
# 2. every example in every --help text parses, and those with inputs in the repo run

def _help_lines(path: tuple[str, ...], cmd: click.Command) -> list[str]:
    """Lines of the command's --help that start with `wsmerge`, continuation backslashes joined,
    the description after two spaces or a `#` cut off."""
    from weightspace.cli.options import CONTEXT_SETTINGS

    # the settings a real run inherits from `wsmerge` (click caches a command's help option)
    ctx = click.Context(cmd, info_name=" ".join(path), **CONTEXT_SETTINGS)
    lines, joined = cmd.get_help(ctx).splitlines(), []
    i = 0
    while i < len(lines):
        line = lines[i].strip()
        while line.endswith("\\") and i + 1 < len(lines):
            i += 1
            line = line[:-1].rstrip() + " " + lines[i].strip()
        if line.startswith("wsmerge "):
            joined.append(re.split(r"\s{2,}|\s#", line)[0])
        i += 1
    return joined


EXAMPLE_LINES = [(path, line) for path, cmd in COMMANDS for line in _help_lines(path, cmd)]


def _parse_only(argv: list[str]) -> str | None:
    """Why an example is parsed but not run here (None: it runs)."""
    if argv[:2] == ["zoo", "build"] and "--dry-run" not in argv:
        return "trains a whole example zoo (48-60 MLPs, 10-25 s on 2 cores); tests/test_zoo.py builds small ones"
    if argv[:2] in (["zoo", "metrics"], ["zoo", "show"], ["zoo", "find"]):
        return "needs runs/zoo from the zoo build above"
    if argv[0] == "generate":
        return ("needs runs/zoo-tasks from a zoo build and trains generators (about a minute); "
                "tests/test_generators.py runs train, sample and eval on a tiny zoo")
    if argv[0] == "upload" or "--push-to-hub" in argv:
        return "pushes to the Hugging Face Hub (network and a token); tests/test_hub.py uses a fake Hub"
    return None


def _make_context(argv: list[str]) -> click.Context:
    """Parse a command line as `wsmerge` would, down to the leaf command, without running it."""
    ctx = wsmerge.make_context("wsmerge", list(argv), resilient_parsing=False)
    cmd: click.Command = wsmerge
    while isinstance(cmd, click.Group):
        rest = [*getattr(ctx, "_protected_args", []), *ctx.args]
        name, sub, args = cmd.resolve_command(ctx, rest)
        ctx = sub.make_context(name, args, parent=ctx, resilient_parsing=False)
        cmd = sub
    return ctx


def test_help_examples_are_found_everywhere():
    leaves = {path for path, cmd in COMMANDS if not isinstance(cmd, click.Group)}
    with_examples = {path for path, _ in EXAMPLE_LINES}
    assert leaves <= with_examples, f"commands whose --help has no example: {sorted(leaves - with_examples)}"
    assert len(EXAMPLE_LINES) > 60


def test_every_help_example_parses_and_runs(tmp_path, run_cli, monkeypatch):
    """Each `wsmerge ...` line of every --help: click resolves all its options and arguments; it
    names only files the repository has (examples/...) and writes under runs/; and, in the order
    the help texts show them, it runs from a copy of examples/ unless `_parse_only` says why not."""
    shutil.copytree(EXAMPLES, tmp_path / "examples")
    monkeypatch.chdir(tmp_path)
    done: set[tuple[str, ...]] = set()
    ran, parsed = [], []
    for path, line in EXAMPLE_LINES:
        argv = shlex.split(line)[1:]
        where = f"{' '.join(path)} --help: {line}"
        for tok in argv:
            first = tok.split("/")[0]
            if "/" in tok and not tok.startswith("-"):
                assert first not in PACKAGES, f"{where}: {tok} is inside the Python package {first}/"
            if tok.startswith("examples/"):
                assert (REPO / tok).exists(), f"{where}: {tok} is not in the repository"
        if tuple(argv) in done:
            continue
        done.add(tuple(argv))
        why = _parse_only(argv)
        with monkeypatch.context() as m:
            m.delenv("WSMERGE_DEBUG", raising=False)
            if why is not None:       # inputs made by skipped commands do not exist here
                for _, cmd in COMMANDS:
                    for p in cmd.params:
                        if isinstance(p.type, click.Path) and p.type.exists:
                            m.setattr(p.type, "exists", False)
            try:
                ctx = _make_context(argv)
            except click.ClickException as e:
                pytest.fail(f"{where}: does not parse: {e.format_message()}")
        for name, value in ctx.params.items():
            param = next(p for p in ctx.command.params if p.name == name)
            given = ctx.get_parameter_source(name) == click.core.ParameterSource.COMMANDLINE
            if given and isinstance(param.type, click.Path) and value is not None:
                top = Path(value).parts[0]
                assert top in ("examples", "runs"), f"{where}: {value} is outside examples/ and runs/"
        if why is not None:
            parsed.append(line)
            continue
        code, out, err = run_cli(*argv)
        assert code == 0, f"{where}\nexit {code}: {err}"
        ran.append(line)
    assert len(ran) >= 40 and len(parsed) <= 20, (len(ran), parsed)


# ---------------------------------------------------------------------------------------------
# 9. zoo build reports progress while batches train, not only when they finish


def test_zoo_build_reports_progress_as_models_finish(tmp_path):
    from weightspace.zoo.build import build_zoo
    from weightspace.zoo.spec import parse_zoo_spec

    spec = parse_zoo_spec(ZOO_SPEC.replace("epochs: 1", "epochs: 3").replace("[4, 8]", "[4, 8, 6]"))
    events = []
    saved = []
    report = build_zoo(spec, tmp_path / "z", workers=1, progress=False, on_progress=events.append,
                       on_model=lambda row: saved.append(len(events)))
    assert report.trained == 6
    # 3 batches of 2 models x 3 epochs: every epoch of every batch, then each saved model
    assert [(e.models_done, e.epochs_done) for e in events] == [
        (0, 2), (0, 4), (0, 6), (1, 6), (2, 6), (2, 8), (2, 10), (2, 12), (3, 12), (4, 12),
        (4, 14), (4, 16), (4, 18), (5, 18), (6, 18)]
    assert all(e.models_total == 6 and e.epochs_total == 18 for e in events)
    assert saved[0] < len(events) / 2                    # the first models are saved early
    assert [e.seconds for e in events] == sorted(e.seconds for e in events)


def test_zoo_build_progress_comes_from_worker_processes_while_they_train(tmp_path):
    from weightspace.zoo.build import build_zoo
    from weightspace.zoo.spec import parse_zoo_spec

    spec = parse_zoo_spec(ZOO_SPEC.replace("epochs: 1", "epochs: 30"))
    events = []
    build_zoo(spec, tmp_path / "z", workers=2, progress=False, on_progress=events.append)
    before_first_save = [e for e in events if e.models_done == 0]
    assert before_first_save and before_first_save[-1].epochs_done >= 1    # epochs arrived from a worker
    assert events[-1].models_done == 4 and events[-1].epochs_done == 120
    assert [e.epochs_done for e in events] == sorted(e.epochs_done for e in events)


# ---------------------------------------------------------------------------------------------
# 10. the dry run's peak memory is the plan's own, capped by the prefetch budget


def test_dry_run_peak_memory_is_the_plans_own(tmp_path, run_cli, monkeypatch):
    import weightspace.executor as ex
    from weightspace.merge import plan_merge
    from weightspace.spec import load_spec

    code, out, err = run_cli("run", EXAMPLES / "ties.yaml", "--dry-run", "--json")
    assert code == 0, err
    plan = json.loads(out)
    peak = plan["estimated_peak_tensor_bytes"]
    biggest = max(s["read_bytes"] for s in plan["steps"])
    # 161 KiB written from 645 KiB read: the figure is of that order, not the 256 MiB budget
    assert biggest < peak <= plan["read_bytes"] + plan["write_bytes"]
    assert peak < ex.DEFAULT_PREFETCH_BYTES / 100
    code, out, _ = run_cli("run", EXAMPLES / "ties.yaml", "--dry-run")
    assert f"peak memory    about {peak / 1024:.2f} KiB of tensors" in out

    # what the reader really holds at once never exceeds the estimate
    held = []
    real_acquire = ex._ByteBudget.acquire

    def acquire(self, n):
        ok = real_acquire(self, n)
        held.append(self.used)
        return ok

    monkeypatch.setattr(ex._ByteBudget, "acquire", acquire)
    code, _, err = run_cli("run", EXAMPLES / "ties.yaml", tmp_path / "out", "--no-progress")
    assert code == 0, err
    assert 0 < max(held) <= peak

    # a plan bigger than the budget: the inputs are capped by it, the estimate stays bounded
    steps = plan_merge(load_spec(EXAMPLES / "ties.yaml"), spec_dir=EXAMPLES).steps
    loaded = [ex._loaded_bytes(s, torch.float32) for s in steps]
    budget = 3 * max(loaded)
    capped = ex.estimate_peak_bytes(steps, torch.float32, prefetch_bytes=budget)
    assert capped < ex.estimate_peak_bytes(steps, torch.float32)
    assert budget < capped <= budget + 6 * max(s.out_bytes for s in steps) + 2 * max(loaded)
    # a step larger than the budget is let through alone: never reported below its own inputs
    assert ex.estimate_peak_bytes(steps, torch.float32, prefetch_bytes=1) >= max(loaded)
