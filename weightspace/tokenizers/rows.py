"""Each input model's vocabulary tensor in the output's token order: its own rows, gathered,
and default rows for the tokens it lacks.

    plan = make_row_plan(vocab, "model.embed_tokens.weight", order, base)   # once per tensor
    ref = VocabRowsRef(name, model, own_ref, plan, refs, vocab.rows, torch.float32)

The default rows follow mergekit 0.1.5's PermutedVocabulary (mergekit/tokenizer/embed.py): a
token only one model has takes that model's row; in no model, zeros; else the base's row when
the base is merged into the tensor and has it; else the mean over the models that have it. A
`tokens` override picks the source instead, and `force` gives every model that row. Rows past
the vocabulary (`pad_to_multiple_of`) are each model's mean row.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from weightspace.errors import SpecError
from weightspace.ir import SafetensorsRef, TensorRef, slice_rows
from weightspace.spec import ModelTokenEmbedding, ZeroEmbedding

if TYPE_CHECKING:
    from weightspace.tokenizers.vocabulary import Vocabulary


@dataclass
class RowPlan:
    """One tensor's default rows (shared by every model's ref of it) and each model's own rows."""

    size: int
    default_ids: torch.Tensor                              # output ids that get a default row
    divisor: torch.Tensor                                  # per default row: 1 or the mean's count
    contribs: dict[str, tuple[torch.Tensor, torch.Tensor]]  # model -> (default positions, its rows)
    own: dict[str, tuple[torch.Tensor, torch.Tensor]]      # model -> (output ids, its rows)
    fill_pos: dict[str, torch.Tensor]                      # model -> default positions it takes
    order: tuple[str, ...]

    @property
    def donors(self) -> list[str]:
        return [m for m in self.order if m in self.contribs]


# ---------------------------------------------------------------- per tensor: default rows


def make_row_plan(vocab: Vocabulary, tensor: str, order: tuple[str, ...], base: str | None) -> RowPlan:
    """mergekit's PermutedVocabulary, decided once per tensor: which tokens get a default
    row, and how it is made."""
    n = vocab.size
    id_to_token = {i: t for t, i in vocab.tokens.items()}
    perm = torch.stack([vocab.perms[m] for m in order])                 # [models, n]
    forced = torch.zeros(n, dtype=torch.bool)
    for t in vocab.forced_tokens():
        forced[vocab.tokens[t]] = True
    need = forced | (perm < 0).any(0)
    default_ids = need.nonzero().flatten()
    contribs: dict[str, tuple[list[int], list[int]]] = {}
    divisor = torch.ones(len(default_ids))
    nowhere = []
    for k, tid in enumerate(default_ids.tolist()):
        tok = id_to_token[tid]
        recipe = _recipe(vocab, tensor, tok, tid, order, base)
        for m, row, div in recipe:
            pos, rows = contribs.setdefault(m, ([], []))
            pos.append(k)
            rows.append(row)
            divisor[k] = div
        if not recipe and not (tok in vocab.overrides and vocab.overrides[tok].source is not None):
            nowhere.append(tok)
    if nowhere:
        some = ", ".join(repr(t) for t in nowhere[:5]) + (", ..." if len(nowhere) > 5 else "")
        vocab.notes.append(f"{len(nowhere)} token(s) of the output vocabulary are in none of the "
                           f"models merged into {tensor!r} ({some}); their rows there are zeros")
    own, fill_pos = {}, {}
    for j, m in enumerate(order):
        keep = (perm[j] >= 0) & ~forced  # rows the model brings itself; the rest are defaults
        own[m] = (keep.nonzero().flatten(), perm[j][keep])
        fill_pos[m] = (~keep)[default_ids].nonzero().flatten()
    return RowPlan(size=n, default_ids=default_ids, divisor=divisor,
                   contribs={m: (torch.tensor(p, dtype=torch.long), torch.tensor(r, dtype=torch.long))
                             for m, (p, r) in contribs.items()},
                   own=own, fill_pos=fill_pos, order=order)


