"""Every `wsmerge ...` example in every --help text parses, and those whose inputs are in the
repository run."""

from __future__ import annotations

import re
import shlex
import shutil
from pathlib import Path

import click
import pytest
from _cli_helpers import COMMANDS, EXAMPLES, REPO
from conftest import missing_extra

from weightspace.cli.main import wsmerge

PACKAGES = {"cli", "merges", "tests", "weightspace", "zoo", "benchmarks", "docs"}


# ---------------------------------------------------------------------------------------------
# every example in every --help text parses, and those with inputs in the repo run

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
    if "--plot" in argv and (why := missing_extra("plot")):
        return f"draws a plot, and this install {why}"
    if (argv[0] == "eval" or "examples/eval/linear.yaml" in argv) and (why := missing_extra("hf")):
        return f"runs a transformers model, and this install {why}"
    if (argv[0] == "evolve" or "runs/evolve/best.yaml" in argv) and (why := missing_extra("evolve")):
        # `show` and `run best.yaml` read the search before them
        return f"searches with CMA-ES (cma), and this install {why}"
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
    # examples held back only because an extra is missing here count as run
    by_extra = sum("this install needs the" in (_parse_only(shlex.split(line)[1:]) or "") for line in parsed)
    assert len(ran) + by_extra >= 40 and len(parsed) - by_extra <= 20, (len(ran), parsed)
