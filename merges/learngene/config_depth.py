"""The depth in a model's config.json: which key holds it, and a copy set to another depth.

    find_depth_key({"model_type": "bert", "num_hidden_layers": 6}, 6)         # "num_hidden_layers"
    config_with_depth(cfg, "num_hidden_layers", 12, 6)["num_hidden_layers"]   # 12

The keys: `num_hidden_layers` (BERT, Llama), `n_layer` (GPT-2),
`num_layers`/`n_layers`, or `arch.depth` for zoo models; a per-layer
`layer_types` list is resampled to the new depth.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

# config.json keys holding the depth of the stack, tried in this order
DEPTH_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")
ZOO_DEPTH_KEY = "arch.depth"


def find_depth_key(config: Mapping[str, Any] | None, depth: int) -> str | None:
    """Where `config` stores the stack depth: "arch.depth" (zoo), or the first of DEPTH_KEYS
    whose value is `depth`; None when there is no such key."""
    if not isinstance(config, Mapping):
        return None
    arch = config.get("arch")
    if config.get("model_type") == "weightspace-zoo" and isinstance(arch, Mapping):
        return ZOO_DEPTH_KEY if arch.get("depth") == depth else None
    for k in DEPTH_KEYS:
        v = config.get(k)
        if isinstance(v, int) and not isinstance(v, bool) and v == depth:
            return k
    return None


def config_with_depth(config: Mapping[str, Any] | None, depth_key: str | None, depth: int,
                      source_depth: int) -> dict[str, Any] | None:
    """A copy of `config` for a `depth`-layer network: the depth key set, and a per-layer
    `layer_types` list (length source_depth) resampled by relative depth."""
    if config is None:
        return None
    cfg = copy.deepcopy(dict(config))
    if depth_key == ZOO_DEPTH_KEY:
        cfg["arch"] = {**cfg["arch"], "depth": depth}
    elif depth_key is not None:
        cfg[depth_key] = depth
    types = cfg.get("layer_types")
    if isinstance(types, list) and len(types) == source_depth and source_depth > 0:
        cfg["layer_types"] = [types[min(source_depth - 1, (i * source_depth) // depth)] for i in range(depth)]
    return cfg