def _recipe(vocab: Vocabulary, tensor: str, tok: str, tid: int, order: tuple[str, ...],
            base: str | None) -> list[tuple[str, int, float]]:
    """How the default row of one token is made: (model, its row, divisor) terms summed in
    order; no terms is a zero row."""
    cfg = vocab.overrides.get(tok)
    src = cfg.source if cfg is not None else None
    at = vocab.where("tokenizer", "tokens", tok, "source")
    if isinstance(src, ZeroEmbedding):
        return []
    if isinstance(src, ModelTokenEmbedding):
        m = _merged_into(src.model, tensor, order, tok, at)
        if src.token is not None:
            row = vocab.original[m].get(src.token)
            if row is None:
                raise SpecError(f"{at}: token {src.token!r} is not in model {m!r}'s vocabulary")
        else:
            row = src.token_id
        rows = vocab.member_rows[m]
        if rows is not None and row >= rows:
            raise SpecError(f"{at}: row {row} is outside model {m!r}'s vocabulary of {rows} rows")
        return [(m, row, 1.0)]
    if isinstance(src, str):
        m = _merged_into(src, tensor, order, tok, at)
        row = int(vocab.perms[m][tid])
        if row < 0:
            raise SpecError(f"{at}: token {tok!r} is not in model {m!r}'s vocabulary; use "
                            f"{{kind: model_token, model: {m}, token: ...}} to take another "
                            f"token's row, or {{kind: zero}}")
        return [(m, row, 1.0)]
    # no override (or one without a source): mergekit's assignment
    present = [m for m in order if int(vocab.perms[m][tid]) >= 0]
    if len(present) == 1:
        return [(present[0], int(vocab.perms[present[0]][tid]), 1.0)]
    if not present:
        return []  # zeros (make_row_plan says so)
    if base is not None and base in present:
        return [(base, int(vocab.perms[base][tid]), 1.0)]
    return [(m, int(vocab.perms[m][tid]), float(len(present))) for m in present]


def _merged_into(model: str, tensor: str, order: tuple[str, ...], tok: str, at: str) -> str:
    if model not in order:
        raise SpecError(f"{at}: token {tok!r} takes its row from model {model!r}, which is not "
                        f"merged into tensor {tensor!r} (its models: {', '.join(order)})")
    return model


# ---------------------------------------------------------------- the lazy tensor


