"""The shape of the installed package: one import name, plug-in methods, layers that point one way.

    python -m pytest tests/test_layout.py
"""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = {"weightspace": "weightspace", "merges": "weightspace.merges", "zoo": "weightspace.zoo",
           "cli": "weightspace.cli"}


def _python(code: str, *, cwd: Path, pythonpath: list[Path]) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(map(str, pythonpath))}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """A wheel built from a copy of the tree (so no build/ or egg-info lands in the repository)."""
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    for folder in FOLDERS:
        shutil.copytree(ROOT / folder, src / folder, ignore=shutil.ignore_patterns("__pycache__"))
    dist = tmp_path_factory.mktemp("dist")
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                        "-q", "-w", str(dist), str(src)], capture_output=True, text=True, timeout=300)
    if r.returncode != 0 and "No module named" in r.stderr:
        pytest.skip(f"cannot build a wheel here: {r.stderr.strip().splitlines()[-1]}")
    assert r.returncode == 0, r.stderr
    return next(dist.glob("weightspace-*.whl"))


def test_the_wheel_installs_one_top_level_name_with_every_module(wheel, tmp_path):
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        z.extractall(tmp_path / "site")
    assert {n.split("/")[0] for n in names} == {"weightspace", "weightspace-0.1.0.dist-info"}
    for folder, package in FOLDERS.items():  # every source module is in the wheel, under the name
        for f in (ROOT / folder).rglob("*.py"):
            want = "/".join([*package.split("."), *f.relative_to(ROOT / folder).parts])
            assert want in names, f"{f.relative_to(ROOT)} is not in the wheel as {want}"
    entry = (tmp_path / "site" / "weightspace-0.1.0.dist-info" / "entry_points.txt").read_text()
    assert "wsmerge = weightspace.cli.main:entry" in entry
    assert "[weightspace.methods]\nbuiltin = weightspace.merges" in entry
    # imported from the unpacked wheel, away from the repository, the names work
    r = _python("""
        import weightspace.merges, weightspace.zoo.gen, weightspace.cli.main
        from weightspace.methods import all_methods
        print(weightspace.merges.__file__)
        print(len(all_methods()))
        """, cwd=tmp_path, pythonpath=[tmp_path / "site"])
    assert r.returncode == 0, r.stderr
    where, count = r.stdout.split()
    assert Path(where).is_relative_to(tmp_path / "site") and int(count) >= 13


def test_a_third_party_method_registers_through_the_entry_point_group(tmp_path, run_cli):
    plugin = tmp_path / "plugin"
    (plugin / "wsx_halve").mkdir(parents=True)
    (plugin / "wsx_halve" / "__init__.py").write_text(textwrap.dedent('''
        from weightspace.methods import MergeMethod, Param, register

        @register
        class Halve(MergeMethod):
            name = "halve"
            model_params = (Param("weight", default=1.0),)
            max_models = 1

            def merge(self, name, base, tensors, params, companions):
                return tensors[0] * 0.5
        '''))
    dist = plugin / "wsx_halve-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: wsx-halve\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[weightspace.methods]\nhalve = wsx_halve\n")
    r = _python("""
        from weightspace.cli.main import main
        raise SystemExit(main(["methods", "halve"]))
        """, cwd=tmp_path, pythonpath=[plugin])
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("halve  -  halve (no base model; 1 model(s))")


# ---------------------------------------------------------------------------------------------
# layers and import circles, read from the source (every import, also those inside functions,
# except `if TYPE_CHECKING:` blocks)

def _module_name(path: Path) -> str:
    folder = path.relative_to(ROOT).parts[0]
    parts = [*FOLDERS[folder].split("."), *path.relative_to(ROOT / folder).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, name: str) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skip: set[int] = set()
    for node in ast.walk(tree):  # imports only for type checkers are not dependencies at run time
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip |= {id(n) for b in node.body for n in ast.walk(b)}
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*up, *([base] if base else [])])
            found.add(base)
            found |= {f"{base}.{a.name}" for a in node.names}
    return {m for m in found if m.split(".")[0] == "weightspace"}


def _graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for folder in FOLDERS for p in (ROOT / folder).rglob("*.py")}
    return {name: {m for m in _imports(p, name) if m in files and m != name} for name, p in files.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_circles():
    assert _cycles(_graph()) == []


def test_layers_point_one_way():
    """cli -> merges, zoo -> the IR (weightspace/); a method never imports another method."""
    graph = _graph()
    ir = {m for m in graph if not m.startswith(("weightspace.merges", "weightspace.zoo", "weightspace.cli"))}
    for m in ir:
        up = sorted(d for d in graph[m] if d not in ir)
        assert not up, f"{m} (the IR) imports {up}"
    for m, deps in graph.items():
        if m.startswith(("weightspace.merges", "weightspace.zoo")):
            assert not [d for d in deps if d.startswith("weightspace.cli")], f"{m} imports the CLI"
        if m.startswith("weightspace.merges"):
            assert not [d for d in deps if d.startswith("weightspace.zoo")], f"{m} imports weightspace.zoo"
    from weightspace.methods import all_methods

    methods = {type(x).__module__ for x in all_methods().values()}
    owner = {m: next((p for p in methods if m == p or m.startswith(p + ".")), None) for m in graph}
    for m, deps in graph.items():
        if owner[m] is None:
            continue
        others = sorted({owner[d] for d in deps if owner[d] not in (None, owner[m])})
        assert not others, f"{m} imports the method module(s) {others}"


def test_tests_examples_and_benchmarks_import_the_installed_names():
    """From the repository root `merges`, `zoo` and `cli` would also import as folders; nothing
    here may rely on that, or a wheel install would break it."""
    bad = []
    for folder in ("tests", "examples", "benchmarks", *FOLDERS):
        for f in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
                names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                         [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
                bad += [f"{f.relative_to(ROOT)}: {n}" for n in names if n.split(".")[0] in ("merges", "zoo", "cli")]
    assert bad == []
