"""Outputs never replace, hold or lie inside an input; what a killed run left is cleaned up by
the next run of the same output; SIGHUP aborts like SIGTERM; long output names work.

Each case builds its fixtures in tmp_path and checks, besides the exit code and the message,
that every input file is byte for byte as it was.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from _cli_helpers import EXAMPLES, REPO

from weightspace.errors import SpecError
from weightspace.files import _HOST, check_disjoint, clean_stale, temp_sibling


def _snapshot(root: Path) -> dict[str, str]:
    """Every file under root (hidden ones too) -> sha256 of its bytes."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _linear_spec(tmp: Path, a: Path, b: Path, name: str = "spec.yaml") -> Path:
    spec = tmp / name
    spec.write_text(textwrap.dedent(f"""\
        merge_method: linear
        models:
          - model: {a}
            parameters: {{weight: 0.5}}
          - model: {b}
            parameters: {{weight: 0.5}}
        dtype: float32
        """))
    return spec


# ---------------------------------------------------------------------------------------------
# 1. --overwrite never destroys an input


def test_run_refuses_every_output_that_is_holds_or_lies_in_an_input(tiny_models, run_cli):
    root = tiny_models.root
    spec = _linear_spec(root, tiny_models.ft_a, tiny_models.ft_b)
    link = root / "link-to-ft_a"
    link.symlink_to(tiny_models.ft_a, target_is_directory=True)
    before = _snapshot(root)
    cases = [
        (tiny_models.ft_a, "is the input"),                  # an input model
        (link, "is the input"),                              # a symlink to one
        (tiny_models.ft_a / "merged", "lies inside the input"),
        (root / "models", "contains the input"),             # the models' parent folder
        (root, "contains the input"),                        # holds the spec and the models
    ]
    for out, why in cases:
        code, _, err = run_cli("run", spec, out, "--overwrite")
        assert code == 2, (out, err)
        assert err.startswith(f"error: output {out} {why} "), err
        assert err.count("\n") == 1
        assert _snapshot(root) == before, out
        assert not [p for p in out.parent.iterdir() if ".wsmerge-" in p.name]
    # a sibling folder is an ordinary output
    code, _, err = run_cli("run", spec, root / "merged")
    assert code == 0, err


@pytest.mark.requires("hf")  # building the output tokenizer reads it with transformers
def test_run_refuses_an_output_that_is_the_tokenizer_source(tiny_models, run_cli):
    root = tiny_models.root
    from test_tokenizer_merge import write_tokenizer

    write_tokenizer(tiny_models.base, [f"t{i}" for i in range(60)])
    spec = root / "spec.yaml"
    spec.write_text(textwrap.dedent(f"""\
        merge_method: linear
        models:
          - model: {tiny_models.ft_a}
            parameters: {{weight: 0.5}}
          - model: {tiny_models.ft_b}
            parameters: {{weight: 0.5}}
        tokenizer_source: {tiny_models.base}
        """))
    before = _snapshot(root)
    code, _, err = run_cli("run", spec, tiny_models.base, "--overwrite")
    assert code == 2 and f"output {tiny_models.base} is the input" in err, err
    assert _snapshot(root) == before


def test_a_multi_stage_output_may_not_replace_what_an_earlier_stage_reads(tiny_models, run_cli):
    root = tiny_models.root
    spec = root / "stages.yaml"
    spec.write_text(textwrap.dedent(f"""\
        name: mid
        merge_method: linear
        models:
          - {{model: {tiny_models.ft_a}, parameters: {{weight: 0.5}}}}
          - {{model: {tiny_models.ft_b}, parameters: {{weight: 0.5}}}}
        ---
        merge_method: linear
        models:
          - {{model: mid, parameters: {{weight: 0.5}}}}
          - {{model: {tiny_models.base}, parameters: {{weight: 0.5}}}}
        """))
    before = _snapshot(root)
    # the last stage reads only `mid` and base: ft_a is read by the first stage alone
    code, _, err = run_cli("run", spec, tiny_models.ft_a, "--overwrite")
    assert code == 2, err
    assert f"output {tiny_models.ft_a} is the input" in err
    assert _snapshot(root) == before
    assert not [p for p in tiny_models.ft_a.parent.iterdir() if ".wsmerge-" in p.name]


