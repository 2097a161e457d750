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


def test_compare_fusionbench_help_names_the_cases_and_the_separate_virtualenv():
    r = subprocess.run([sys.executable, str(REPO / "benchmarks" / "compare_fusionbench.py"), "--help"],
                       capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stderr
    text = " ".join(r.stdout.split())
    assert "gpt2, llama40m, llama134m" in text and "regmean, fisher" in text
    assert '/tmp/fbvenv/bin/pip install "torch==2.13.0" "fusion-bench==0.2.33"' in text


def test_compare_fusionbench_refuses_an_unknown_case_before_running_anything(tmp_path):
    r = subprocess.run([sys.executable, str(REPO / "benchmarks" / "compare_fusionbench.py"), "--cases", "t5",
                        "--work", str(tmp_path)], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 2 and "unknown case(s) or method(s) ['t5']" in r.stderr
    assert not any(tmp_path.iterdir())
