"""Which tensors a signature keeps (`select_layers`), from a `layer_report`.

The paper finds robust changes concentrated in the shallow layers, so a signature keeps
only those (the README's miniature measures for which corruptions that holds). Specs:
"all"; "first:K" (the first K layers of the main stack plus the tensors before the stack:
embeddings, stem; the authors' `--keep_num K`, tools.py `select_layers`); a glob or
`re:REGEX` on tensor names; "auto" (the shallowest whole layers holding at least `share`
of the total squared RWS norm).
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Mapping, Sequence
from typing import Any

from weightspace.errors import SpecError


def _layers_hint() -> str:
    return "use all, auto, first:K, a glob such as 'blocks.0.*' or re:REGEX"


def _parse_spec(spec: str) -> tuple[str, Any]:
    """("all"|"auto"|"first"|"glob"|"regex", argument); SpecError naming the spec when malformed."""
    if not isinstance(spec, str) or not spec.strip():
        raise SpecError(f"layers {spec!r}: empty layer selection; {_layers_hint()}")
    s = spec.strip()
    if s in ("all", "auto"):
        return s, None
    if s.startswith("first:"):
        k = s[len("first:"):].strip()
        if not k.isdigit() or int(k) < 1:
            raise SpecError(f"layers {spec!r}: K in first:K must be a whole number >= 1")
        return "first", int(k)
    if s.startswith("re:"):
        try:
            return "regex", re.compile(s[3:])
        except re.error as e:
            raise SpecError(f"layers {spec!r}: not a valid regular expression ({e})") from None
    return "glob", s


def select_layers(report: Sequence[Mapping[str, Any]], spec: str, share: float = 0.5) -> list[str]:
    """The tensor names a signature keeps, in report order.

        select_layers(report, "first:2")        # tensors before the stack + layers 0 and 1
        select_layers(report, "auto", share=0.5)
        select_layers(report, "blocks.0.*")     # glob on names; "re:^blocks\\.[01]\\." for a regex

    "all": every tensor. "first:K": every tensor whose depth position is before layer K
    of the main stack: the pre-stack non-layer tensors (embeddings, stem) and layers
    0..K-1 (a layer of a second stack counts at the same relative depth); K may not
    exceed the number of layers. A glob (fnmatch) or `re:REGEX` (searched) on names.
    "auto": walk the layers from shallow to deep, whole layers at a time (the pre-stack
    tensors first, the head and final norm last), and keep the shallowest ones whose
    squared RWS norms add up to at least `share` of the model's total; shares
    are of ||RWS||^2, so they add across tensors. Models without a recognised layer
    stack have only two depth groups (pre-stack, everything else): use a pattern there.
    """
    kind, arg = _parse_spec(spec)
    _check_share(share)
    rows = list(report)
    if kind == "all":
        names = [r["name"] for r in rows]
    elif kind == "glob":
        names = [r["name"] for r in rows if fnmatch.fnmatchcase(r["name"], arg)]
    elif kind == "regex":
        names = [r["name"] for r in rows if arg.search(r["name"])]
    elif kind == "first":
        names = _first_layers(rows, spec, arg)
    else:
        names = _shallowest_share(rows, spec, share)
    if not names:
        raise SpecError(f"layers {spec!r} selects no tensor; {_layers_hint()}")
    return names


def _check_share(share: Any) -> None:
    if isinstance(share, bool) or not (isinstance(share, (int, float)) and 0 < share <= 1):
        raise SpecError(f"share must be in (0, 1], got {share!r}")


def _first_layers(rows: Sequence[Mapping[str, Any]], spec: str, k: int) -> list[str]:
    """"first:K": the names whose depth position is before layer K of the main stack."""
    layers = {float(r["position"]) for r in rows if r.get("layer") is not None}
    if not layers:
        raise SpecError(f"layers {spec!r}: the model has no layer stack this project recognises "
                        f"(model.layers.N, blocks.N, h.N, ...); select tensors with a pattern")
    num_layers = int(max(layers)) + 1
    if k > num_layers:
        raise SpecError(f"layers {spec!r}: the model has only {num_layers} layers")
    return [r["name"] for r in rows if float(r["position"]) < k]


def _shallowest_share(rows: Sequence[Mapping[str, Any]], spec: str, share: float) -> list[str]:
    """"auto": whole layers, shallow first, until they hold `share` of the total ||RWS||^2."""
    total = sum(r["rws_norm"] ** 2 for r in rows)
    if total <= 0:
        raise SpecError(f"layers {spec!r}: the robust weight signature is zero everywhere (the robust "
                        f"change is parallel to the clean change); there is nothing to keep")
    by_pos: dict[float, list[str]] = {}
    mass: dict[float, float] = {}
    for r in rows:
        p = float(r["position"])
        by_pos.setdefault(p, []).append(r["name"])
        mass[p] = mass.get(p, 0.0) + r["rws_norm"] ** 2
    chosen: set[str] = set()
    acc = 0.0
    for p in sorted(by_pos):
        chosen.update(by_pos[p])
        acc += mass[p]
        if acc >= share * total * (1 - 1e-12):
            break
    return [r["name"] for r in rows if r["name"] in chosen]
