"""Where a layer sits in a network of any depth: TLEG's positions x_l and SWS's stages.

    [layer_position(l, 4) for l in range(4)]     # [0.0, 0.25, 0.5, 0.75]: theta_l = A + x_l B
    stage_sizes(7, 3), layer_stages([2, 3, 2])   # [3, 2, 2], [0, 0, 1, 1, 1, 2, 2]

Pure arithmetic on depths and counts, with the argument checks the rest of the
package shares; nothing here reads a tensor.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from weightspace.bounds import MAX_DEPTH
from weightspace.errors import SpecError

MODES = ("tleg", "sws")
DENOMINATORS = ("L", "L-1")
DEFAULT_STAGES = 3  # SWS stage count when none is given (fewer for shallower models)


def _check_mode(mode: Any) -> str:
    if mode not in MODES:
        raise SpecError(f"mode: unknown {mode!r}; use tleg (linear expansion) or sws (stage-wise sharing)")
    return str(mode)


def _check_denominator(denominator: Any) -> str:
    if denominator not in DENOMINATORS:
        raise SpecError(f"denominator must be 'L' (x_l = l/L, the authors' code) or 'L-1' "
                        f"(x_l = l/(L-1)), got {denominator!r}")
    return str(denominator)


def _check_depth(depth: Any, what: str = "depth") -> int:
    """A network depth: a whole number in 1..MAX_DEPTH, checked before any layer is made."""
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
        raise SpecError(f"{what} must be a whole number >= 1, got {depth!r}")
    if depth > MAX_DEPTH:
        raise SpecError(f"{what}: {depth:,} layers is more than the {MAX_DEPTH:,} weightspace builds")
    return depth


def layer_position(layer: int, depth: int, denominator: str = "L") -> float:
    """x_l of TLEG: l / L, or l / (L - 1) with denominator "L-1" (0 for a 1-layer network).

    >>> [layer_position(l, 4) for l in range(4)]
    [0.0, 0.25, 0.5, 0.75]
    >>> [layer_position(l, 4, "L-1") for l in range(4)]
    [0.0, 0.3333333333333333, 0.6666666666666666, 1.0]
    """
    d = depth if _check_denominator(denominator) == "L" else depth - 1
    return layer / d if d > 0 else 0.0


def stage_sizes(depth: int, stages: int | Sequence[int]) -> list[int]:
    """How many layers each stage gets: an explicit list (checked), or a count split evenly.

    >>> stage_sizes(7, 3), stage_sizes(12, 3), stage_sizes(7, [2, 3, 2]), stage_sizes(2, 3)
    ([3, 2, 2], [4, 4, 4], [2, 3, 2], [1, 0, 1])

    A count S splits `depth` as evenly as possible, the first depth % S stages taking
    one extra layer. With fewer layers than stages, layer l takes stage
    round(l (S-1) / (depth-1)): the first and last stages are kept and the ones between
    skipped evenly (2 layers over 3 stages: 1,0,1; 1 layer: stage 0). A list must add
    up to the depth (zeros allowed: a stage may be left out).
    """
    _check_depth(depth)
    if isinstance(stages, bool):
        raise SpecError(f"stages must be a count or a list of layer counts, got {stages!r}")
    if isinstance(stages, int):
        if stages < 1:
            raise SpecError(f"stages: the stage count must be >= 1, got {stages}")
        if stages > depth:
            sizes = [0] * stages
            for i in range(depth):
                sizes[math.floor(i * (stages - 1) / (depth - 1) + 0.5) if depth > 1 else 0] += 1
            return sizes
        base, extra = divmod(depth, stages)
        return [base + (1 if s < extra else 0) for s in range(stages)]
    sizes = list(stages)
    if not sizes or any(isinstance(n, bool) or not isinstance(n, int) or n < 0 for n in sizes):
        raise SpecError(f"stages {stages!r}: a list of whole layer counts >= 0 is needed, e.g. 2,3,2")
    if sum(sizes) != depth:
        raise SpecError(f"stages {','.join(map(str, sizes))} add up to {sum(sizes)} layers, but the "
                        f"network has {depth}; the stage list must cover every layer")
    return sizes


def _source_stages(depth: int, stages: int | Sequence[int] | None) -> list[int]:
    """The stage list a gene is fitted or trained with: every stage needs a layer."""
    sizes = stage_sizes(depth, stages if stages is not None else min(DEFAULT_STAGES, depth))
    if 0 in sizes:
        raise SpecError(f"stages {','.join(map(str, sizes))}: every stage needs at least one of the "
                        f"{depth} layers to fit or train its tensor; use at most {depth} stages")
    return sizes


def layer_stages(sizes: Sequence[int]) -> list[int]:
    """The stage of every layer: [2, 3, 2] -> [0, 0, 1, 1, 1, 2, 2]."""
    return [s for s, n in enumerate(sizes) for _ in range(n)]


def parse_stages(text: str | None) -> int | list[int] | None:
    """CLI form: "3" -> 3 (a count), "2,3,2" -> [2, 3, 2], None/"" -> None."""
    if text is None or not str(text).strip():
        return None
    parts = [p.strip() for p in str(text).split(",")]
    if not all(p.isdigit() for p in parts):
        raise SpecError(f"--stages {text!r}: give a stage count (3) or layer counts per stage (2,3,2)")
    return int(parts[0]) if len(parts) == 1 else [int(p) for p in parts]
