"""Small architectures for model zoos, named so the IR's structure rules read them.

    model = build_model({"arch": "mlp", "width": 64, "depth": 2}, input_shape=(1, 8, 8), num_classes=10)
    model = build_model({"arch": "vit", "width": 32, "depth": 2, "patch": 2, "heads": 4}, (1, 8, 8), 10)

Every per-layer tensor sits under a layer container with its index visible
(`layers.0.weight`, `blocks.1.fc1.weight`), so `structure_of`, depth gradients,
signatures and learngene work on zoo models like on any checkpoint. There is no
batch norm and no buffer: a model is its parameters, which keeps batched
training (`torch.func.stack_module_state` + `vmap`) and weight-space arithmetic
exact.

Architectures (knobs beyond width/depth in brackets):

    mlp      flatten -> depth x (Linear, ReLU) -> head                 layers.{i}.weight
    cnn      depth x (Conv3x3, ReLU[, MaxPool after 1st and 2nd]) -> global mean -> head
                                                                       layers.{i}.weight [kernel]
    resmlp   stem -> depth x pre-LN residual MLP block -> LN -> head   blocks.{i}.fc1.weight [mlp_ratio]
    vit      patch embed + cls + pos -> depth x pre-LN transformer block -> LN -> head
                                                                       blocks.{i}.attn.qkv.weight [patch, heads, mlp_ratio]
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from weightspace.bounds import (
    MAX_DEPTH,
    MAX_PARAMS,
    MAX_SIZE,
    check_config_matches,
    check_size,
    module_shapes,
)
from weightspace.bounds import num_params as count_params
from weightspace.errors import InputError, SpecError

# knob -> default, per architecture; `arch`, `width`, `depth` are common
ARCHITECTURES: dict[str, dict[str, Any]] = {
    "mlp": {"width": 64, "depth": 2},
    "cnn": {"width": 16, "depth": 2, "kernel": 3},
    "resmlp": {"width": 32, "depth": 2, "mlp_ratio": 2},
    "vit": {"width": 32, "depth": 2, "patch": 2, "heads": 4, "mlp_ratio": 2},
}


class MLP(nn.Module):
    def __init__(self, in_features: int, num_classes: int, width: int, depth: int):
        super().__init__()
        dims = [in_features] + [width] * depth
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))
        self.head = nn.Linear(dims[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        for layer in self.layers:
            x = F.relu(layer(x))
        return self.head(x)


class CNN(nn.Module):
    """Conv stack on small images; max-pool after the first two layers (8x8 -> 4x4 -> 2x2)."""

    def __init__(self, in_channels: int, num_classes: int, width: int, depth: int, kernel: int):
        super().__init__()
        chans = [in_channels] + [width] * depth
        self.layers = nn.ModuleList(
            nn.Conv2d(a, b, kernel, padding=kernel // 2) for a, b in zip(chans[:-1], chans[1:])
        )
        self.head = nn.Linear(chans[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = F.relu(layer(x))
            if i < 2 and x.shape[-1] >= 2:
                x = F.max_pool2d(x, 2)
        return self.head(x.mean(dim=(-2, -1)))


class ResBlock(nn.Module):
    """Pre-LN residual MLP block: x + fc2(gelu(fc1(norm(x))))."""

    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(F.gelu(self.fc1(self.norm(x))))


class ResMLP(nn.Module):
    def __init__(self, in_features: int, num_classes: int, width: int, depth: int, mlp_ratio: int):
        super().__init__()
        self.stem = nn.Linear(in_features, width)
        self.blocks = nn.ModuleList(ResBlock(width, width * mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x.flatten(1))
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(d // self.heads))
        out = att.softmax(dim=-1) @ v
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, dim * mlp_ratio)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TinyViT(nn.Module):
    """ViT on small images: non-overlapping `patch` x `patch` patches, a cls token, learned positions."""

    def __init__(self, input_shape: tuple[int, int, int], num_classes: int, width: int, depth: int,
                 patch: int, heads: int, mlp_ratio: int):
        super().__init__()
        c, h, w = input_shape
        self.patch = patch
        n_patches = (h // patch) * (w // patch)
        self.patch_embed = nn.Linear(c * patch * patch, width)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embed = nn.Parameter(torch.randn(1, n_patches + 1, width) * 0.02)
        self.blocks = nn.ModuleList(Block(width, heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        p = self.patch
        x = x.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5).reshape(b, -1, c * p * p)
        x = self.patch_embed(x)
        x = torch.cat([self.cls_token.expand(b, -1, -1), x], dim=1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x[:, 0]))


def arch_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """A full architecture config: defaults filled in, unknown names and bad values refused."""
    arch = config.get("arch")
    if arch not in ARCHITECTURES:
        from weightspace.methods import suggest

        raise SpecError(f"arch: unknown architecture {arch!r}.{suggest(str(arch), list(ARCHITECTURES))} "
                        f"Known architectures: {', '.join(ARCHITECTURES)}")
    defaults = ARCHITECTURES[arch]
    unknown = [k for k in config if k != "arch" and k not in defaults]
    if unknown:
        raise SpecError(f"arch: {arch} has no knob {unknown[0]!r}; its knobs are {', '.join(defaults)}")
    out = {"arch": arch, **defaults, **{k: v for k, v in config.items() if k != "arch"}}
    for k, v in out.items():
        if k != "arch" and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
            raise SpecError(f"arch.{k}: must be a positive integer, got {v!r}")
        limit = MAX_DEPTH if k == "depth" else MAX_SIZE
        if k != "arch" and v > limit:
            raise SpecError(f"arch.{k}: {v:,} is more than the {limit:,} weightspace allows")
    if arch == "vit" and out["width"] % out["heads"]:
        raise SpecError(f"arch.width: {out['width']} is not divisible by heads={out['heads']}")
    return out


def _check_task_shape(input_shape: tuple[int, ...], num_classes: int, where: str | None) -> None:
    """The input shape and class count a module is built for: whole numbers within bounds."""
    if not 1 <= len(input_shape) <= 4:
        raise InputError(f"{where or 'model'}: input_shape {list(input_shape)} must have 1 to 4 dimensions")
    for i, d in enumerate(input_shape):
        check_size(d, f"input_shape[{i}]", where)
    check_size(num_classes, "num_classes", where)


def _construct(cfg: dict[str, Any], input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    arch, width, depth = cfg["arch"], cfg["width"], cfg["depth"]
    features = math.prod(input_shape)
    if arch == "mlp":
        return MLP(features, num_classes, width, depth)
    if arch == "resmlp":
        return ResMLP(features, num_classes, width, depth, cfg["mlp_ratio"])
    if len(input_shape) != 3:
        raise SpecError(f"arch: {arch} needs image inputs (channels, height, width); "
                        f"this dataset's inputs have shape {list(input_shape)}")
    if arch == "cnn":
        return CNN(input_shape[0], num_classes, width, depth, cfg["kernel"])
    c, h, w = input_shape
    if h % cfg["patch"] or w % cfg["patch"]:
        raise SpecError(f"arch.patch: {cfg['patch']} does not divide the {h}x{w} input")
    return TinyViT((c, h, w), num_classes, width, depth, cfg["patch"], cfg["heads"], cfg["mlp_ratio"])


def model_shapes(config: Mapping[str, Any], input_shape: tuple[int, ...], num_classes: int
                 ) -> dict[str, tuple[int, ...]]:
    """The tensor shapes of the model a config makes, from a meta-device build (no memory)."""
    cfg = arch_config(config)
    _check_task_shape(tuple(input_shape), num_classes, None)
    return module_shapes(lambda: _construct(cfg, tuple(input_shape), num_classes))


def check_model_size(config: Mapping[str, Any], input_shape: tuple[int, ...], num_classes: int) -> int:
    """The parameter count of the model a config makes; SpecError above MAX_PARAMS, naming the knobs."""
    n = count_params(model_shapes(config, input_shape, num_classes))
    if n > MAX_PARAMS:
        cfg = arch_config(config)
        knobs = ", ".join(f"{k}={v}" for k, v in cfg.items() if k != "arch")
        raise SpecError(f"arch: {cfg['arch']} with {knobs} on inputs {list(input_shape)} has {n:,} parameters, "
                        f"more than the {MAX_PARAMS:,} a zoo model may have")
    return n


def build_model(config: Mapping[str, Any], input_shape: tuple[int, ...], num_classes: int, *,
                tensors: Mapping[str, Any] | None = None, source: str | None = None,
                config_at: str | None = None) -> nn.Module:
    """Instantiate an architecture from its config (see `ARCHITECTURES`) for a task's input shape.

    Nothing is allocated before the sizes are checked: with `tensors` (name -> shape, or a
    WeightSpace, e.g. the checkpoint the config came with) the model's shapes must be
    theirs exactly (an InputError naming `source`, where the tensors are, `config_at`,
    where the config is (default: SOURCE/config.json), the tensor and the knobs); without,
    the model may have at most MAX_PARAMS parameters (a SpecError)."""
    cfg = arch_config(config)
    input_shape = tuple(input_shape)
    _check_task_shape(input_shape, num_classes, source)
    if tensors is None:
        check_model_size(cfg, input_shape, num_classes)
    else:
        have = {n: tuple(getattr(t, "shape", t)) for n, t in tensors.items()}
        fields = {f"arch.{k}": v for k, v in cfg.items() if k != "arch"}
        fields.update({f"input_shape[{i}]": d for i, d in enumerate(input_shape)}, num_classes=num_classes)
        check_config_matches(model_shapes(cfg, input_shape, num_classes), have,
                             config=config_at or (f"{source}/config.json" if source else "the config"),
                             tensors=source or "the tensors", fields=fields)
    return _construct(cfg, input_shape, num_classes)


def model_factory(config: Mapping[str, Any], input_shape: tuple[int, ...],
                  num_classes: int) -> Callable[[], nn.Module]:
    """A zero-argument constructor (validated once), for building many models of one shape."""
    build_model(config, input_shape, num_classes)
    return lambda: build_model(config, input_shape, num_classes)


def model_from_config(config: Mapping[str, Any] | None, source: str = "checkpoint", *,
                      tensors: Mapping[str, Any] | None = None) -> nn.Module:
    """The module skeleton of a zoo checkpoint, from its config.json (arch, input_shape, num_classes).

    Pass the checkpoint's `tensors` (a WeightSpace or name -> shape, from the safetensors
    header): the config's sizes are then checked against them before anything is built."""
    if not isinstance(config, Mapping) or config.get("model_type") != "weightspace-zoo":
        raise SpecError(f"{source}: not a zoo model (config.json needs model_type: weightspace-zoo, "
                        f"with arch, input_shape and num_classes)")
    try:
        arch, shape, classes = config["arch"], config["input_shape"], config["num_classes"]
    except KeyError as e:
        raise SpecError(f"{source}: config.json has no {e.args[0]!r}") from None
    if not isinstance(arch, Mapping) or not isinstance(shape, list):
        raise InputError(f"{source}: config.json's arch must be an object and input_shape a list")
    try:
        return build_model(arch, tuple(shape), classes, tensors=tensors, source=source)
    except SpecError as e:   # a config.json is an input file: name it
        raise InputError(f"{source}: config.json: {e}") from None
