"""Bind a WeightSpace to a torch module without touching the module.

    space = space_of(model, config={...})                  # a module's parameters as a WeightSpace
    logits = call(model, space, x)                         # forward with the space's tensors
    load_into(model, space)                                # copy the tensors into the module (checked)

Data-aware work (zoo training and metrics, Fisher diagonals, RegMean Gram
matrices, aTLAS coefficients) runs models through
`torch.func.functional_call`, so one module skeleton serves any number of
weight spaces and the module's own tensors are never modified in place.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from weightspace.errors import InputError
from weightspace.ir import WeightSpace


def space_of(module: nn.Module, *, meta: dict | None = None, config: dict | None = None,
             buffers: bool = True) -> WeightSpace:
    """The module's `state_dict()` as an in-memory WeightSpace of detached CPU copies: its
    parameters and persistent buffers (`buffers=False`: parameters only). Non-persistent
    buffers such as a rotary embedding's `inv_freq` are left out, as state_dict leaves them
    out: a checkpoint holding one is reported as unexpected by transformers."""
    params = {n for n, _ in module.named_parameters(remove_duplicate=False)}
    tensors = {n: t.detach().to("cpu").clone() for n, t in module.state_dict().items()
               if buffers or n in params}
    m = {"source": type(module).__name__, "format": "memory", **(meta or {})}
    if config is not None:
        m["config"] = config
    return WeightSpace.from_tensors(tensors, m)


def tensors_for(module: nn.Module, space: WeightSpace | Mapping[str, torch.Tensor], *,
                device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                strict: bool = True) -> dict[str, torch.Tensor]:
    """Load the tensors `module` needs from `space`, checked against the module's names and shapes.

    What a module needs is its `state_dict()`: parameters and persistent buffers (the module
    computes its non-persistent buffers itself). A name tied to another one the space has
    (a tied lm_head) is not missing.
    """
    expected = dict(module.state_dict(keep_vars=True))
    names = set(space.keys())
    source = space.source if isinstance(space, WeightSpace) else "the given tensors"
    if strict:
        present = {expected[n].data_ptr() for n in names if n in expected}
        missing = sorted(n for n in set(expected) - names if expected[n].data_ptr() not in present)
        extra = sorted(names - set(expected))
        if missing:
            raise InputError(f"{source} has no tensor {missing[0]!r} that {type(module).__name__} needs"
                             + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
        if extra:
            raise InputError(f"{source} has tensor {extra[0]!r}, which {type(module).__name__} does not have"
                             + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""))
    out = {}
    for n, ref in expected.items():
        if n not in names:
            continue
        item: Any = space[n]
        t = item.load(device, None) if isinstance(space, WeightSpace) else item.to(device)
        if tuple(t.shape) != tuple(ref.shape):
            raise InputError(f"tensor {n!r} in {source} has shape {list(t.shape)}, "
                             f"but {type(module).__name__} expects {list(ref.shape)}")
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        out[n] = t
    return out


def call(module: nn.Module, space: WeightSpace | Mapping[str, torch.Tensor], *args: Any,
         **kwargs: Any) -> Any:
    """`module(*args, **kwargs)` computed with the space's tensors (torch.func.functional_call)."""
    device = next((t.device for t in args if isinstance(t, torch.Tensor)), torch.device("cpu"))
    params = tensors_for(module, space, device=device)
    return torch.func.functional_call(module, params, args, kwargs)


def load_into(module: nn.Module, space: WeightSpace | Mapping[str, torch.Tensor]) -> nn.Module:
    """Copy the space's tensors into `module` (names and shapes checked); returns the module."""
    params = tensors_for(module, space)
    with torch.no_grad():
        for n, t in module.state_dict(keep_vars=True).items():
            if n in params:  # a tied twin absent from the space shares its storage with one present
                t.copy_(params[n])
    return module


# ---------------------------------------------------------------------------------------------
# adapters: how a module turns a batch into predictions, for data-aware statistics

IGNORE_INDEX = -100


def top1_counts(logits: torch.Tensor, labels: torch.Tensor) -> tuple[int, int]:
    """(correct, counted): top-1 predictions of `logits` (..., C) equal to `labels` (...), counting
    only labels that are not IGNORE_INDEX. Every accuracy in the project sums these.

    >>> top1_counts(torch.tensor([[2.0, 1.0], [0.0, 3.0], [1.0, 0.0]]), torch.tensor([0, 0, IGNORE_INDEX]))
    (1, 2)
    """
    keep = labels != IGNORE_INDEX
    return int(((logits.argmax(-1) == labels) & keep).sum()), int(keep.sum())


