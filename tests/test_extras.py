"""Optional extras: the README's `.[dev]` installs them all, and without one the user gets a clear
message, a test skips naming it, and `WSMERGE_TEST_HIDE` (tests/conftest.py) hides it everywhere."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DIGITS_COEFFS = REPO / "examples/digits/atlas.coeffs.safetensors"


# extras the suite never needs, kept out of dev (and CI): lmeval (`wsmerge eval --lm-eval`; the tests
# fake its module)
NOT_IN_DEV = {"lmeval"}


def _requirements(extra: str, table: dict[str, list[str]]) -> set[str]:
    """The distribution names `extra` installs, self-references (`weightspace[a,b]`) expanded."""
    names: set[str] = set()
    for req in table[extra]:
        name, _, inner = re.match(r"([A-Za-z0-9_.-]+)(\[([^\]]*)\])?", req).groups()
        if name == "weightspace":
            for sub in inner.split(","):
                names |= _requirements(sub.strip(), table)
        else:
            names.add(name.lower().replace("_", "-"))
    return names


@pytest.mark.skipif(sys.version_info < (3, 11), reason="reads pyproject.toml with tomllib (3.11+)")
def test_dev_extra_installs_every_extra_and_the_test_tools():
    import tomllib
    from conftest import EXTRAS

    table = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    dev = _requirements("dev", table)
    for extra in table:
        if extra in NOT_IN_DEV:
            continue
        assert _requirements(extra, table) <= dev, f"the {extra} extra installs more than dev"
    assert {"pytest", "hypothesis", "ruff"} <= dev
    for extra, modules in EXTRAS.items():  # the tests' table names real extras and their packages
        assert {m.replace("_", "-") for m in modules} <= _requirements(extra, table), extra


def test_pythons_the_tests_start_hide_the_same_packages():
    env = dict(os.environ)  # under WSMERGE_TEST_HIDE, as tests/conftest.py left it for children
    if not env.get("WSMERGE_TEST_HIDE"):  # a plain run: hide two the way conftest would
        env.update(WSMERGE_TEST_HIDE="matplotlib,ray", PYTHONPATH=os.pathsep.join(
            p for p in (str(REPO / "tests/hide_extras"), env.get("PYTHONPATH")) if p))
    names = env["WSMERGE_TEST_HIDE"].split(",")
    code = ("import importlib, importlib.util, sys\n"
            f"names = {names!r}\n"
            "assert all(importlib.util.find_spec(n) is None for n in names)\n"
            "for n in names:\n"
            "    try:\n        importlib.import_module(n + '.sub')\n"
            "    except ModuleNotFoundError:\n        print(n)\n")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.split() == names, r.stderr


def test_require_extra_skips_naming_the_extra(monkeypatch, require_extra):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(pytest.skip.Exception, match=re.escape(
            "needs the plot extra (matplotlib not installed): pip install -e '.[plot]'")):
        require_extra("plot")
    with pytest.raises(pytest.UsageError, match="no such extra; known: hf, test-real, plot, ray"):
        require_extra("plots")


def test_plot_without_matplotlib_says_which_extra(monkeypatch, run_cli, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    code, out, err = run_cli("inspect", DIGITS_COEFFS, "--plot", tmp_path / "c.png")
    assert code == 1 and "plots need matplotlib: pip install 'weightspace[plot]'" in err
    assert not (tmp_path / "c.png").exists()
    assert out == ""  # refused before the table is computed and printed


def test_transformers_model_without_transformers_says_which_extra(monkeypatch, run_cli, tiny_models):
    monkeypatch.setitem(sys.modules, "transformers", None)
    out = tiny_models.root / "f.safetensors"
    code, _, err = run_cli("fisher", tiny_models.base, "--data", "digits", "-o", out)
    assert code == 1 and f"{tiny_models.base}: a transformers model needs the hf extra: " \
                          f"pip install 'weightspace[hf]'" in err
    assert not out.exists()


def test_ray_executor_without_ray_says_which_extra(monkeypatch, run_cli, tmp_path):
    monkeypatch.setitem(sys.modules, "ray", None)
    spec = tmp_path / "zoo.yaml"
    spec.write_text("name: z\ndataset: digits\narch: {arch: mlp, depth: 1}\ntrain: {epochs: 1}\n"
                    "grid: {width: [4], seed: [0]}\n")
    code, _, err = run_cli("zoo", "build", spec, "-o", tmp_path / "z", "--executor", "ray", "--no-progress")
    assert code == 1 and "--executor ray needs Ray: pip install 'weightspace[ray]'" in err
    assert not (tmp_path / "z").exists()  # refused before the zoo directory is made
