"""Read a tensor name as (prefix, layer index, suffix).

The rules cover the layer stacks of the common families::

    model.layers.7.mlp.up_proj.weight            Llama, Mistral, Qwen  -> ("model.layers", 7, "mlp.up_proj.weight")
    encoder.layer.3.attention.self.query.weight  BERT                  -> ("encoder.layer", 3, ...)
    h.11.attn.c_attn.weight                      GPT-2                 -> ("h", 11, "attn.c_attn.weight")
    blocks.2.fc1.weight                          ViT / timm            -> ("blocks", 2, "fc1.weight")

The first `<container>.<N>.` in the name wins, so expert indices deeper in the
name (`model.layers.3.mlp.experts.5.w1`) do not count as layers. A name with
no container is a non-layer tensor (embeddings, final norm, head). Every
method that needs depth asks this module; none parses names itself.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

# Containers that hold a stack of identical blocks, as they appear in checkpoints.
LAYER_CONTAINERS = ("layers", "layer", "h", "blocks", "block")

_LAYER_RE = re.compile(
    r"^(?P<prefix>(?:[^.]+\.)*?(?:" + "|".join(LAYER_CONTAINERS) + r"))\.(?P<index>\d+)(?:\.(?P<suffix>.+))?$"
)

# Non-layer tensors that sit before the stack (mergekit's "pre weights": t = 0).
_PRE_RE = re.compile(
    r"(embed|wte|wpe|word_embeddings|position_embeddings|token_type_embeddings|"
    r"patch_embed|pos_embed|cls_token|embeddings\.|shared\.weight)"
)

# A top-level `stem` (ResMLP, ConvNeXt, RegNet) also sits before the stack.
_STEM_RE = re.compile(r"^stem\.")


@dataclass(frozen=True)
class LayerName:
    """A tensor name split around its layer index."""

    prefix: str
    index: int
    suffix: str

    def with_index(self, index: int) -> str:
        tail = f".{self.suffix}" if self.suffix else ""
        return f"{self.prefix}.{index}{tail}"


def parse_layer(name: str) -> LayerName | None:
    """`model.layers.7.mlp.up_proj.weight` -> LayerName("model.layers", 7, "mlp.up_proj.weight")."""
    m = _LAYER_RE.match(name)
    if m is None:
        return None
    return LayerName(m["prefix"], int(m["index"]), m["suffix"] or "")


def is_pre_weight(name: str) -> bool:
    """True for non-layer tensors that come before the stack (embeddings)."""
    return parse_layer(name) is None and _PRE_RE.search(name) is not None


def is_pre_stack(name: str) -> bool:
    """True for non-layer tensors that come before the stack: embeddings and a top-level stem.

        is_pre_stack("stem.weight")    # True; is_pre_weight("stem.weight") is False

    Where a tensor sits in the network (signature layer selection, per-layer reports) asks
    this. `is_pre_weight` stays the narrower rule that gradient parameters and slices use
    (mergekit's pre weights), so counting a stem here moves no gradient value.
    """
    return is_pre_weight(name) or (parse_layer(name) is None and _STEM_RE.match(name) is not None)


@dataclass(frozen=True)
class Structure:
    """The layer stacks of a set of tensor names: prefix -> number of layers."""

    stacks: dict[str, int]
    non_layer: tuple[str, ...]

    @property
    def num_layers(self) -> int:
        """Layers of the main (largest) stack; 0 if the model has none."""
        return max(self.stacks.values(), default=0)

    @property
    def main_prefix(self) -> str | None:
        if not self.stacks:
            return None
        return max(self.stacks, key=lambda p: self.stacks[p])


def structure_of(names: Iterable[str]) -> Structure:
    stacks: dict[str, int] = {}
    non_layer = []
    for n in names:
        ln = parse_layer(n)
        if ln is None:
            non_layer.append(n)
        else:
            stacks[ln.prefix] = max(stacks.get(ln.prefix, 0), ln.index + 1)
    return Structure(stacks=stacks, non_layer=tuple(non_layer))


def depth_t(name: str, structure: Structure) -> float:
    """Position in depth used by gradient parameters, as mergekit 0.1.5's planner sets it:
    layer i of n -> i/(n-1) (a single layer -> 1); every tensor outside the layer stack
    (embeddings, final norm, head) -> 0, the first value of the gradient."""
    ln = parse_layer(name)
    if ln is None:
        return 0.0
    n = structure.stacks.get(ln.prefix, ln.index + 1)
    return ln.index / (n - 1) if n > 1 else 1.0
