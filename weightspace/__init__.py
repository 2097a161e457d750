"""weightspace: a model-merging and weight-space toolbox.

    from weightspace import load_space
    base, ft = load_space("./base"), load_space("./ft")
    (base + (ft - base) * 0.5).save("./halfway")      # streamed, tensor by tensor

Everything installs under this one name: the IR and I/O here, the merge methods in
`weightspace.merges`, model zoos and weight generators in `weightspace.zoo`, the `wsmerge`
commands in `weightspace.cli`. The names below are imported on first use, so `import
weightspace` (and `wsmerge --help`) does not pay for torch until something needs it.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "WeightspaceError": "weightspace.errors", "SpecError": "weightspace.errors",
    "InputError": "weightspace.errors", "NonFiniteError": "weightspace.errors",
    "TensorRef": "weightspace.ir", "SafetensorsRef": "weightspace.ir", "MemoryRef": "weightspace.ir",
    "ExprRef": "weightspace.ir", "WeightSpace": "weightspace.ir", "task_vector": "weightspace.ir",
    "load_space": "weightspace.sources",
    "merge_state_dicts": "weightspace.api", "merge_tensors": "weightspace.api",
    "LayerName": "weightspace.structure", "Structure": "weightspace.structure",
    "parse_layer": "weightspace.structure", "structure_of": "weightspace.structure",
}  # fmt: skip

__all__ = ["__version__", *sorted(_EXPORTS)]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'weightspace' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
