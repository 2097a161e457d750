"""Gram matrices G = X^T X / N of every linear layer's inputs, in passes over the data.

    grams = gram_matrices(adapter, batches)                         # in memory (small models)
    info = write_grams(adapter, batches, "ft_a-gram", max_memory=2 * 2**30)   # streamed to a directory

Memory holds the model, the Grams of one group of layers and one batch's activations: the
layers are split into groups whose accumulators fit `max_memory`, and the data is run once
per group (one pass when everything fits). Layers that read the same input tensor (q/k/v_proj,
gate/up_proj), found by a probe forward on one example, share one accumulation within a group
and are written under each name. Accumulators live on the device the layer's input is on, in
float32 (or float64) whatever the model's dtype: activations are cast up before X^T X.
"""

from __future__ import annotations

import itertools
import weakref
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch

from weightspace.binding import Adapter, tensors_for
from weightspace.errors import InputError, SpecError
from weightspace.ir import WeightSpace
from weightspace.merges.regmean.layers import GramLayer, describe_skipped, find_layers

GRAM_KIND = "gram"
GRAM_DTYPES = {"float32": torch.float32, "float64": torch.float64}


def _head(batch: Mapping[str, Any], k: int) -> dict[str, Any]:
    return {key: v[:k] if isinstance(v, torch.Tensor) and v.dim() > 0 else v for key, v in batch.items()}


def _batch_size(batch: Mapping[str, Any]) -> int:
    for v in batch.values():
        if isinstance(v, torch.Tensor) and v.dim() > 0:
            return int(v.shape[0])
    raise InputError("gram_matrices: a batch holds no tensor with a batch dimension")


def _take(batches: Iterable[Mapping[str, Any]], n_examples: int | None) -> Iterator[tuple[dict, int]]:
    """(batch, size) pairs, the last one cut so that at most `n_examples` are taken."""
    seen = 0
    for batch in batches:
        b = _batch_size(batch)
        if n_examples is not None and seen + b > n_examples:
            batch, b = _head(batch, n_examples - seen), n_examples - seen
        yield dict(batch), b
        seen += b
        if n_examples is not None and seen >= n_examples:
            return


def human_bytes(n: int) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} bytes"


