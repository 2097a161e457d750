"""UFM, the paper's test-time objective: fixed zero-shot pseudo-labels, trusted examples, two views.

    stream = UFMBatches.from_zero_shot(probs, x, batch_size=128, augment=crop_flip, gen=gen)
    key, batch = stream.next()        # {"x": weak view, "x_strong": strong view, "pseudo", "trusted"}
    stream.epoch_length               # batches in one pass over the untrusted examples

As the authors' src/learn_ufm.py (`train`): before any step, the zero-shot model (the
coefficients at their initial value, 0 = the pre-trained model) predicts every unlabelled
test input once; its argmax is each example's fixed pseudo-label. For each class c the k
examples with the highest predicted probability of c are "trusted",
k = min(N / C / 10, 100) (at least 1 here). Every batch holds 3/4 untrusted examples (one
seeded pass over them is an epoch, an incomplete last group dropped) and 1/4 trusted ones
(cycled through seeded passes), each as a weak view (the input as it is) and a strong view
(`augment`, by default a random resized crop and flip). `ufm_loss` then trains the strong
view against the weak view's confident predictions and the trusted examples' fixed labels.

One departure, on purpose: the released script marks every example trusted
(`trusted_bool[ids_c] = 1` sets the argsort of the last class, a permutation of all the
indices), so there every example trains on its fixed zero-shot label and the threshold
never applies. Here only the selected k per class are trusted, as `ssl_loss_trusted`'s
docstring and the paper describe.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from weightspace.merges.atlas.data import Augment


def trusted_count(n: int, classes: int) -> int:
    """k, the trusted examples per class: the authors' min(int(N / C / 10), 100), at least 1."""
    return max(1, min(int(n / classes / 10), 100))


def trusted_per_class(probs: torch.Tensor, k: int) -> torch.Tensor:
    """The sorted, distinct indices of the k examples with the highest probability of each class."""
    top = torch.topk(probs, min(k, probs.shape[0]), dim=0).indices  # (k, C)
    return torch.unique(top.flatten())


@dataclass
class UFMBatches:
    """The batches UFM trains on (see the module docstring)."""

    x: torch.Tensor
    pseudo: torch.Tensor
    trusted: torch.Tensor      # indices
    untrusted: torch.Tensor    # indices
    batch_size: int
    augment: Augment
    gen: torch.Generator

    def __post_init__(self) -> None:
        self.n_primary = max(1, 3 * self.batch_size // 4)
        self.n_secondary = max(1, self.batch_size // 4)
        self.epoch_length = max(1, len(self.untrusted) // self.n_primary)
        self._primary: list[int] = []
        self._secondary: list[int] = []

    @classmethod
    def from_zero_shot(cls, probs: torch.Tensor, x: torch.Tensor, *, batch_size: int, augment: Augment,
                       gen: torch.Generator) -> UFMBatches:
        """From the zero-shot model's probabilities (N, C) on the pooled inputs x (N, ...)."""
        n, classes = probs.shape
        # indices stay on the CPU (with the CPU generator's draws) whatever device the data is on
        trusted = trusted_per_class(probs, trusted_count(n, classes)).cpu()
        is_trusted = torch.zeros(n, dtype=torch.bool)
        is_trusted[trusted] = True
        untrusted = torch.nonzero(~is_trusted).flatten()
        if untrusted.numel() == 0:  # tiny data: everything is trusted; cycle it as the main stream too
            untrusted = trusted
        return cls(x, probs.argmax(-1), trusted, untrusted, batch_size, augment, gen)

    def _draw(self, pool: torch.Tensor, buffer: list[int], n: int) -> list[int]:
        while len(buffer) < n:
            buffer.extend(pool[torch.randperm(len(pool), generator=self.gen)].tolist())
        out = buffer[:n]
        del buffer[:n]
        return out

    def next(self) -> tuple[None, dict[str, torch.Tensor]]:
        """The next batch (no key: every batch is drawn afresh)."""
        if not self._primary or len(self._primary) < self.n_primary:
            # a new epoch: one seeded pass over the untrusted examples, in groups of 3/4 B
            perm = self.untrusted[torch.randperm(len(self.untrusted), generator=self.gen)].tolist()
            usable = max(self.n_primary, len(perm) // self.n_primary * self.n_primary)
            self._primary = (perm * (usable // max(1, len(perm)) + 1))[:usable]
        primary = self._primary[:self.n_primary]
        del self._primary[:self.n_primary]
        secondary = self._draw(self.trusted, self._secondary, self.n_secondary)
        idx = torch.tensor(primary + secondary)
        x = self.x[idx]
        trusted = torch.zeros(len(idx), dtype=torch.bool, device=x.device)
        trusted[len(primary):] = True
        return None, {"x": x, "x_strong": self.augment(x, self.gen), "pseudo": self.pseudo[idx],
                      "trusted": trusted}
