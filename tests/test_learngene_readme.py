"""The README's learngene tables are the script's tables of the committed results JSON
(examples/learngene_digits.py, benchmarks/results/learngene_digits.json), so the section
cannot drift from the committed numbers. Fast: nothing is trained."""

from __future__ import annotations

import re

from _examples import committed_results, load_example, readme_section

SECTION = "## Learngene: grow networks of any depth from a gene"


def _runs() -> list[dict]:
    return committed_results("learngene_digits")["runs"]


def test_readme_epoch_table_is_the_scripts():
    mod = load_example("learngene_digits")
    runs = _runs()
    assert [r["seed"] for r in runs] == [0, 1, 2]
    md = mod.table_by_epoch(runs, (0, 1, 2, 3, runs[0]["epochs"]))
    assert md in readme_section(SECTION), "README's epoch table differs from the script's output"


def test_readme_depth_rows_are_the_scripts():
    """Each `| init, epoch N | ...` row of the per-depth table is that init's row of the
    script's table after N epochs."""
    mod = load_example("learngene_digits")
    runs = _runs()
    rows = re.findall(r"^\| (.+?), epoch (\d+) \| (.+) \|$", readme_section(SECTION), flags=re.M)
    assert len(rows) >= 6
    for name, epoch, cells in rows:
        script = mod.table_by_depth(runs, int(epoch))
        assert f"| {name} | {cells} |" in script.splitlines(), f"{name}, epoch {epoch}"
