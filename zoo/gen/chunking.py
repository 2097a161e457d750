"""Cut the weights of one architecture into fixed-size, normalized chunks and back.

    chunker = WeightChunker.fit([zoo.load(r) for r in rows], chunk=64)   # statistics from the zoo
    tokens = chunker.encode(space)         # (n_chunks, chunk) float32, the VAE's input
    weights = chunker.decode(tokens)       # {name: tensor}, the exact inverse (float rounding)
    WeightChunker.from_state(chunker.state_dict())   # JSON-able: generator.json keeps it as "tokenizer"

Every tensor is flattened in a fixed order (the first model's order) and
normalized with the zoo's per-tensor statistics, (w - mean_t) / std_t, so a
bias and a weight matrix reach the VAE on the same scale. Each tensor is then
cut into chunks of `chunk` values on its own, its last chunk padded with
zeros, so a chunk never straddles two tensors and a chunk position always
means the same part of the network (the layer-wise chunking of D2NWG,
Soro et al., ICLR 2025). The padding of every tensor is recorded and dropped
again by `decode`.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from einops import rearrange

from weightspace.errors import InputError
from weightspace.ir import WeightSpace

# a tensor whose values are (nearly) constant over the zoo is normalized with std 1
STD_FLOOR = 1e-8

Weights = WeightSpace | Mapping[str, torch.Tensor]


def _tensors(weights: Weights, names: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
    keys = list(weights) if names is None else list(names)
    if isinstance(weights, WeightSpace):
        return {k: weights[k].load("cpu", torch.float32) for k in keys}
    return {k: weights[k].detach().to("cpu", torch.float32) for k in keys}


def _shapes(weights: Weights) -> dict[str, tuple[int, ...]]:
    if isinstance(weights, WeightSpace):
        return {k: tuple(r.shape) for k, r in weights.items()}
    return {k: tuple(v.shape) for k, v in weights.items()}


def _describe(weights: Weights, label: str) -> str:
    cfg = weights.meta.get("config") if isinstance(weights, WeightSpace) else None
    arch = (cfg or {}).get("arch")
    return f"{label} (arch {arch})" if arch else label


def check_same_architecture(models: Sequence[Weights], labels: Sequence[str] | None = None) -> None:
    """Refuse models whose tensor names or shapes differ; the error names both models and the tensor."""
    if not models:
        raise InputError("no models to chunk (an empty zoo?)")
    labels = list(labels) if labels is not None else [f"model {i}" for i in range(len(models))]
    ref = _shapes(models[0])
    for m, label in zip(models[1:], labels[1:]):
        shapes = _shapes(m)
        a, b = _describe(models[0], labels[0]), _describe(m, label)
        if set(shapes) != set(ref):
            only_a = sorted(set(ref) - set(shapes))
            only_b = sorted(set(shapes) - set(ref))
            what = (f"tensor {only_a[0]!r} is in {a} but not in {b}" if only_a
                    else f"tensor {only_b[0]!r} is in {b} but not in {a}")
            raise InputError(f"a zoo with mixed architectures for one generator: {what}; "
                             f"train one generator per architecture (--tasks or a zoo of one arch)")
        for n, s in ref.items():
            if shapes[n] != s:
                raise InputError(f"a zoo with mixed architectures for one generator: tensor {n!r} has "
                                 f"shape {list(s)} in {a} but {list(shapes[n])} in {b}; train one "
                                 f"generator per architecture (--tasks or a zoo of one arch)")


class WeightChunker:
    """Per-tensor normalization + per-tensor chunking of one architecture's weights."""

    def __init__(self, names: Sequence[str], shapes: Sequence[Sequence[int]], mean: Sequence[float],
                 std: Sequence[float], chunk: int):
        if chunk < 1:
            raise InputError(f"chunk must be a positive integer, got {chunk}")
        if not names:
            raise InputError("a weight chunker needs at least one tensor (does --subset match any name?)")
        self.names = list(names)
        self.shapes = [tuple(int(x) for x in s) for s in shapes]
        self.mean = [float(m) for m in mean]
        self.std = [float(s) for s in std]
        self.chunk = int(chunk)
        self.numels = [math.prod(s) for s in self.shapes]
        self.chunks_per_tensor = [max(1, math.ceil(n / chunk)) for n in self.numels]
        self.padding = [c * chunk - n for c, n in zip(self.chunks_per_tensor, self.numels)]

    # fitting
    @classmethod
    def fit(cls, models: Sequence[Weights], *, chunk: int = 64, include: str | None = None,
            labels: Sequence[str] | None = None) -> WeightChunker:
        """Statistics from a zoo of one architecture; `include` (fnmatch) keeps only matching tensors."""
        check_same_architecture(models, labels)
        shapes = _shapes(models[0])
        names = [n for n in shapes if include is None or fnmatch.fnmatchcase(n, include)]
        if not names:
            raise InputError(f"--subset {include!r} matches no tensor; the tensors are "
                             f"{', '.join(list(shapes)[:8])}{' ...' if len(shapes) > 8 else ''}")
        # two passes in float64: sums, then squared deviations (stable for large zoos)
        total = {n: 0.0 for n in names}
        for m in models:
            for n, t in _tensors(m, names).items():
                total[n] += float(t.double().sum())
        count = {n: math.prod(shapes[n]) * len(models) for n in names}
        mean = {n: total[n] / count[n] for n in names}
        sq = {n: 0.0 for n in names}
        for m in models:
            for n, t in _tensors(m, names).items():
                sq[n] += float(((t.double() - mean[n]) ** 2).sum())
        std = {n: math.sqrt(sq[n] / count[n]) for n in names}
        std = {n: s if s > STD_FLOOR else 1.0 for n, s in std.items()}
        return cls(names, [shapes[n] for n in names], [mean[n] for n in names],
                   [std[n] for n in names], chunk)

    # sizes
    @property
    def n_chunks(self) -> int:
        return sum(self.chunks_per_tensor)

    @property
    def num_params(self) -> int:
        return sum(self.numels)

    def chunk_owner(self) -> list[str]:
        """The tensor name of every chunk position."""
        return [n for n, c in zip(self.names, self.chunks_per_tensor) for _ in range(c)]

    def mask(self) -> torch.Tensor:
        """(n_chunks, chunk) bool: True for real values, False for padding."""
        parts = []
        for n, pad in zip(self.numels, self.padding):
            m = torch.ones(n + pad, dtype=torch.bool)
            if pad:
                m[n:] = False
            parts.append(rearrange(m, "(c k) -> c k", k=self.chunk))
        return torch.cat(parts)

    # encoding
    def encode(self, weights: Weights) -> torch.Tensor:
        """(n_chunks, chunk) float32 tokens of one model (extra tensors, if any, are ignored)."""
        missing = [n for n in self.names if n not in weights]
        if missing:
            raise InputError(f"the weights have no tensor {missing[0]!r} that this weight chunker was fitted on")
        tensors = _tensors(weights, self.names)
        parts = []
        for n, shape, mu, sd, pad in zip(self.names, self.shapes, self.mean, self.std, self.padding):
            t = tensors[n]
            if tuple(t.shape) != shape:
                raise InputError(f"tensor {n!r} has shape {list(t.shape)}, but the weight chunker was fitted "
                                 f"on {list(shape)} (another architecture)")
            flat = (t.reshape(-1).double() - mu) / sd
            flat = torch.cat([flat, flat.new_zeros(pad)])
            parts.append(rearrange(flat, "(c k) -> c k", k=self.chunk))
        return torch.cat(parts).float()

    def encode_many(self, models: Sequence[Weights]) -> torch.Tensor:
        """(N, n_chunks, chunk) tokens of many models."""
        return torch.stack([self.encode(m) for m in models])

    def decode(self, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        """{name: float32 tensor} from (n_chunks, chunk) tokens; padding is dropped."""
        want = (self.n_chunks, self.chunk)
        if tuple(tokens.shape) != want:
            raise InputError(f"tokens have shape {list(tokens.shape)}; this weight chunker makes {list(want)}")
        out, start = {}, 0
        for n, shape, mu, sd, c, numel in zip(self.names, self.shapes, self.mean, self.std,
                                              self.chunks_per_tensor, self.numels):
            flat = rearrange(tokens[start:start + c], "c k -> (c k)")[:numel]
            out[n] = (flat.double() * sd + mu).float().reshape(shape)
            start += c
        return out

    def decode_many(self, tokens: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        return [self.decode(t) for t in tokens]

    # saving
    def state_dict(self) -> dict[str, Any]:
        """Plain JSON-able state (names, shapes, statistics, chunk size, padding)."""
        return {"chunk": self.chunk, "names": self.names, "shapes": [list(s) for s in self.shapes],
                "mean": self.mean, "std": self.std, "padding": self.padding}

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> WeightChunker:
        try:
            chunker = cls(state["names"], state["shapes"], state["mean"], state["std"], int(state["chunk"]))
        except (KeyError, TypeError, ValueError) as e:
            raise InputError(f"malformed weight chunker state (\"tokenizer\" in generator.json): {e!r}") from None
        if "padding" in state and list(state["padding"]) != chunker.padding:
            raise InputError("malformed weight chunker state (\"tokenizer\" in generator.json): padding does not match shapes and chunk")
        return chunker

    def __repr__(self) -> str:
        return (f"WeightChunker({len(self.names)} tensors, {self.num_params:,} values -> "
                f"{self.n_chunks} chunks of {self.chunk})")
