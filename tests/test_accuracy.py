"""One accuracy for the project (weightspace.binding): `--search`, aTLAS's best-epoch selection and
learngene's reports all count top-1 hits with `top1_counts`."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from weightspace.binding import IGNORE_INDEX, ClassifierAdapter, top1_counts
from weightspace.errors import InputError


def test_top1_counts_skip_ignored_labels():
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0], [0.0, 0.0, 5.0], [9.0, 0.0, 0.0]])
    labels = torch.tensor([0, 2, 2, IGNORE_INDEX])
    assert top1_counts(logits, labels) == (2, 3)          # rows 0 and 2 right, row 1 wrong, row 3 not counted
    # sequence-shaped predictions (B, K, C) with labels (B, K)
    assert top1_counts(logits.reshape(2, 2, 3), labels.reshape(2, 2)) == (2, 3)


def test_adapter_accuracy_is_hits_over_labelled_examples():
    torch.manual_seed(0)
    module = nn.Linear(4, 3)
    adapter = ClassifierAdapter(module)
    batches = [{"x": torch.randn(5, 4), "y": torch.tensor([0, 1, 2, IGNORE_INDEX, 1])},
               {"x": torch.randn(3, 4), "y": torch.tensor([2, 2, 0])}]
    with torch.no_grad():
        hits = sum(int(((module(b["x"]).argmax(-1) == b["y"]) & (b["y"] != IGNORE_INDEX)).sum()) for b in batches)
    assert adapter.accuracy(adapter.params(), batches) == pytest.approx(hits / 7)
    assert adapter.accuracy(adapter.params(), [{"x": torch.randn(2, 4), "y": torch.full((2,), IGNORE_INDEX)}]) is None
    with pytest.raises(InputError, match="accuracy needs labelled batches; this one has keys x"):
        adapter.accuracy(adapter.params(), [{"x": torch.randn(2, 4)}])
