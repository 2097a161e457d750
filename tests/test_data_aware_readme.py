"""The README's Fisher/RegMean miniature table is the committed results JSON
(examples/merge_digits.py, benchmarks/results/merge_digits.json), so the section cannot
drift from the committed numbers. Fast: nothing is trained."""

from __future__ import annotations

import json
import re

from _examples import REPO, committed_results, load_example

FAMILIES = ("classes", "rotations")
# README row label -> the script's method name
ALIASES = {"task arithmetic (λ on val)": "task arithmetic", "regmean α=0.1": "regmean alpha=0.1",
           "regmean α=1": "regmean alpha=1"}


def _signed(x: float) -> str:
    return f"{x:+.3f}".replace("-", "−")


def test_readme_table_is_the_committed_summary():
    mod = load_example("merge_digits")
    committed = committed_results("merge_digits")
    summaries = {}
    for fam in FAMILIES:
        got = mod.summarize(committed["families"][fam]["per_seed"])
        assert json.loads(json.dumps(got)) == committed["families"][fam]["summary"], fam  # self-consistent
        summaries[fam] = {m["method"]: m for m in got}
    n = len(committed["seeds"])
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    header = "| method | classes: joint | − average | > average | rotations: joint | − average | > average |"
    start = readme.index(header)
    rows = re.findall(r"^\| ([^|]+?) \| (.+) \|$", readme[start:readme.index("\n\n", start)], flags=re.M)[2:]
    assert len(rows) == 10
    for label, cells in rows:
        method = ALIASES.get(label, label)
        want = []
        for fam in FAMILIES:
            m = summaries[fam][method]
            want.append(f"{m['joint']['mean']:.3f} ± {m['joint']['std']:.3f}")
            if method == "average":
                want += ["", ""]
            else:
                want += [f"{_signed(m['minus_average']['mean'])} ± {m['minus_average']['std']:.3f}",
                         f"{m['beats_average']}/{n}"]
        assert [c.strip() for c in cells.split("|")] == want, label
