"""The output vocabulary: its tokens, each input model's row map, and its tokenizer files.

    refs = vocab.align("model.embed_tokens.weight", order, refs, base=..., work_dtype=...)
    vocab.write(out_dir)                    # the output's tokenizer files, chat template

weightspace.tokenizers.build makes one (`build_vocabulary`, `template_only`); the rows each
model's tensor gets are weightspace.tokenizers.rows's.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from weightspace.errors import InputError
from weightspace.inputs import copy_input_file
from weightspace.ir import TensorRef
from weightspace.spec import TokenEmbedding
from weightspace.tokenizers.rows import RowPlan, VocabRowsRef, make_row_plan


@dataclass
class Vocabulary:
    """The output vocabulary and, per input model, where each output token's row comes from."""

    tokens: dict[str, int]                   # output token -> id (ids 0..n-1)
    rows: int                                # output rows: len(tokens), padded
    perms: dict[str, torch.Tensor]           # model -> its row per output id (-1: it lacks it)
    original: dict[str, dict[str, int]]      # model -> its own vocabulary (for model_token)
    member_rows: dict[str, int | None]       # model -> rows of its vocabulary tensors
    overrides: dict[str, TokenEmbedding]
    where: Callable[..., str]                # a spec field with its line
    tokenizer: Any = None                    # transformers tokenizer to save; None: copy files
    files: dict[str, Path] = field(default_factory=dict)  # files copied as they are
    notes: list[str] = field(default_factory=list)
    _plans: dict[tuple, RowPlan] = field(default_factory=dict)

    @property
    def size(self) -> int:
        return len(self.tokens)

    def write(self, directory: Path) -> None:
        """Write the output tokenizer into `directory` (the sink's temporary output)."""
        for name, src in self.files.items():
            copy_input_file(src, directory / name)  # only from inside its model directory
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(str(directory))

    def needs_rows(self, model: str, rows: int) -> bool:
        """True when model's tensor with `rows` rows must be re-ordered or padded."""
        perm = self.perms[model]
        return not (rows == self.rows == self.size and bool(
            torch.equal(perm, torch.arange(self.size))) and not self.forced_tokens())

    def forced_tokens(self) -> list[str]:
        """Tokens whose `tokens` override has `force: true` (every model gets the default row)."""
        return [t for t, c in self.overrides.items() if c.force]

    def align(self, tensor: str, order: list[str], refs: dict[str, TensorRef], *,
              base: str | None, work_dtype: torch.dtype) -> dict[str, TensorRef]:
        """Each model's `tensor` in the output's token order (lazily; a model whose rows
        already line up keeps its ref). `order` is the order mergekit averages in."""
        if not any(self.needs_rows(m, refs[m].shape[0]) for m in order):
            return dict(refs)
        plan = self._row_plan(tensor, tuple(order), base)
        out = {}
        for m in order:
            ref = refs[m]
            top = int(self.perms[m].max()) if self.size else -1
            if top >= ref.shape[0]:
                raise InputError(f"tensor {tensor!r} of model {m!r} has {ref.shape[0]} rows, but its "
                                 f"tokenizer gives a token id {top}")
            out[m] = VocabRowsRef(tensor, m, ref, plan, refs, self.rows, work_dtype)
        return out

    def align_companion(self, tensor: str, order: list[str], refs: dict[str, TensorRef],
                        model: str, *, base: str | None, work_dtype: torch.dtype) -> TensorRef:
        """A companion tensor of `model` (same shape as its tensor: a Fisher diagonal) in the
        output's token order, its missing rows made from the other models' companions as the
        tensor's are."""
        plan = self._row_plan(tensor, tuple(order), base)
        missing = [d for d in plan.donors if d not in refs]
        if missing:
            raise InputError(f"tensor {tensor!r}: rows of tokens that model {model!r} lacks come from "
                             f"model {missing[0]!r}, which has no companion for it; give every model "
                             f"a companion")
        return VocabRowsRef(tensor, model, refs[model], plan, refs, self.rows, work_dtype)

    def _row_plan(self, tensor: str, order: tuple[str, ...], base: str | None) -> RowPlan:
        """The tensor's default rows, decided once per (tensor, models, base)."""
        key = (tensor, order, base)
        if key not in self._plans:
            self._plans[key] = make_row_plan(self, tensor, order, base)
        return self._plans[key]
