"""The benchmark scripts' command lines parse and explain themselves (they are not run here)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_bench_merge_help_lists_the_cases_and_methods():
    r = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_merge.py"), "--help"],
                       capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stderr
    text = " ".join(r.stdout.split())
    assert "fp32-sparse50 (float32, 50% zero)" in text
    assert "breadcrumbs_ties" in text and "model_stock" in text


def test_bench_merge_refuses_an_unknown_case():
    r = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_merge.py"), "--cases", "fp64",
                        "--no-wsmerge", "--no-floor", "--no-startup"], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 2 and "unknown case(s) ['fp64']" in r.stderr