class VocabRowsRef(TensorRef):
    """One model's vocabulary tensor in the output's token order, or rows [lo, hi) of it: its
    own rows gathered, the default rows made from the rows of the models that have those tokens,
    padding rows set to its mean row. Reads only the rows it needs (positioned reads where the
    tensors are stored in safetensors), so it streams in row blocks like any stored tensor."""

    __slots__ = ("model", "own", "plan", "refs", "rows", "work_dtype", "span")

    def __init__(self, name: str, model: str, own: TensorRef, plan: RowPlan,
                 refs: dict[str, TensorRef], rows: int, work_dtype: torch.dtype,
                 span: tuple[int, int] | None = None):
        lo, hi = span or (0, rows)
        super().__init__(name, (hi - lo, *own.shape[1:]), own.dtype)
        self.model, self.own, self.plan, self.refs = model, own, plan, refs
        self.rows, self.work_dtype, self.span = rows, work_dtype, (lo, hi)

    def block(self, r0: int, r1: int) -> VocabRowsRef:
        """Rows [r0, r1) of this one (what `slice_rows` is for a stored tensor)."""
        lo = self.span[0]
        return self._rows(lo + r0, lo + r1)

    def _rows(self, lo: int, hi: int) -> VocabRowsRef:
        """Output rows [lo, hi) of the whole tensor."""
        return VocabRowsRef(self.name, self.model, self.own, self.plan, self.refs, self.rows,
                            self.work_dtype, (lo, hi))

    @property
    def _whole(self) -> bool:
        return self.span == (0, self.rows)

    def _wanted(self) -> tuple[tuple[int, int], dict[str, tuple[torch.Tensor, torch.Tensor]],
                                tuple[torch.Tensor, torch.Tensor]]:
        """For the token rows in the span: the default positions [k0, k1), per donor model the
        (positions, its rows) it adds to them, and this model's (output ids, its rows)."""
        p = self.plan
        vlo, vhi = self.span[0], min(self.span[1], p.size)
        k0, k1 = (int(torch.searchsorted(p.default_ids, v)) for v in (vlo, vhi))
        donors = {}
        for m, (pos, rows) in p.contribs.items():
            sel = (pos >= k0) & (pos < k1)
            if bool(sel.any()):
                donors[m] = (pos[sel] - k0, rows[sel])
        ids, src = p.own[self.model]
        a, b = (int(torch.searchsorted(ids, v)) for v in (vlo, vhi))
        return (k0, k1), donors, (ids[a:b], src[a:b])

    def leaves(self) -> list[TensorRef]:
        if self.span[1] > self.plan.size and not self._whole:
            return self._rows(0, self.plan.size).leaves()  # padding rows read all token rows
        _, donors, (_, src) = self._wanted()
        out = [self.own] if self._whole else [r for r, _ in _runs_of(self.own, src)]
        for m, (_, rows) in donors.items():
            if m != self.model or not self._whole:
                out += [r for r, _ in _runs_of(self.refs[m], rows)]
        return out

    def _load_cpu(self) -> torch.Tensor:
        return self.load("cpu")

    def load(self, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> torch.Tensor:
        # Rows are built in the merge's compute dtype (mergekit permutes the tensors it gathered
        # in `dtype`), so means and padding round as there; the result stays in that dtype.
        work = dtype or self.work_dtype
        p, (lo, hi) = self.plan, self.span
        rest = tuple(self.own.shape[1:])
        out = torch.zeros((hi - lo, *rest), dtype=work, device=device)
        if lo < p.size:
            self._fill(out, device, work)
        if hi > p.size:
            # mergekit pads with the mean row (after https://nlp.stanford.edu/~johnhew/vocab-expansion.html)
            rows = out[: p.size] if self._whole else self._rows(0, p.size).load(device, work)
            out[max(0, p.size - lo):] = torch.mean(rows, dim=0)
        return out

    def _fill(self, out: torch.Tensor, device: str | torch.device, work: torch.dtype) -> None:
        """The token rows of the span: own rows, then the defaults this model takes."""
        p, lo = self.plan, self.span[0]
        (k0, k1), donors, (ids, src) = self._wanted()
        own = self.own.load(device, work) if self._whole else None

        def rows_of(m: str, rows: torch.Tensor) -> torch.Tensor:
            if own is not None and m == self.model:
                return own[rows.to(own.device)]
            return _gather(self.refs[m], rows, device, work)

        dev, rest = out.device, tuple(out.shape[1:])
        table = torch.zeros((k1 - k0, *rest), dtype=work, device=dev)
        for m in p.order:  # summed in mergekit's order, so a mean rounds the same
            if m in donors:
                pos, rows = donors[m]
                table[pos.to(dev)] += rows_of(m, rows)
        table /= p.divisor[k0:k1].to(device=dev, dtype=work).reshape(-1, *([1] * len(rest)))
        for a in range(0, len(ids), _COPY_ROWS):  # in pieces: no second full-size copy of `own`
            out[(ids[a : a + _COPY_ROWS] - lo).to(dev)] = rows_of(self.model, src[a : a + _COPY_ROWS])
        own = None  # noqa: F841 - free this model's rows before the defaults are written
        fill = p.fill_pos[self.model]
        fill = fill[(fill >= k0) & (fill < k1)]
        out[(p.default_ids[fill] - lo).to(dev)] = table[(fill - k0).to(dev)]


_COPY_ROWS = 4096


def _runs_of(ref: TensorRef, rows: torch.Tensor) -> list[tuple[TensorRef, torch.Tensor]]:
    """`ref`'s rows as lazy pieces: contiguous runs of a stored tensor (positioned reads), or
    the whole tensor otherwise. Each piece comes with the positions of `rows` it holds."""
    uniq = torch.unique(rows)
    if not isinstance(ref, SafetensorsRef) or not len(uniq):
        return [(ref, uniq)]
    breaks = (uniq[1:] - uniq[:-1] != 1).nonzero().flatten() + 1
    pieces = []
    for run in torch.tensor_split(uniq, breaks.tolist()):
        a, b = int(run[0]), int(run[-1]) + 1
        pieces.append((slice_rows(ref, a, b), run - a))
    return pieces


def _gather(ref: TensorRef, rows: torch.Tensor, device: str | torch.device,
            dtype: torch.dtype) -> torch.Tensor:
    """Rows `rows` (in that order) of `ref`, reading only those where it is stored."""
    pieces = _runs_of(ref, rows)
    if len(pieces) == 1 and pieces[0][0] is ref:
        return ref.load(device, dtype)[rows.to(device)]
    uniq = torch.unique(rows)
    got = torch.cat([piece.load(device, dtype) for piece, _ in pieces])
    return got[torch.searchsorted(uniq, rows).to(got.device)]
