"""Permutation alignment by weight matching (Git Re-Basin; Ainsworth, Hayase & Srinivasa, ICLR 2023).

    a, b = load_space("./zoo/mlp_seed0"), load_space("./zoo/mlp_seed1")
    aligned, report = align(a, b)                  # arch from b's config.json: arch.arch
    aligned.save("./zoo/mlp_seed1_aligned", config=b.meta["config"])
    report["similarity_before"], report["similarity_after"], report["moved"]

Hidden units of a network can be reordered without changing what it
computes: permute the rows of one layer and the matching columns of the
next. Weight matching picks, for model B, the reordering that makes its
weights most similar to model A's (the largest sum of inner products
<W_A, P W_B Q^T> over every tensor), so that averaging A and aligned B
interpolates between networks whose units correspond.

A `PermutationSpec` says which permutation acts on which axis of each
tensor, as in the paper's code. It is derived from the tensor names (depth
from `weightspace.structure`) and checked against the shapes, for the zoo's
`mlp`, `cnn` and `resmlp` (`weightspace.zoo.arch`). Everything here holds whole models
in memory: it is for zoo-sized networks, not for streaming large ones.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from weightspace.errors import InputError
from weightspace.ir import WeightSpace
from weightspace.structure import structure_of

Axes = tuple[str | None, ...]

# An assignment replaces the current permutation only when it raises the
# objective by more than this fraction: ties and float noise never loop.
_REL_TOL = 1e-12


@dataclass(frozen=True)
class PermutationSpec:
    """`axes`: tensor name -> the permutation acting on each of its axes (None: not permuted).
    `sizes`: permutation name -> number of units it reorders.

        PermutationSpec(axes={"layers.0.weight": ("layers.0", None), "layers.0.bias": ("layers.0",),
                              "head.weight": (None, "layers.0"), "head.bias": (None,)},
                        sizes={"layers.0": 64})
    """

    axes: dict[str, Axes]
    sizes: dict[str, int]

    @property
    def perm_to_axes(self) -> dict[str, list[tuple[str, int]]]:
        """Permutation name -> every (tensor name, axis) it acts on."""
        out: dict[str, list[tuple[str, int]]] = {p: [] for p in self.sizes}
        for name, axes in self.axes.items():
            for axis, p in enumerate(axes):
                if p is not None:
                    out[p].append((name, axis))
        return out


def _chain_axes(depth: int, trailing: Axes) -> dict[str, Axes]:
    """mlp and cnn: layer i maps the units of layer i-1 (the input, unpermuted, for i=0) to its own."""
    axes: dict[str, Axes] = {}
    prev: str | None = None
    for i in range(depth):
        p = f"layers.{i}"
        axes[f"layers.{i}.weight"] = (p, prev, *trailing)
        axes[f"layers.{i}.bias"] = (p,)
        prev = p
    axes["head.weight"] = (None, prev)
    axes["head.bias"] = (None,)
    return axes


def _resmlp_axes(depth: int) -> dict[str, Axes]:
    """resmlp: one permutation of the residual stream everywhere it is read or written
    (stem output, each block's norm, fc1 input and fc2 output, the final norm, the head
    input); each block's hidden units get their own."""
    r = "residual"
    axes: dict[str, Axes] = {"stem.weight": (r, None), "stem.bias": (r,)}
    for i in range(depth):
        b, h = f"blocks.{i}", f"blocks.{i}.hidden"
        axes.update({
            f"{b}.norm.weight": (r,), f"{b}.norm.bias": (r,),
            f"{b}.fc1.weight": (h, r), f"{b}.fc1.bias": (h,),
            f"{b}.fc2.weight": (r, h), f"{b}.fc2.bias": (r,),
        })
    axes.update({"norm.weight": (r,), "norm.bias": (r,), "head.weight": (None, r), "head.bias": (None,)})
    return axes


# architecture -> (layer container whose count is the depth, axes builder)
FAMILIES: dict[str, tuple[str, Callable[[int], dict[str, Axes]]]] = {
    "mlp": ("layers", lambda depth: _chain_axes(depth, ())),
    "cnn": ("layers", lambda depth: _chain_axes(depth, (None, None))),
    "resmlp": ("blocks", _resmlp_axes),
}

