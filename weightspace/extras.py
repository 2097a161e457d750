"""Optional packages (the pip extras): imported when first needed, with one clear error otherwise.

    plt = pyplot()                                   # matplotlib.pyplot on the Agg backend
    ray = require("ray", "ray", "--executor ray needs Ray")
"""

from __future__ import annotations

import importlib
from types import ModuleType

from weightspace.errors import WeightspaceError


def require(module: str, extra: str, needed_for: str) -> ModuleType:
    """Import `module`, or raise `<needed_for>: pip install 'weightspace[<extra>]'`."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise WeightspaceError(f"{needed_for}: pip install 'weightspace[{extra}]'") from None


def pyplot() -> ModuleType:
    """matplotlib.pyplot on the non-interactive Agg backend; call it before the work a plot
    shows, so a missing extra is reported before anything is computed."""
    matplotlib = require("matplotlib", "plot", "plots need matplotlib")
    matplotlib.use("Agg")
    return importlib.import_module("matplotlib.pyplot")


__all__ = ["pyplot", "require"]
