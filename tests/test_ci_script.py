"""`.ci/run` names tests to leave out of its hidden-extras pass: every name must still exist
(pytest ignores a --deselect that matches nothing, so a renamed test would silently run there
again, or a stale line would stay forever)."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_every_test_the_ci_script_leaves_out_exists():
    script = (REPO / ".ci" / "run").read_text(encoding="utf-8")
    ignored = re.findall(r"--ignore=(\S+)", script)
    deselected = [s.strip('"') for s in re.findall(r"--deselect (\S+)", script)]
    assert ignored and deselected
    for path in ignored:
        assert (REPO / path).is_file(), path
    for node in deselected:
        file, _, name = node.partition("::")
        assert re.search(rf"^def {re.escape(name)}\(", (REPO / file).read_text(encoding="utf-8"), re.M), node
