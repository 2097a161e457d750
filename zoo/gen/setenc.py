"""A dataset encoder: k examples per class -> one vector, invariant to every order in the set.

    enc = DatasetEncoder(input_dim=64, hidden=64, out_dim=32)
    emb = embed_task(enc, load_task("digits"), k=16, seed=0)          # (32,)
    s = class_samples(task.train.x, task.train.y, k=16, num_classes=10)  # (10, 16, 64)
    enc(s)                                                            # (32,); enc(batch) -> (B, 32)

The conditioning encoder of D2NWG ("Diffusion-Based Neural Network Weights Generation",
Soro et al., ICLR 2025), a two-level set transformer there and a two-level Deep Set here
(Zaheer et al., 2017): phi maps every example and a mean over the K examples of a class
gives that class's embedding; rho maps every class embedding and a mean and a max over the
classes give the dataset's. The result does not depend on the order of the examples within
a class nor on the order (or ids) of the classes.

An untrained encoder is a random but fixed feature map: its weights are drawn from a
generator seeded with `seed`, so the same seed gives the same embeddings in every run,
and different datasets (a rotated copy, another class subset, a corruption) still get
different embeddings. D2NWG trains the encoder jointly with, or contrastively against, the
weight latents; `contrastive_loss` is that optional CLIP-style alignment stage.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from weightspace.errors import InputError, SpecError


def _mlp(d_in: int, hidden: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU())


class DatasetEncoder(nn.Module):
    """Two-level Deep Set: (C, K, D) or (B, C, K, D) -> (out_dim,) or (B, out_dim).

        enc = DatasetEncoder(64, hidden=64, out_dim=32, seed=0)
        enc(torch.rand(10, 16, 64)).shape                 # (32,)

    `seed` fixes the initial weights (None: torch's global RNG, like any module).
    """

    def __init__(self, input_dim: int, hidden: int = 64, out_dim: int = 32, *,
                 seed: int | None = 0):
        super().__init__()
        for name, value in (("input_dim", input_dim), ("hidden", hidden), ("out_dim", out_dim)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise SpecError(f"dataset encoder: {name} must be an integer >= 1, got {value!r}")
        self.input_dim, self.hidden, self.out_dim = input_dim, hidden, out_dim
        self.phi = _mlp(input_dim, hidden)        # per example
        self.rho = _mlp(hidden, hidden)           # per class
        self.out = nn.Linear(2 * hidden, out_dim)  # on [mean, max] over classes
        if seed is not None:
            g = torch.Generator().manual_seed(seed)
            for m in self.modules():
                if isinstance(m, nn.Linear):
                    # He init keeps the feature scale through the SiLU layers of a random map
                    nn.init.kaiming_uniform_(m.weight, nonlinearity="relu", generator=g)
                    bound = 1.0 / math.sqrt(m.in_features)
                    nn.init.uniform_(m.bias, -bound, bound, generator=g)

    def class_embeddings(self, x: torch.Tensor) -> torch.Tensor:
        """(..., C, K, D) -> (..., C, hidden): phi per example, mean over the K examples."""
        return self.phi(x).mean(dim=-2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.dim() not in (3, 4) or x.shape[-1] != self.input_dim:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise InputError(f"dataset encoder: expected (classes, k, {self.input_dim}) or "
                             f"(batch, classes, k, {self.input_dim}), got {got}")
        if 0 in x.shape[-3:-1]:
            raise InputError(f"dataset encoder: needs at least one class and one example, "
                             f"got {tuple(x.shape)}")
        h = self.rho(self.class_embeddings(x))               # (..., C, hidden)
        pooled = torch.cat([h.mean(dim=-2), h.amax(dim=-2)], dim=-1)
        return self.out(pooled)


def _per_class(x: torch.Tensor, y: torch.Tensor, k: int, classes: list[int], seed: int
               ) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    flat = x.reshape(x.shape[0], -1)
    y = y.to(device="cpu")
    rows = []
    for c in classes:
        idx = torch.nonzero(y == c).flatten()
        if len(idx) >= k:
            pick = idx[torch.randperm(len(idx), generator=g)[:k]]
        else:
            # too few examples: draw with replacement so every class has k
            pick = idx[torch.randint(len(idx), (k,), generator=g)]
        rows.append(flat[pick.to(flat.device)])
    return torch.stack(rows)


def _check_xy(where: str, x: torch.Tensor, y: torch.Tensor, k: int) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise SpecError(f"{where}: k must be an integer >= 1, got {k!r}")
    if x.dim() < 1 or y.dim() != 1 or x.shape[0] != y.shape[0]:
        raise InputError(f"{where}: x (N, ...) and y (N,) must have the same N, got "
                         f"{tuple(x.shape)} and {tuple(y.shape)}")
    if y.is_floating_point() or y.is_complex():
        raise InputError(f"{where}: labels must be integers, got {y.dtype}")


def class_samples(x: torch.Tensor, y: torch.Tensor, k: int, num_classes: int, seed: int = 0
                  ) -> torch.Tensor:
    """k seeded examples of each class 0..num_classes-1, features flattened: (C, k, D).

        class_samples(task.train.x, task.train.y, k=16, num_classes=10)   # (10, 16, 64)

    A class with fewer than k examples is sampled with replacement; one with none is an
    InputError, as is a label outside 0..num_classes-1.
    """
    _check_xy("class_samples", x, y, k)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise SpecError(f"class_samples: num_classes must be an integer >= 1, got {num_classes!r}")
    present = set(torch.unique(y).tolist())
    outside = sorted(c for c in present if not 0 <= c < num_classes)
    if outside:
        raise InputError(f"class_samples: label {outside[0]} is outside 0..{num_classes - 1} "
                         f"(num_classes={num_classes})")
    missing = [c for c in range(num_classes) if c not in present]
    if missing:
        more = f" (nor of {', '.join(map(str, missing[1:]))})" if len(missing) > 1 else ""
        raise InputError(f"class_samples: the data has no example of class {missing[0]}{more}; "
                         f"pass the classes it has, or a num_classes that matches")
    return _per_class(x, y, k, list(range(num_classes)), seed)


class SupportSets:
    """Random per-class support sets of one split, drawn in batches: (B, C, k, D).

        sets = SupportSets(load_task("digits:rotate=90"))          # its train split
        sets.draw(40, k=5, generator=torch.Generator().manual_seed(0)).shape   # (40, 10, 5, 64)

    D2NWG draws a fresh set of `num_sample` (5) examples per class for every training
    example (`ZooDataset.__getitem__` in zoodatasets/sampler.py of the authors'
    repository, github:sorobedio/DNNWG) and for every generated model (`sample_cond` in
    mlp_sampling.py); this is that draw, vectorised. Within a set the k examples of a
    class are distinct; if a class has fewer than k examples, every class is drawn with
    replacement. The classes are the split's own, in sorted order.
    """

    def __init__(self, task_or_split):
        split = getattr(task_or_split, "train", task_or_split)
        if not hasattr(split, "x") or not hasattr(split, "y"):
            raise InputError(f"support sets: expected a TaskData or a Split, got {type(task_or_split).__name__}")
        _check_xy("support sets", split.x, split.y, 1)
        y = split.y.to("cpu")
        self.classes = sorted(torch.unique(y).tolist())
        if not self.classes:
            raise InputError("support sets: the split has no examples")
        flat = split.x.reshape(split.x.shape[0], -1).to("cpu", torch.float32)
        per = [torch.nonzero(y == c).flatten() for c in self.classes]
        self.counts = torch.tensor([len(i) for i in per])
        width = int(self.counts.max())
        # (C, width) example indices, padded with each class's first index (never drawn: masked)
        self.index = torch.stack([torch.cat([i, i[:1].expand(width - len(i))]) for i in per])
        self.x = flat

    def draw(self, n: int, k: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """n independent support sets, (n, C, k, D) float32 on the CPU."""
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise SpecError(f"support sets: k must be an integer >= 1, got {k!r}")
        c, width = self.index.shape
        if int(self.counts.min()) >= k:
            # k distinct examples per class: the k smallest of uniform keys, padding keyed out
            keys = torch.rand((n, c, width), generator=generator)
            keys = keys.masked_fill(torch.arange(width) >= self.counts[:, None], 2.0)
            pos = keys.topk(k, dim=-1, largest=False).indices                  # (n, C, k)
        else:
            u = torch.rand((n, c, k), generator=generator)
            pos = (u * self.counts[:, None]).long().clamp_max(self.counts[:, None] - 1)
        rows = torch.gather(self.index.expand(n, c, width), 2, pos)              # (n, C, k)
        return self.x[rows]


def embed_task(encoder: DatasetEncoder, task_or_split, k: int = 16, seed: int = 0, *,
               grad: bool = False) -> torch.Tensor:
    """The embedding (out_dim,) of a zoo task (its train split) or of one Split.

        embed_task(enc, load_task("digits:rotate=90"), k=16, seed=0)

    Uses the classes the split has (a class-subset task is embedded over its own classes),
    k seeded examples each. Without `grad` the result is computed under no_grad.
    """
    split = getattr(task_or_split, "train", task_or_split)
    if not hasattr(split, "x") or not hasattr(split, "y"):
        raise InputError(f"embed_task: expected a TaskData or a Split, got {type(task_or_split).__name__}")
    _check_xy("embed_task", split.x, split.y, k)
    classes = sorted(torch.unique(split.y).tolist())
    if not classes:
        raise InputError("embed_task: the split has no examples")
    samples = _per_class(split.x, split.y, k, classes, seed)
    param = next(encoder.parameters())
    samples = samples.to(device=param.device, dtype=param.dtype)
    with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
        return encoder(samples)


def contrastive_loss(data_emb: torch.Tensor, weight_emb: torch.Tensor, temperature: float = 0.1
                     ) -> torch.Tensor:
    """Symmetric InfoNCE (CLIP) between matching rows of two (B, E) batches.

        loss = contrastive_loss(encoder(sets), weight_latents, temperature=0.1)

    Rows are L2-normalised; logits = d @ w.T / temperature; the loss is the mean of the
    cross-entropies of rows and of columns against the diagonal (row i matches row i).
    """
    if data_emb.dim() != 2 or data_emb.shape != weight_emb.shape or data_emb.shape[0] < 1:
        raise InputError(f"contrastive_loss: expected two (B, E) batches of the same shape, got "
                         f"{tuple(data_emb.shape)} and {tuple(weight_emb.shape)}")
    if not temperature > 0:
        raise SpecError(f"contrastive_loss: temperature must be > 0, got {temperature!r}")
    d = F.normalize(data_emb, dim=1)
    w = F.normalize(weight_emb, dim=1)
    logits = d @ w.T / temperature
    labels = torch.arange(logits.shape[0], device=logits.device)
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))
