"""Which layers of a module get a Gram, and the rows X each one's input contributes to X^T X.

    found = find_layers(model)             # GramLayer per layer, and skipped: path -> reason
    rows = found.layers[0].rows(x, mask)   # (N, in) for that layer's input x

Three linear kinds, each with the layout of its weight W as stored (the merge solves in
the (out, in) layout and converts back):

- `nn.Linear`, weight (out, in): rows are the input's last dimension, padding dropped.
- transformers' GPT-2 `Conv1D`, weight (in, out): the same rows; the merge transposes W.
- `nn.Conv1d` / `nn.Conv2d`, weight (out, in, *kernel): rows are the unfolded input patches
  (in * prod(kernel) each, channel-major like `weight.reshape(out, -1)`), one per output
  position, with the layer's stride, padding (and padding_mode), dilation. groups > 1,
  3-D and transposed convolutions are skipped with their reason.

A layer whose weight is tied to another module's (a tied input embedding / lm_head) gets
no Gram: the one matrix would have to serve the embedding lookup and the projection, and
the two see different inputs. The merge averages it.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from weightspace.errors import InputError, SpecError

# why a layer of a linear kind got no Gram, as recorded in the Gram file's `skipped`
FALLBACK_REASONS = {
    "grouped": "a grouped convolution (groups > 1): its weight is several regressions",
    "conv3d": "a 3-D convolution: not supported",
    "transposed": "a transposed convolution: not supported",
    "tied": "its weight is tied to another module's (one Gram cannot serve both uses)",
    "unused": "the forward never reached it",
}

LAYOUTS = ("linear", "conv1d", "conv")  # how the weight stores (out, in): see the module docstring


def describe_skipped(skipped: Mapping[str, str]) -> list[str]:
    """One line per reason: which layers got no Gram and so are averaged by a RegMean merge.

    >>> describe_skipped({"lm_head": "tied"})
    ["1 layer (its weight is tied to another module's (one Gram cannot serve both uses)): lm_head"]
    """
    by_reason: dict[str, list[str]] = {}
    for layer, why in skipped.items():
        by_reason.setdefault(why, []).append(layer)
    lines = []
    for why, layers in by_reason.items():
        shown = ", ".join(layers[:8]) + (f", ... ({len(layers) - 8} more)" if len(layers) > 8 else "")
        n = f"{len(layers)} layer{'s' if len(layers) > 1 else ''}"
        lines.append(f"{n} ({FALLBACK_REASONS.get(why, why)}): {shown}")
    return lines


def is_conv1d(m: nn.Module) -> bool:
    """transformers' GPT-2 `Conv1D` (weight (in, out)); matched by name so transformers stays optional."""
    return type(m).__name__ == "Conv1D" and type(m).__module__.startswith("transformers")


def _drop_padding(x: torch.Tensor, mask: torch.Tensor | None, layer: str) -> torch.Tensor:
    """The input as (tokens, in): padding positions dropped when a token mask is given."""
    if mask is not None:
        if x.dim() >= 3:
            if tuple(x.shape[:2]) != tuple(mask.shape):
                raise InputError(
                    f"gram_matrices: layer {layer!r} got input {list(x.shape)}, which does not line up "
                    f"with the (batch, tokens) mask {list(mask.shape)}; its padding cannot be excluded. "
                    f"Leave the layer out with `modules=` or pass batches without padding")
            x = x[mask.bool()]
        elif x.dim() == 2 and x.shape[0] == mask.numel() and mask.dim() == 2 and mask.shape[1] > 1:
            x = x[mask.reshape(-1).bool()]  # tokens flattened to (batch * tokens, in) before the layer
        # a 2-D (batch, in) input (pooler, classifier head) has one row per example: nothing to drop
    return x.reshape(-1, x.shape[-1])


