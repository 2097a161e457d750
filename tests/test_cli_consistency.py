"""The wsmerge commands behave alike: -v, --device, error style, -o, the demo, zoo build
progress and the dry-run's memory figure. Interrupts are in test_cli_interrupts.py, the --help
examples in test_cli_help_examples.py."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
import torch
from _cli_helpers import COMMANDS, EXAMPLES, ZOO_SPEC, _digits

from weightspace import load_space


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------------------------
# -v/--verbose after any command; --device: one option, default auto, everywhere


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
    assert {" ".join(p[1:]) for p in devices} == {"run", "demo", "atlas learn", "learngene train", "moe",
                                                 "lora merge", "lora extract", "fisher", "gram", "eval"}


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
    # the training commands take `auto` like run does
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
# one error style, click's usage errors included


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
# run takes OUT as an argument or as -o, like every other command


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
# demo refuses what it did not write, and its printed commands work


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
# zoo build reports progress while batches train, not only when they finish


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
# the dry run's peak memory is the plan's own, capped by the prefetch budget


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


def test_the_top_level_help_names_every_command():
    from weightspace.cli.main import wsmerge

    text = " ".join((wsmerge.help or "").split())
    missing = [name for name in wsmerge.commands if not re.search(rf"\b{re.escape(name)}\b", text)]
    assert not missing, f"wsmerge --help does not mention: {missing}"
