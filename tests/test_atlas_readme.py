"""The README's aTLAS tables are the script's tables of the committed results JSON
(examples/atlas_digits.py, benchmarks/results/atlas_digits.json), so the section cannot drift
from the committed numbers. Fast: nothing is trained."""

from __future__ import annotations

import json
import re

from _examples import committed_results, load_example, readme_section

SECTION = "## aTLAS: learned anisotropic scaling of task vectors"


def test_readme_tables_are_the_scripts_tables_of_the_committed_results():
    mod = load_example("atlas_digits")
    committed = committed_results("atlas_digits")
    summary = mod.summarise(committed["per_seed"])
    assert json.loads(json.dumps(summary)) == committed["summary"]      # the JSON is self-consistent
    section = readme_section(SECTION)
    for part in ("task_addition", "test_time"):
        assert mod.format_table(summary[part]) in section, part
    assert mod.format_gaps(mod.paired_gaps(committed["per_seed"])) in section


def test_readme_few_shot_table_is_the_summary():
    """The few-shot table (k as columns) holds the summary's five-target means for each k."""
    mod = load_example("atlas_digits")
    rows = {r["method"]: r["avg"] for r in mod.summarise(committed_results("atlas_digits")["per_seed"])["few_shot"]}
    section = readme_section(SECTION)
    for label in ("best epoch on val", "last epoch"):
        line = re.search(rf"^\| aTLAS, {label} \| (.+) \|$", section, flags=re.M)
        assert line, label
        cells = [c.strip() for c in line.group(1).split("|")]
        want = [f"{rows[f'aTLAS k={k} ({label})']['mean']:.3f} ± {rows[f'aTLAS k={k} ({label})']['std']:.3f}"
                for k in mod.SHOTS]
        assert cells == want, label