_UNSUPPORTED = {
    "vit": "attention mixes units within heads, so its permutations must move whole heads "
           "together; weight matching for transformers is not implemented",
}


def _check_arch(arch: object) -> str:
    known = ", ".join(FAMILIES)
    if arch in _UNSUPPORTED:
        raise InputError(f"cannot permute-align architecture {arch!r}: {_UNSUPPORTED[str(arch)]}. "
                         f"Supported architectures: {known}")
    if arch not in FAMILIES:
        from weightspace.methods import suggest

        raise InputError(f"cannot permute-align architecture {arch!r}: unknown.{suggest(str(arch), list(FAMILIES))} "
                         f"Supported architectures: {known}")
    return str(arch)


def permutation_spec(arch: str, shapes: Mapping[str, tuple[int, ...]]) -> PermutationSpec:
    """The permutation spec of an `arch` model with these tensor names and shapes.

        permutation_spec("mlp", {n: r.shape for n, r in space.items()})

    Raises InputError naming the tensor when a name is missing or extra, or an
    axis does not have the size the permutation acting on it has elsewhere.
    """
    arch = _check_arch(arch)
    container, build = FAMILIES[arch]
    depth = structure_of(shapes).stacks.get(container, 0)
    if depth == 0:
        raise InputError(f"no {container}.N tensors found: these are not {arch!r} weights")
    axes = build(depth)
    extra = [n for n in shapes if n not in axes]
    if extra:
        raise InputError(f"tensor {extra[0]!r} is not part of architecture {arch!r}")
    missing = [n for n in axes if n not in shapes]
    if missing:
        raise InputError(f"tensor {missing[0]!r} is missing for architecture {arch!r} of depth {depth}")
    sizes: dict[str, int] = {}
    first: dict[str, str] = {}
    for name, ax in axes.items():
        shape = tuple(shapes[name])
        if len(shape) != len(ax):
            raise InputError(f"tensor {name!r} has shape {list(shape)}; architecture {arch!r} has "
                             f"{len(ax)} axes there")
        for axis, p in enumerate(ax):
            if p is None:
                continue
            if p not in sizes:
                sizes[p], first[p] = shape[axis], f"{name} axis {axis}"
            elif sizes[p] != shape[axis]:
                raise InputError(f"tensor {name!r} axis {axis} has {shape[axis]} units, but {first[p]} "
                                 f"has {sizes[p]}: they must match in architecture {arch!r}")
    return PermutationSpec(axes=axes, sizes=sizes)


def _permute(t: torch.Tensor, axes: Axes, perms: Mapping[str, torch.Tensor],
             skip: int | None = None) -> torch.Tensor:
    for axis, p in enumerate(axes):
        if p is not None and axis != skip:
            t = t.index_select(axis, perms[p])
    return t