class Adapter:
    """How a module turns a batch (a dict of tensors with a leading batch dim) into predictions.

    `logits(params, batch)` -> (B, K, C): K predictions per example (1 for a classifier,
    the sequence positions for a language model) over C classes; `labels(batch)` -> (B, K)
    class ids with IGNORE_INDEX (-100) where there is nothing to predict. Statistics
    (Fisher diagonals, Gram matrices, aTLAS coefficients) are written once against this.
    """

    def __init__(self, module: nn.Module):
        self.module = module

    def params(self) -> dict[str, torch.Tensor]:
        """The module's own parameters, detached (what statistics are taken at by default)."""
        return {n: p.detach() for n, p in self.module.named_parameters()}

    def forward(self, params: Mapping[str, torch.Tensor], batch: Mapping[str, torch.Tensor]) -> Any:
        raise NotImplementedError

    def logits(self, params: Mapping[str, torch.Tensor], batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def labels(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def labels_or_none(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor | None:
        """`labels(batch)`, or None for a batch without labels (unsupervised objectives)."""
        try:
            return self.labels(batch)
        except KeyError:
            return None

    def accuracy(self, params: Mapping[str, torch.Tensor], batches: Iterable[Mapping[str, torch.Tensor]]
                 ) -> float | None:
        """Top-1 accuracy of `params` over labelled `batches` (IGNORE_INDEX not counted), without
        gradients; None when no example is labelled. A batch without labels is an InputError."""
        right = total = 0
        with torch.no_grad():
            for b in batches:
                y = self.labels_or_none(b)
                if y is None:
                    raise InputError(f"accuracy needs labelled batches; this one has keys {', '.join(b)}")
                r, n = top1_counts(self.logits(params, b), y)
                right, total = right + r, total + n
        return right / total if total else None

    def token_mask(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor | None:
        """(B, T) 1 for real tokens, 0 for padding; None when inputs are not sequences."""
        return None

    @property
    def num_classes(self) -> int | None:
        return None


class ClassifierAdapter(Adapter):
    """A module mapping inputs `x` (B, ...) to logits (B, C); batches are {"x": ..., "y": ...}."""

    def __init__(self, module: nn.Module, num_classes: int | None = None):
        super().__init__(module)
        self._classes = num_classes

    def forward(self, params, batch):
        return torch.func.functional_call(self.module, dict(params), (batch["x"],))

    def logits(self, params, batch):
        return self.forward(params, batch).unsqueeze(1)

    def labels(self, batch):
        return batch["y"].long().unsqueeze(1)

    @property
    def num_classes(self) -> int | None:
        return self._classes


_HF_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


class HFSequenceClassifierAdapter(Adapter):
    """A transformers `*ForSequenceClassification`; batches carry input_ids, attention_mask, labels."""

    def forward(self, params, batch):
        kwargs = {k: batch[k] for k in _HF_INPUTS if k in batch}
        return torch.func.functional_call(self.module, dict(params), (), kwargs).logits

    def logits(self, params, batch):
        return self.forward(params, batch).unsqueeze(1)

    def labels(self, batch):
        return batch["labels"].long().unsqueeze(1)

    def token_mask(self, batch):
        return batch.get("attention_mask")

    @property
    def num_classes(self) -> int | None:
        return int(self.module.config.num_labels)


class HFCausalLMAdapter(Adapter):
    """A transformers `*ForCausalLM`: predict token t+1 from tokens <= t; padding ignored."""

    def forward(self, params, batch):
        kwargs = {k: batch[k] for k in ("input_ids", "attention_mask") if k in batch}
        return torch.func.functional_call(self.module, dict(params), (), kwargs).logits

    def logits(self, params, batch):
        return self.forward(params, batch)[:, :-1, :]

    def labels(self, batch):
        y = batch["input_ids"][:, 1:].long()
        mask = batch.get("attention_mask")
        if mask is not None:
            y = y.masked_fill(mask[:, 1:] == 0, IGNORE_INDEX)
        return y

    def token_mask(self, batch):
        return batch.get("attention_mask")

    @property
    def num_classes(self) -> int | None:
        return int(self.module.config.vocab_size)