@pytest.fixture
def digits(tmp_path: Path) -> Path:
    """Copies of the committed digits models (a refusal test must never aim at the repository)."""
    d = tmp_path / "digits"
    for name in ("base", "ft0", "ft1"):
        shutil.copytree(EXAMPLES / "digits" / name, d / name)
    return d


def test_every_command_that_writes_refuses_an_input_as_its_output(digits, tiny_models, run_cli, tmp_path):
    sig = tmp_path / "x.rws.safetensors"
    sig.write_bytes(b"\0" * 16)
    gene = tmp_path / "g.gene"
    gene.mkdir()
    ft0, ft1, base = digits / "ft0", digits / "ft1", digits / "base"
    single = digits / "ft1.safetensors"  # a model as one file
    shutil.copyfile(ft1 / "model.safetensors", single)
    cases = [
        (["align", ft0, ft1, "-o", ft1], ft1, "is the input"),
        (["align", ft0, ft1, "-o", digits], digits, "contains the input"),
        (["fisher", ft0, "--data", "digits", "-o", ft0 / "model.safetensors"], ft0 / "model.safetensors",
         "lies inside the input"),
        (["gram", ft0, "--data", "digits", "-o", ft0 / "x.gram.safetensors"], ft0 / "x.gram.safetensors",
         "lies inside the input"),
        (["atlas", "learn", "--base", base, "--task-vectors", ft0, ft1, "--data", "digits",
          "-o", base / "model.safetensors"], base / "model.safetensors", "lies inside the input"),
        (["rws", "extract", "--pretrained", base, "--clean", ft0, "--robust", ft1, "-o", ft1 / "model.safetensors"],
         ft1 / "model.safetensors", "lies inside the input"),
        (["rws", "extract", "--pretrained", base, "--clean", ft0, "--robust", single, "-o", single],
         single, "is the input"),
        (["rws", "patch", ft0, sig, "-o", ft0], ft0, "is the input"),
        (["rws", "patch", ft0, sig, "-o", tmp_path], tmp_path, "contains the input"),
        (["learngene", "fit", tiny_models.base, "-o", tiny_models.base], tiny_models.base, "is the input"),
        (["learngene", "train", "--teacher", base, "--data", "digits", "-o", base / "g"], base / "g",
         "lies inside the input"),
        (["learngene", "expand", gene, "--depth", "3", "-o", gene], gene, "is the input"),
        (["generate", "sample", gene, "--data", "digits", "-n", "1", "-o", gene], gene, "is the input"),
    ]
    before = _snapshot(tmp_path)
    for args, out, why in cases:
        code, _, err = run_cli(*args, "--overwrite")
        assert code == 2, (args, err)
        assert f"output {out} {why} " in err, (args, err)
        assert _snapshot(tmp_path) == before, args


def test_check_disjoint_compares_resolved_paths_and_ignores_what_does_not_exist(tmp_path):
    model = tmp_path / "m"
    model.mkdir()
    (model / "model.safetensors").write_bytes(b"x")
    check_disjoint(tmp_path / "out", [model])                  # a sibling
    check_disjoint(tmp_path, ["org/name", tmp_path / "gone"])  # a Hub id, a missing path: nothing to harm
    with pytest.raises(SpecError, match="is the input"):
        check_disjoint(tmp_path / "m" / ".." / "m", [model])
    with pytest.raises(SpecError, match="contains the input"):
        check_disjoint(tmp_path, [model / "model.safetensors"])
    with pytest.raises(SpecError, match="lies inside the input"):
        check_disjoint(model / "sub" / "out", [model])