class GramRun:
    """One model's Gram statistics: the layers, the probe that finds shared inputs, the passes.

        run = GramRun(adapter, batches, n_examples=512)
        groups = run.groups(order, max_memory)      # names per pass
        for name, gram in run.grams(groups): ...    # in `order`; None for a layer nothing reached
        run.meta                                    # examples, tokens, skipped, layouts, passes, ...
    """

    def __init__(self, adapter: Adapter, batches: Iterable[Mapping[str, Any]], *,
                 params: Mapping[str, torch.Tensor] | WeightSpace | None = None,
                 n_examples: int | None = None, modules: str | Iterable[str] | None = None,
                 padding: str = "exclude", dtype: torch.dtype = torch.float32, progress: bool = False):
        if n_examples is not None and n_examples < 1:
            raise SpecError(f"gram_matrices: n_examples must be at least 1, got {n_examples}")
        if padding not in ("exclude", "include"):
            raise SpecError(f"gram_matrices: padding must be 'exclude' or 'include', got {padding!r}")
        if dtype not in GRAM_DTYPES.values():
            raise SpecError(f"gram_matrices: dtype must be torch.float32 or torch.float64, got {dtype}")
        self.adapter, self.module = adapter, adapter.module
        self.n_examples, self.padding, self.dtype, self.progress = n_examples, padding, dtype, progress
        if params is None:
            self.tensors = dict(adapter.params())
        elif isinstance(params, WeightSpace):
            first = next(iter(self.module.parameters()), None)
            self.tensors = tensors_for(self.module, params,
                                       device=first.device if first is not None else "cpu")
        else:
            self.tensors = dict(params)
        self.device = next((t.device for t in self.tensors.values()), torch.device("cpu"))
        found = find_layers(self.module, modules)
        self.layers = {la.weight: la for la in found.layers}
        self.skipped = dict(found.skipped)
        it = iter(batches)
        first_batch = next(it, None)
        if first_batch is None:
            raise InputError("gram_matrices: no batches were given, so there is nothing to take Grams of")
        # a one-shot iterator keeps its first batch; several passes need the batches again
        self.batches = itertools.chain([first_batch], it) if it is batches else batches
        self.share, self.rank = self._probe(first_batch)
        self.counts: dict[str, int] = {}
        self.examples = self.n_batches = self.passes = 0

    # ------------------------------------------------------------ planning

    def nbytes(self, name: str) -> int:
        d = self.layers[name].in_dim
        return d * d * torch.empty((), dtype=self.dtype).element_size()

    def _probe(self, batch: Mapping[str, Any]) -> tuple[dict[str, str], dict[str, int]]:
        """Forward one example with a hook on every layer: which layers read the very tensor the
        layer hooked just before read (they share an accumulation), and the order they run in."""
        share: dict[str, str] = {}
        rank: dict[str, int] = {}
        last: dict[str, Any] = {"ref": None, "name": None}

        def hook_for(name: str, layer: GramLayer):
            def hook(mod, args, kwargs):
                x = args[0] if args else next(iter(kwargs.values()))
                if name not in rank:
                    rank[name] = len(rank)
                    prev = last["name"]
                    same = (prev is not None and last["ref"] is not None and last["ref"]() is x
                            and layer.layout != "conv" and self.layers[prev].layout != "conv")
                    share[name] = share[prev] if same else name
                last["ref"], last["name"] = (weakref.ref(x) if isinstance(x, torch.Tensor) else None), name
            return hook

        handles = [la.module.register_forward_pre_hook(hook_for(n, la), with_kwargs=True)
                   for n, la in self.layers.items()]
        try:
            self._forward(_head(batch, 1))
        finally:
            for h in handles:
                h.remove()
        return share, rank

    def groups(self, order: list[str], max_memory: int | None) -> list[list[str]]:
        """`order` cut into consecutive groups whose accumulators (one per shared input) fit
        `max_memory` bytes; one group when it is None."""
        if max_memory is None:
            return [list(order)]
        big = max(order, key=self.nbytes)
        if self.nbytes(big) > max_memory:
            d = self.layers[big].in_dim
            raise SpecError(f"--max-stats-memory {human_bytes(max_memory)} is less than one Gram: layer "
                            f"{self.layers[big].path!r} needs {d} x {d} {str(self.dtype)[6:]} = "
                            f"{human_bytes(self.nbytes(big))}; give at least that")
        groups: list[list[str]] = []
        cur: list[str] = []
        keys: set[str] = set()
        used = 0
        for name in order:
            key = self.share.get(name, name)
            extra = 0 if key in keys else self.nbytes(name)
            if cur and used + extra > max_memory:
                groups.append(cur)
                cur, keys, used, extra = [], set(), 0, self.nbytes(name)
            cur.append(name)
            keys.add(key)
            used += extra
        if cur:
            groups.append(cur)
        return groups

    # ------------------------------------------------------------ passes

    def _forward(self, batch: Mapping[str, Any]) -> None:
        batch = {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        mask = self.adapter.token_mask(batch) if self.padding == "exclude" else None
        self._mask = mask.to(self.device) if mask is not None else None
        was_training = self.module.training
        self.module.eval()  # the layers' inputs as the model predicts; BatchNorm statistics untouched
        try:
            with torch.no_grad():
                self.adapter.forward(self.tensors, batch)
        finally:
            self.module.train(was_training)

    def _pass(self, names: list[str], label: str) -> dict[str, torch.Tensor]:
        """Run the data once with hooks on `names`; the accumulated sums by accumulation key."""
        members: dict[str, list[str]] = {}
        for n in names:
            members.setdefault(self.share.get(n, n), []).append(n)
        sums: dict[str, torch.Tensor] = {}
        counts: dict[str, int] = {}
        last: dict[str, Any] = {}

        def leader_hook(key: str, layer: GramLayer):
            def hook(mod, args, kwargs):
                x = args[0] if args else next(iter(kwargs.values()))
                last[key] = weakref.ref(x)
                rows = layer.rows(x.detach(), None if layer.layout == "conv" else self._mask)
                if rows.shape[0] == 0:
                    return
                rows = rows.to(self.dtype)  # bf16/fp16 activations cast up before the products
                if key not in sums:
                    sums[key] = torch.zeros(rows.shape[1], rows.shape[1], dtype=self.dtype, device=rows.device)
                sums[key].addmm_(rows.T, rows)
                counts[key] = counts.get(key, 0) + int(rows.shape[0])
            return hook

        def follower_hook(key: str, name: str, leader: str):
            def hook(mod, args, kwargs):
                x = args[0] if args else next(iter(kwargs.values()))
                ref = last.get(key)
                if ref is None or ref() is not x:
                    raise InputError(f"gram_matrices: layers {leader[:-7]!r} and {name[:-7]!r} read the same "
                                     f"input on the first example but not on a later batch; the model's "
                                     f"forward depends on its data in a way Gram sharing cannot follow")
            return hook

        handles = []
        for key, ns in members.items():
            ns = sorted(ns, key=lambda n: self.rank.get(n, len(self.rank)))
            lead = self.layers[ns[0]]
            handles.append(lead.module.register_forward_pre_hook(leader_hook(key, lead), with_kwargs=True))
            for n in ns[1:]:
                handles.append(self.layers[n].module.register_forward_pre_hook(
                    follower_hook(key, n, ns[0]), with_kwargs=True))
        bar = None
        if self.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=self.n_examples, unit="ex", desc=label, leave=False, dynamic_ncols=True)
        seen = n_batches = 0
        try:
            for batch, b in _take(self.batches, self.n_examples):
                self._forward(batch)
                seen += b
                n_batches += 1
                if bar is not None:
                    bar.update(b)
        finally:
            for h in handles:
                h.remove()
            if bar is not None:
                bar.close()
        if self.passes and (seen, n_batches) != (self.examples, self.n_batches):
            raise InputError(f"gram_matrices: pass {self.passes + 1} saw {seen} examples in {n_batches} "
                             f"batches, the first {self.examples} in {self.n_batches}; the batches must "
                             f"be the same on every pass")
        self.examples, self.n_batches = seen, n_batches
        self.passes += 1
        for key, ns in members.items():
            for n in ns:
                self.counts[n] = counts.get(key, 0)
        return {key: sums[key] for key in sums}

    def grams(self, groups: list[list[str]]) -> Iterator[tuple[str, torch.Tensor | None]]:
        """Each group's Grams, (name, G on the CPU) in the group's order, after that group's pass;
        None for a layer the forward never reached (it is added to `skipped`)."""
        if len(groups) > 1 and not isinstance(self.batches, (list, tuple)):
            self.batches = [b for b, _ in _take(self.batches, self.n_examples)]
        for i, names in enumerate(groups):
            sums = self._pass(names, f"gram pass {i + 1}/{len(groups)}")
            for n in names:
                key = self.share.get(n, n)
                if key not in sums:
                    self.skipped[self.layers[n].path] = "unused"  # never reached (or only padding)
                    yield n, None
                    continue
                s = sums[key].cpu() if sums[key].device.type != "cpu" else sums[key]
                yield n, s.add(s.T).div_(2 * self.counts[n])  # symmetric to the last bit
            del sums

    @property
    def meta(self) -> dict[str, Any]:
        return {
            "source": f"gram_matrices({type(self.module).__name__})",
            "kind": GRAM_KIND,
            "examples": self.examples,
            "batches": self.n_batches,
            "tokens": {n: c for n, c in self.counts.items() if c},
            "skipped": self.skipped,
            "padding": self.padding,
            "layouts": {n: la.layout for n, la in self.layers.items()},
            "dtype": str(self.dtype).removeprefix("torch."),
            "passes": self.passes,
        }