def apply_permutation(spec: PermutationSpec, perms: Mapping[str, torch.Tensor],
                      params: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Reorder every tensor's units: axis k of tensor n becomes `t.index_select(k, perms[p])`
    for p = `spec.axes[n][k]`, so unit i of the result is unit `perms[p][i]` of the input.
    Tensors the spec does not name are returned as they are."""
    return {n: _permute(t, spec.axes[n], perms) if n in spec.axes else t for n, t in params.items()}


def _objective(spec: PermutationSpec, a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor],
               perms: Mapping[str, torch.Tensor]) -> float:
    """sum over tensors of <A, permuted B>: what weight matching maximizes."""
    return float(sum(torch.vdot(a[n].flatten(), _permute(b[n], ax, perms).flatten())
                     for n, ax in spec.axes.items()))


def weight_matching(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor],
                    spec: PermutationSpec, max_iter: int = 100, seed: int = 0,
                    stats: dict | None = None) -> dict[str, torch.Tensor]:
    """Permutations of B's units that make its weights most similar to A's.

        perms = weight_matching(a_params, b_params, spec)
        b_aligned = apply_permutation(spec, perms, b_params)

    Coordinate descent: each sweep visits the permutations in a random order
    (fixed by `seed`) and solves, for one permutation with the others held,
    the linear assignment maximizing the summed similarity of every tensor it
    touches. It stops after a sweep in which no permutation improved, or
    after `max_iter` sweeps. Pass a dict as `stats` to get `iterations` and
    `converged` back.
    """
    a64 = {n: a[n].detach().to(torch.float64) for n in spec.axes}
    b64 = {n: b[n].detach().to(torch.float64) for n in spec.axes}
    perms = {p: torch.arange(n) for p, n in spec.sizes.items()}
    touching = spec.perm_to_axes
    names = list(spec.sizes)
    rng = np.random.default_rng(seed)
    iterations, converged = 0, False
    while iterations < max_iter and not converged:
        iterations += 1
        converged = True
        for k in rng.permutation(len(names)):
            p, n = names[k], spec.sizes[names[k]]
            sim = torch.zeros(n, n, dtype=torch.float64)
            for name, axis in touching[p]:
                wa = a64[name].movedim(axis, 0).reshape(n, -1)
                wb = _permute(b64[name], spec.axes[name], perms, skip=axis).movedim(axis, 0).reshape(n, -1)
                sim += wa @ wb.T
            _, cols = linear_sum_assignment(sim.numpy(), maximize=True)
            rows = torch.arange(n)
            old = float(sim[rows, perms[p]].sum())
            new = float(sim[rows, torch.from_numpy(cols)].sum())
            if new > old + _REL_TOL * max(abs(old), 1.0):
                perms[p] = torch.from_numpy(cols).to(torch.long)
                converged = False
    if stats is not None:
        stats.update(iterations=iterations, converged=converged)
    return perms


def _arch_of(space: WeightSpace) -> str:
    cfg = space.meta.get("config") or {}
    arch = cfg.get("arch") if isinstance(cfg, dict) else None
    if isinstance(arch, dict):
        arch = arch.get("arch")
    if not isinstance(arch, str):
        raise InputError(f"{space.source}: cannot tell the architecture (its config.json has no "
                         f"arch.arch); pass it, e.g. --arch mlp ({', '.join(FAMILIES)})")
    return arch


def _check_same_tensors(a: WeightSpace, b: WeightSpace) -> None:
    for n in a:
        if n not in b:
            raise InputError(f"tensor {n!r} is in {a.source} but not in {b.source}")
    for n, ref in b.items():
        if n not in a:
            raise InputError(f"tensor {n!r} is in {b.source} but not in {a.source}")
        if a[n].shape != ref.shape:
            raise InputError(f"tensor {n!r} has shape {list(a[n].shape)} in {a.source} "
                             f"but {list(ref.shape)} in {b.source}")


def align(a: WeightSpace, b: WeightSpace, *, arch: str | None = None, max_iter: int = 100,
          seed: int = 0) -> tuple[WeightSpace, dict]:
    """B with its units reordered to match A's (same function as B, same meta and config).

        aligned, report = align(a, b)   # arch from b.meta["config"]["arch"]["arch"]

    The report has `arch`, `iterations`, `converged`, `units` and `moved`
    (per permutation: its size and how many units left their place), and
    `similarity_before` / `similarity_after` (sum over tensors of <A, B>).
    """
    if max_iter < 1:
        raise InputError(f"max_iter must be at least 1, got {max_iter}")
    _check_same_tensors(a, b)
    arch = _check_arch(arch if arch is not None else _arch_of(b))
    try:
        spec = permutation_spec(arch, {n: r.shape for n, r in b.items()})
    except InputError as e:
        raise InputError(f"cannot align {b.source} to {a.source} as {arch}: {e}") from None
    pa, pb = a.materialize(), b.materialize()
    stats: dict = {}
    perms = weight_matching(pa, pb, spec, max_iter=max_iter, seed=seed, stats=stats)
    identity = {p: torch.arange(n) for p, n in spec.sizes.items()}
    a64 = {n: t.to(torch.float64) for n, t in pa.items()}
    b64 = {n: t.to(torch.float64) for n, t in pb.items()}
    report = {
        "arch": arch,
        **stats,
        "units": dict(spec.sizes),
        "moved": {p: int((perm != identity[p]).sum()) for p, perm in perms.items()},
        "similarity_before": _objective(spec, a64, b64, identity),
        "similarity_after": _objective(spec, a64, b64, perms),
    }
    meta = {**b.meta, "source": f"{b.source} aligned to {a.source}"}
    return WeightSpace.from_tensors(apply_permutation(spec, perms, pb), meta), report


__all__ = ["FAMILIES", "PermutationSpec", "align", "apply_permutation", "permutation_spec",
           "weight_matching"]