# ---------------------------------------------------------------------------------------------
# 9. what a killed run left is removed by the next run; SIGHUP aborts cleanly


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_run_removes_the_temporary_outputs_of_dead_runs_and_only_those(tiny_models, run_cli):
    root = tiny_models.root
    spec = _linear_spec(root, tiny_models.ft_a, tiny_models.ft_b)
    out = root / "merged"
    dead = _dead_pid()
    stale = root / f".merged.wsmerge-{_HOST}-{dead}-0-0123abcd"          # kill -9 left it
    stale_stages = root / f".merged.wsmerge-stages-{_HOST}-{dead}-0-4567abcd"
    live = root / f".merged.wsmerge-{_HOST}-{os.getpid()}-0-89abcdef"     # a run in progress
    other_host = root / f".merged.wsmerge-000000-{dead}-0-0123abcd"       # another machine's (NFS)
    other_out = root / f".other.wsmerge-{_HOST}-{dead}-0-0123abcd"         # another output's
    for d in (stale, stale_stages, live, other_host, other_out):
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"\0" * 1024)
    code, _, err = run_cli("run", spec, out)
    assert code == 0, err
    assert not stale.exists() and not stale_stages.exists()
    assert live.exists() and other_host.exists() and other_out.exists()


def test_an_output_moved_aside_by_a_killed_run_is_put_back(tmp_path):
    out = tmp_path / "merged"
    old = tmp_path / f".merged.wsmerge-old-{_HOST}-{_dead_pid()}-0-0123abcd"
    old.mkdir()
    (old / "config.json").write_text("{}")
    with pytest.warns(UserWarning, match="restored"):
        assert clean_stale(out) == [old]
    assert (out / "config.json").read_text() == "{}" and not old.exists()


def test_stale_temporary_files_of_a_file_output_are_removed(tmp_path):
    target = tmp_path / "a.fisher.safetensors"
    stale = tmp_path / f".a.fisher.safetensors.wsmerge-{_HOST}-{_dead_pid()}-0-0123abcd.tmp"
    stale.write_bytes(b"\0" * 64)
    from weightspace.files import atomic_file

    with atomic_file(target) as tmp:
        assert tmp.name.startswith(".a.fisher.safetensors.wsmerge-") and str(os.getpid()) in tmp.name
        tmp.write_bytes(b"ok")
    assert target.read_bytes() == b"ok" and not stale.exists()


