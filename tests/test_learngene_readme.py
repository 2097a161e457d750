"""The README's learngene tables are the script's tables of the committed results JSON
(examples/learngene_digits.py, benchmarks/results/learngene_digits.json), so the section
cannot drift from the committed numbers. Fast: nothing is trained."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SECTION = "## Learngene: grow networks of any depth from a gene"


def _example():
    spec = importlib.util.spec_from_file_location("learngene_digits", REPO / "examples" / "learngene_digits.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _section() -> str:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    start = text.index(SECTION)
    return text[start:text.index("\n## ", start + len(SECTION))]


def _runs() -> list[dict]:
    return json.loads((REPO / "benchmarks" / "results" / "learngene_digits.json").read_text())["runs"]


def test_readme_epoch_table_is_the_scripts():
    mod = _example()
    runs = _runs()
    assert [r["seed"] for r in runs] == [0, 1, 2]
    md = mod.table_by_epoch(runs, (0, 1, 2, 3, runs[0]["epochs"]))
    assert md in _section(), "README's epoch table differs from the script's output"


def test_readme_depth_rows_are_the_scripts():
    """Each `| init, epoch N | ...` row of the per-depth table is that init's row of the
    script's table after N epochs."""
    mod = _example()
    runs = _runs()
    rows = re.findall(r"^\| (.+?), epoch (\d+) \| (.+) \|$", _section(), flags=re.M)
    assert len(rows) >= 6
    for name, epoch, cells in rows:
        script = mod.table_by_depth(runs, int(epoch))
        assert f"| {name} | {cells} |" in script.splitlines(), f"{name}, epoch {epoch}"
