"""Helpers for the tests of the examples/ miniatures and of the README sections that report them.

    mod = load_example("rws_digits")                       # examples/rws_digits.py as a module
    section = readme_section("## Learngene: grow networks of any depth from a gene")
    results = committed_results("atlas_digits")            # benchmarks/results/atlas_digits.json
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def load_example(name: str) -> ModuleType:
    """examples/<name>.py, imported as a module (the examples are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(name, REPO / "examples" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def readme_section(heading: str) -> str:
    """The README from `heading` (a whole `## ...` line) up to the next `## ` heading."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    start = text.index(heading)
    return text[start:text.index("\n## ", start + len(heading))]


def committed_results(name: str) -> Any:
    """benchmarks/results/<name>.json as committed."""
    return json.loads((REPO / "benchmarks" / "results" / f"{name}.json").read_text(encoding="utf-8"))