_SLOW_RUN = """
import sys, time
from weightspace import executor
from weightspace.sink import CheckpointSink
write, compute, calls = CheckpointSink.write, executor._Run.compute, []
def wrote(self, name, tensor):
    write(self, name, tensor)
    print("WROTE", flush=True)
def slow(self, s, ts):  # the second tensor takes 30 s, in the main thread, as a long merge does
    calls.append(1)
    if len(calls) == 2:
        time.sleep(30)
    return compute(self, s, ts)
CheckpointSink.write, executor._Run.compute = wrote, slow
from weightspace.cli.main import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("how", ["SIGHUP", "SIGKILL"])
def test_a_run_stopped_mid_write_leaves_nothing_after_the_next_run(tiny_models, run_cli, how):
    """SIGHUP (a dropped terminal) aborts like SIGTERM: exit 130, no temporary directory. After
    kill -9 the temporary directory stays, and the next run of the same output removes it."""
    root = tiny_models.root
    spec = _linear_spec(root, tiny_models.ft_a, tiny_models.ft_b)
    out = root / "merged"
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_RUN, "run", str(spec), str(out), "--no-progress"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO)
    try:
        assert proc.stdout.readline() == b"WROTE\n"
        temps = [p for p in root.iterdir() if p.name.startswith(".merged.wsmerge-")]
        assert len(temps) == 1 and str(proc.pid) in temps[0].name
        proc.send_signal(getattr(signal, how))
        _, err = proc.communicate(timeout=20)
    finally:
        proc.kill()
    left = [p for p in root.iterdir() if p.name.startswith(".merged.wsmerge-")]
    if how == "SIGHUP":
        assert proc.returncode == 130, err
        assert b"interrupted; nothing was written" in err
        assert left == []
    else:
        assert proc.returncode == -signal.SIGKILL and left == temps
    assert not out.exists()
    code, _, err = run_cli("run", spec, out)
    assert code == 0, err
    assert [p for p in root.iterdir() if ".wsmerge-" in p.name] == []


# ---------------------------------------------------------------------------------------------
# 10. a legal output name of any length


def test_a_250_character_output_name_is_written(tiny_models, run_cli):
    root = tiny_models.root
    spec = _linear_spec(root, tiny_models.ft_a, tiny_models.ft_b)
    out = root / ("m" * 250)
    code, _, err = run_cli("run", spec, out)
    assert code == 0, err
    assert (out / "model.safetensors").is_file()
    # temp names stay within the 255-byte limit, and still name their output's start and owner
    name = temp_sibling(out, kind="old").name
    assert len(name.encode()) < 255 and name.startswith(".mmmm") and f"-{os.getpid()}-" in name
    # and the cleanup finds them again
    dead = temp_sibling(out).name.replace(f"-{os.getpid()}-", f"-{_dead_pid()}-")
    (root / dead).mkdir()
    assert clean_stale(out) == [root / dead]


def test_a_zoo_is_not_built_into_the_model_it_fine_tunes(digits, run_cli):
    spec = digits / "zoo.yaml"
    spec.write_text(textwrap.dedent(f"""\
        name: ft
        dataset: digits
        arch: {{arch: mlp, depth: 1, width: 16}}
        init: {digits / 'base'}
        train: {{epochs: 1, batch_size: 128}}
        grid: {{seed: [0]}}
        """))
    before = _snapshot(digits)
    for out, why in ((digits / "base", "is the input"), (digits / "base" / "zoo", "lies inside the input")):
        code, _, err = run_cli("zoo", "build", spec, "-o", out, "--no-progress")
        assert code == 2 and f"output {out} {why} " in err, err
    assert _snapshot(digits) == before


def test_a_killed_build_s_temporary_model_folder_goes_and_a_live_one_stays(tmp_path):
    from weightspace.zoo.store import CATALOG, Zoo, write_catalog

    root = tmp_path / "z"
    models = root / "models"
    models.mkdir(parents=True)
    write_catalog(root / CATALOG, [])
    dead = models / f".m1.wsmerge-{_HOST}-{_dead_pid()}-0-0123abcd"
    live = models / f".m2.wsmerge-{_HOST}-{os.getpid()}-0-0123abcd"
    for d in (dead, live):
        (d / "epoch-001").mkdir(parents=True)
    Zoo(root)                      # read-only: changes nothing
    assert dead.exists() and live.exists()
    Zoo(root, write=True)          # a build opens it for writing
    assert not dead.exists() and live.exists()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_worker_s_temporary_name_records_its_own_process():
    """The owner's start time is read when the name is made, so a forked child's temporary
    output counts as live while the child runs (and is not removed), and as stale after."""
    from weightspace.files import _TEMP_RE, _alive

    names, go = os.pipe(), os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: make a name, hand it over, wait to be let go
        os.write(names[1], temp_sibling(Path("/x/out")).name.encode())
        os.read(go[0], 1)
        os._exit(0)
    name = os.read(names[0], 4096).decode()
    m = _TEMP_RE.match(name)
    assert m and int(m["pid"]) == pid
    assert _alive(pid, int(m["start"]))      # the child runs: its work is kept
    os.write(go[1], b"x")
    os.waitpid(pid, 0)
    assert not _alive(pid, int(m["start"]))  # it has exited: a later run may remove it
    for fd in (*names, *go):
        os.close(fd)