def gram_matrices(
    adapter: Adapter,
    batches: Iterable[Mapping[str, Any]],
    *,
    params: Mapping[str, torch.Tensor] | WeightSpace | None = None,
    n_examples: int | None = None,
    modules: str | Iterable[str] | None = None,
    padding: str = "exclude",
    dtype: torch.dtype = torch.float32,
    max_memory: int | None = None,
    progress: bool = False,
) -> WeightSpace:
    """Input Gram matrices G = X^T X / N of every linear layer in `adapter.module`, as a WeightSpace.

        grams = gram_matrices(ClassifierAdapter(model), [{"x": x, "y": y}], n_examples=1000)
        grams["layers.0.weight"].load()         # (in_features, in_features), float32

    Each Gram is named after its layer's weight (`<module path>.weight`) and averages x x^T over
    every row the layer saw (tokens of nn.Linear and GPT-2 Conv1D inputs, unfolded patches of
    Conv1d/Conv2d: see weightspace.merges.regmean.layers), running `adapter.forward(params,
    batch)` under `torch.no_grad()` in eval mode for each batch. Inputs (B, T, in) drop the
    positions where `adapter.token_mask(batch)` is 0 (`padding="include"` keeps them, as the
    authors' `compute_grams` does). `params` (default: `adapter.params()`) are swapped in with
    `functional_call`; `n_examples` stops after that many examples (the last batch is cut);
    `modules` keeps only the layers whose module path matches one of these fnmatch patterns;
    `dtype` (float32 or float64) is the accumulators'; `max_memory` (bytes) splits the layers
    into groups, one pass over the data each (the result holds every Gram all the same: stream
    a large model's to a directory with `write_grams`). `meta` records the examples, batches,
    `tokens` per Gram, each layer's weight `layouts` (linear, conv1d, conv), the `passes` and
    the layers of a linear kind that got none (`skipped`: layer -> reason, see
    FALLBACK_REASONS), which a RegMean merge averages; a warning names them.
    """
    import warnings

    run = GramRun(adapter, batches, params=params, n_examples=n_examples, modules=modules,
                  padding=padding, dtype=dtype, progress=progress)
    order = list(run.layers)
    grams = {n: g for n, g in run.grams(run.groups(order, max_memory)) if g is not None}
    if run.skipped:
        warnings.warn("gram_matrices: no Gram for " + "; ".join(describe_skipped(run.skipped))
                      + ". A RegMean merge averages their weights.", stacklevel=2)
    meta = {**run.meta, "format": "memory"}
    meta["layouts"] = {n: v for n, v in meta["layouts"].items() if n in grams}
    return WeightSpace.from_tensors(grams, meta)


__all__ = ["GRAM_DTYPES", "GRAM_KIND", "GramRun", "gram_matrices", "human_bytes"]