@dataclass
class GramLayer:
    """One layer that gets a Gram: its module path, weight name, layout and input width."""

    path: str
    module: nn.Module
    layout: str
    in_dim: int  # the Gram is (in_dim, in_dim)

    @property
    def weight(self) -> str:
        return f"{self.path}.weight" if self.path else "weight"

    def rows(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """This layer's input `x` as the (N, in_dim) rows of X (padding dropped for token inputs)."""
        if self.layout != "conv":
            if x.shape[-1] != self.in_dim:
                raise InputError(f"gram_matrices: layer {self.path!r} got input {list(x.shape)}, "
                                 f"expected last dim {self.in_dim}")
            return _drop_padding(x, mask, self.path)
        m = self.module
        if m.padding_mode != "zeros" or isinstance(m.padding, str) or any(m.padding):
            mode = "constant" if m.padding_mode == "zeros" else m.padding_mode
            x = F.pad(x, m._reversed_padding_repeated_twice, mode=mode)
        if isinstance(m, nn.Conv1d):  # as a 2-D convolution of height 1
            x = x.unsqueeze(-2)
            k, s, d = (1, m.kernel_size[0]), (1, m.stride[0]), (1, m.dilation[0])
        else:
            k, s, d = m.kernel_size, m.stride, m.dilation
        patches = F.unfold(x, k, dilation=d, stride=s)  # (B, in * kh * kw, positions)
        return patches.transpose(1, 2).reshape(-1, self.in_dim)


@dataclass
class Found:
    layers: list[GramLayer]
    skipped: dict[str, str] = field(default_factory=dict)


def find_layers(module: nn.Module, modules: str | Iterable[str] | None = None) -> Found:
    """Every layer of a linear kind in `module` (module order), those matching the fnmatch
    patterns `modules` when given; layers that get no Gram are in `skipped` with their reason."""
    # a parameter held by two module objects (an lm_head tied to the input embedding) is tied; one
    # module object reached by two paths is not: its Gram over all its calls is its regression's
    owners: dict[int, set[int]] = {}
    for m in module.modules():
        for p in m.parameters(recurse=False):
            owners.setdefault(id(p), set()).add(id(m))
    patterns = [modules] if isinstance(modules, str) else (list(modules) if modules is not None else None)
    found = Found([])
    matched: set[str] = set()
    for path, m in module.named_modules():
        linear, conv1d = isinstance(m, nn.Linear), is_conv1d(m)
        conv = isinstance(m, nn.modules.conv._ConvNd)
        if not (linear or conv1d or conv):
            continue
        if patterns is not None:
            hits = [p for p in patterns if fnmatch.fnmatchcase(path, p)]
            if not hits:
                continue
            matched.update(hits)
        w = getattr(m, "weight", None)
        if not isinstance(w, torch.Tensor) or len(owners.get(id(w), ())) != 1:
            found.skipped[path] = "tied"  # one parameter behind several module paths
        elif linear:
            found.layers.append(GramLayer(path, m, "linear", int(m.in_features)))
        elif conv1d:
            found.layers.append(GramLayer(path, m, "conv1d", int(w.shape[0])))
        elif m.transposed:
            found.skipped[path] = "transposed"
        elif isinstance(m, nn.Conv3d) or w.dim() > 4:
            found.skipped[path] = "conv3d"
        elif m.groups != 1:
            found.skipped[path] = "grouped"
        else:
            found.layers.append(GramLayer(path, m, "conv", int(math.prod(w.shape[1:]))))
    if patterns is not None:
        unmatched = [p for p in patterns if p not in matched]
        if unmatched:
            known = [p for p, m in module.named_modules()
                     if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd)) or is_conv1d(m)][:5]
            raise SpecError(f"gram_matrices: modules pattern {unmatched[0]!r} matches no linear layer "
                            f"of {type(module).__name__} (its linear layers: {', '.join(known) or 'none'})")
    if not found.layers:
        raise InputError(f"gram_matrices: {type(module).__name__} has no linear layer (nn.Linear, "
                         f"Conv1D, Conv1d/2d) to take a Gram matrix of"
                         + (f" (skipped: {found.skipped})" if found.skipped else ""))
    return found


__all__ = ["FALLBACK_REASONS", "LAYOUTS", "Found", "GramLayer", "describe_skipped", "find_layers",
           "is_conv1d"]
