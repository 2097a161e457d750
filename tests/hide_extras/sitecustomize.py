"""Make the packages named in WSMERGE_TEST_HIDE unimportable, as if they were not installed.

    WSMERGE_TEST_HIDE=transformers,matplotlib python -m pytest -q

tests/conftest.py runs this file in the test process and puts its folder first on PYTHONPATH,
so every Python the tests start (`python -m weightspace.cli.main`, spawned zoo workers) runs it at start-up
as its `sitecustomize` and hides the same packages: a test that needs an optional package and
does not skip fails here, as it would for a user without that extra.
"""

from __future__ import annotations

import os
import sys


def hidden_names() -> list[str]:
    """The top-level module names listed in WSMERGE_TEST_HIDE (comma-separated)."""
    return [n.strip() for n in os.environ.get("WSMERGE_TEST_HIDE", "").split(",") if n.strip()]


def hide(names: list[str]) -> None:
    # None in sys.modules is import's own "absent" mark: `import name` (and of any submodule)
    # raises ModuleNotFoundError and importlib.util.find_spec(name) returns None, exactly as
    # when the package is not installed. A meta-path finder that raises would break find_spec.
    for name in names:
        sys.modules[name] = None


hide(hidden_names())
