"""Merged tokenizers: the output vocabulary, each input model's embedding rows in its order.

    vocab = build_vocabulary("union", base, members, settings)   # tokenizer files only, no tensor
    refs = vocab.align("model.embed_tokens.weight", order, refs, base=..., work_dtype=...)
    vocab.write(out_dir)                                          # tokenizer files, chat template

A `tokenizer_source` (or a `tokenizer:` block) makes the output vocabulary `union` (the base's
tokens, then every other model's new tokens), `base`'s, or one model's. Each input model then
gets a row map: output token -> its own row for that token, or none. A vocabulary-indexed tensor
(embeddings, `lm_head`) of each model reaches the method as a lazy `VocabRowsRef` that reads
that one tensor and gathers its rows in the output's order; a token the model lacks gets a
default row, so the method sees tensors that line up row by row. The rules are mergekit
0.1.5's (mergekit/tokenizer/build.py and embed.py):

- a token only one model has: that model's row; in no model: zeros; else the base's row when
  the base is merged into the tensor and has it; else the mean over the models that have it;
- `tokens: {TOKEN: {source: MODEL | {kind: zero} | {kind: model_token, ...}, force: true}}`
  picks the source (added to the vocabulary if new); `force` gives every model that row;
- `pad_to_multiple_of` pads the rows with each model's mean row.

Where mergekit's order is a set's or a hash map's (which model is "first", the ids of new
tokens in a union), this module takes the spec's order and each model's own token ids, so a
spec always gives the same token ids.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from weightspace.chat_templates import resolve_chat_template
from weightspace.errors import InputError, SpecError
from weightspace.extras import require
from weightspace.ir import SafetensorsRef, TensorRef, slice_rows
from weightspace.sources import TOKENIZER_FILES
from weightspace.spec import ModelTokenEmbedding, TokenEmbedding, ZeroEmbedding
from weightspace.structure import parse_layer

# Files that hold a vocabulary (without one of these, a directory has no tokenizer to read).
VOCAB_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model",
               "sentencepiece.bpe.model")

# Tensors indexed by token along dim 0: mergekit 0.1.5's architecture definitions
# (`vocabulary_axis: 0`), outside any layer stack.
VOCAB_TENSORS = frozenset({
    "model.embed_tokens.weight", "embed_tokens.weight", "lm_head.weight", "lm_head.bias",
    "model.language_model.embed_tokens.weight", "model.tok_embeddings.weight", "output.weight",
    "transformer.wte.weight", "transformer.word_embeddings.weight", "transformer.embd.wte.weight",
    "transformer.embedding.word_embeddings.weight", "transformer.output_layer.weight",
    "gpt_neox.embed_in.weight", "embed_out.weight", "backbone.embeddings.weight",
    "bert.embeddings.word_embeddings.weight", "roberta.embeddings.word_embeddings.weight",
    "distilbert.embeddings.word_embeddings.weight", "embeddings.word_embeddings.weight",
    "cls.predictions.decoder.weight", "cls.predictions.bias", "lm_head.decoder.weight",
    "lm_head.linear.weight", "lm_head.linear.bias", "vocab_projector.weight",
    "vocab_projector.bias", "shared.weight", "encoder.embed_tokens.weight",
    "decoder.embed_tokens.weight",
})  # fmt: skip


def is_vocab_tensor(name: str) -> bool:
    """True for a tensor whose rows are tokens (embeddings, output head)."""
    return parse_layer(name) is None and (name in VOCAB_TENSORS or name.endswith(".embed_tokens.weight"))


def config_vocab_size(config: dict | None) -> int | None:
    """`vocab_size` of a config.json (or of its `text_config`), as mergekit reads it."""
    for cfg in (config or {}, (config or {}).get("text_config") or {}):
        v = cfg.get("vocab_size") if isinstance(cfg, dict) else None
        if isinstance(v, int) and not isinstance(v, bool):
            return v
    return None


def set_config_vocab_size(config: dict, n: int) -> None:
    """Write the output's vocabulary size where the input config keeps it."""
    if "vocab_size" not in config and isinstance(config.get("text_config"), dict) \
            and "vocab_size" in config["text_config"]:
        config["text_config"]["vocab_size"] = n
    else:
        config["vocab_size"] = n


def has_vocab_files(d: Path | None) -> bool:
    return d is not None and any((d / f).is_file() for f in VOCAB_FILES)


@dataclass
class Member:
    """An input model as the tokenizer step sees it (the planner fills these in)."""

    ref: str                      # as written in the spec
    path: Path | None             # its directory (None: a bare file, which has no tokenizer)
    config: dict | None
    rows: int | None              # rows of its vocabulary tensors, None when it has none
    files: dict[str, Path] = field(default_factory=dict)  # its tokenizer files (name -> path)


def tokenizer_only(d: Path | None) -> bool:
    """A directory with tokenizer files and no checkpoint: a tokenizer source, not a model."""
    if d is None or not d.is_dir() or not has_vocab_files(d):
        return False
    weights = ("*.safetensors", "*.safetensors.index.json", "pytorch_model.bin*", "*.pt", "*.pth")
    return not any(any(d.glob(w)) for w in weights)


def tokenizer_member(ref: str, d: Path) -> Member:
    """A tokenizer-only directory as a Member (no rows: it brings no tensors)."""
    cfg = None
    if (d / "config.json").is_file():
        try:
            cfg = json.loads((d / "config.json").read_text())
        except (ValueError, OSError) as e:
            raise InputError(f"{d / 'config.json'}: not valid JSON ({e})") from None
    return Member(ref=ref, path=d, config=cfg if isinstance(cfg, dict) else None, rows=None,
                  files={n: d / n for n in TOKENIZER_FILES if (d / n).is_file()})


# ---------------------------------------------------------------- the vocabulary


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
    _plans: dict[tuple, _RowPlan] = field(default_factory=dict)

    @property
    def size(self) -> int:
        return len(self.tokens)

    def write(self, directory: Path) -> None:
        """Write the output tokenizer into `directory` (the sink's temporary output)."""
        for name, src in self.files.items():
            shutil.copyfile(src, directory / name)
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(str(directory))

    def needs_rows(self, model: str, rows: int) -> bool:
        """True when model's tensor with `rows` rows must be re-ordered or padded."""
        perm = self.perms[model]
        return not (rows == self.rows == self.size and bool(
            torch.equal(perm, torch.arange(self.size))) and not self._forced())

    def _forced(self) -> list[str]:
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

    # ------------------------------------------------------------ per tensor: default rows

    def _row_plan(self, tensor: str, order: tuple[str, ...], base: str | None) -> _RowPlan:
        key = (tensor, order, base)
        if key not in self._plans:
            self._plans[key] = self._make_row_plan(tensor, order, base)
        return self._plans[key]

    def _make_row_plan(self, tensor: str, order: tuple[str, ...], base: str | None) -> _RowPlan:
        """mergekit's PermutedVocabulary, decided once per tensor: which tokens get a default
        row, and how it is made."""
        n = self.size
        id_to_token = {i: t for t, i in self.tokens.items()}
        perm = torch.stack([self.perms[m] for m in order])                 # [models, n]
        forced = torch.zeros(n, dtype=torch.bool)
        for t in self._forced():
            forced[self.tokens[t]] = True
        need = forced | (perm < 0).any(0)
        default_ids = need.nonzero().flatten()
        contribs: dict[str, tuple[list[int], list[int]]] = {}
        divisor = torch.ones(len(default_ids))
        nowhere = []
        for k, tid in enumerate(default_ids.tolist()):
            tok = id_to_token[tid]
            recipe = self._recipe(tensor, tok, tid, order, base)
            for m, row, div in recipe:
                pos, rows = contribs.setdefault(m, ([], []))
                pos.append(k)
                rows.append(row)
                divisor[k] = div
            if not recipe and not (tok in self.overrides and self.overrides[tok].source is not None):
                nowhere.append(tok)
        if nowhere:
            some = ", ".join(repr(t) for t in nowhere[:5]) + (", ..." if len(nowhere) > 5 else "")
            self.notes.append(f"{len(nowhere)} token(s) of the output vocabulary are in none of the "
                              f"models merged into {tensor!r} ({some}); their rows there are zeros")
        own, fill_pos = {}, {}
        for j, m in enumerate(order):
            keep = (perm[j] >= 0) & ~forced  # rows the model brings itself; the rest are defaults
            own[m] = (keep.nonzero().flatten(), perm[j][keep])
            fill_pos[m] = (~keep)[default_ids].nonzero().flatten()
        return _RowPlan(size=n, default_ids=default_ids, divisor=divisor,
                        contribs={m: (torch.tensor(p, dtype=torch.long), torch.tensor(r, dtype=torch.long))
                                  for m, (p, r) in contribs.items()},
                        own=own, fill_pos=fill_pos, order=order)

    def _recipe(self, tensor: str, tok: str, tid: int, order: tuple[str, ...],
                base: str | None) -> list[tuple[str, int, float]]:
        """How the default row of one token is made: (model, its row, divisor) terms summed in
        order; no terms is a zero row."""
        cfg = self.overrides.get(tok)
        src = cfg.source if cfg is not None else None
        at = self.where("tokenizer", "tokens", tok, "source")
        if isinstance(src, ZeroEmbedding):
            return []
        if isinstance(src, ModelTokenEmbedding):
            m = self._merged_into(src.model, tensor, order, tok, at)
            if src.token is not None:
                row = self.original[m].get(src.token)
                if row is None:
                    raise SpecError(f"{at}: token {src.token!r} is not in model {m!r}'s vocabulary")
            else:
                row = src.token_id
            rows = self.member_rows[m]
            if rows is not None and row >= rows:
                raise SpecError(f"{at}: row {row} is outside model {m!r}'s vocabulary of {rows} rows")
            return [(m, row, 1.0)]
        if isinstance(src, str):
            m = self._merged_into(src, tensor, order, tok, at)
            row = int(self.perms[m][tid])
            if row < 0:
                raise SpecError(f"{at}: token {tok!r} is not in model {m!r}'s vocabulary; use "
                                f"{{kind: model_token, model: {m}, token: ...}} to take another "
                                f"token's row, or {{kind: zero}}")
            return [(m, row, 1.0)]
        # no override (or one without a source): mergekit's assignment
        present = [m for m in order if int(self.perms[m][tid]) >= 0]
        if len(present) == 1:
            return [(present[0], int(self.perms[present[0]][tid]), 1.0)]
        if not present:
            return []  # zeros (_make_row_plan says so)
        if base is not None and base in present:
            return [(base, int(self.perms[base][tid]), 1.0)]
        return [(m, int(self.perms[m][tid]), float(len(present))) for m in present]

    def _merged_into(self, model: str, tensor: str, order: tuple[str, ...], tok: str, at: str) -> str:
        if model not in order:
            raise SpecError(f"{at}: token {tok!r} takes its row from model {model!r}, which is not "
                            f"merged into tensor {tensor!r} (its models: {', '.join(order)})")
        return model


@dataclass
class _RowPlan:
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


class VocabRowsRef(TensorRef):
    """One model's vocabulary tensor in the output's token order, or rows [lo, hi) of it: its
    own rows gathered, the default rows made from the rows of the models that have those tokens,
    padding rows set to its mean row. Reads only the rows it needs (positioned reads where the
    tensors are stored in safetensors), so it streams in row blocks like any stored tensor."""

    __slots__ = ("model", "own", "plan", "refs", "rows", "work_dtype", "span")

    def __init__(self, name: str, model: str, own: TensorRef, plan: _RowPlan,
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


# ---------------------------------------------------------------- building it


@dataclass
class Settings:
    """What the spec asks of the tokenizer."""

    source: str                                  # union | base | a model
    tokens: dict[str, TokenEmbedding]
    pad_to_multiple_of: int | None
    chat_template: str | None
    where: Callable[..., str]
    source_field: tuple[str, ...]


def build_vocabulary(settings: Settings, base: Member, members: list[Member],
                     source_model: Member | None) -> Vocabulary:
    """The output tokenizer and every member's row map (mergekit's build_tokenizer).

    `members` are the models merged (base first); `source_model` is the tokenizer source when
    it is a model. Reads tokenizer files only; needs transformers (the hf extra).
    """
    at = settings.where(*settings.source_field)
    check_token_models(settings, [m.ref for m in members])
    tf = require("transformers", "hf", f"{at}: building the output tokenizer needs transformers")
    notes: list[str] = []
    if settings.source not in ("union", "base") and not has_vocab_files(base.path):
        # mergekit reads the base's tokenizer first and fails here; with a model as the source,
        # that model's vocabulary stands in for the base's
        assert source_model is not None
        fallback, stripped = _load(tf, source_model, needed_for=at), False
        fallback_of = source_model
    else:
        fallback, stripped = _stripped(tf, base, at)
        fallback_of = base
    toks: dict[str, Any] = {base.ref: fallback} if fallback_of is base else {}
    for m in members:
        if m.ref in toks:
            continue
        if not has_vocab_files(m.path):
            # mergekit takes such a model to share the base's vocabulary; believable only when
            # its embeddings have as many rows
            if m.rows is not None and fallback_of.rows is not None and m.rows != fallback_of.rows:
                raise InputError(f"model {m.ref!r} has no tokenizer files ({', '.join(VOCAB_FILES[:4])}) "
                                 f"and {m.rows} embedding rows where {fallback_of.ref!r}, whose "
                                 f"vocabulary it would take, has {fallback_of.rows}; add its "
                                 f"tokenizer files")
            notes.append(f"model {m.ref!r} has no tokenizer files; taking it to have the vocabulary "
                         f"of {fallback_of.ref!r}")
            continue
        toks[m.ref] = _load(tf, m)

    if settings.source == "union":
        out, added = _union(tf, fallback, toks, {m.ref: m for m in members})
        unchanged = not stripped and not added
        carry_from = base
    elif settings.source == "base":
        out, unchanged, carry_from = fallback, not stripped, base
    else:
        assert source_model is not None
        out, unchanged, carry_from = _load(tf, source_model, needed_for=at), True, source_model

    have = out.get_vocab()
    new = [tok for tok in settings.tokens if tok not in have]  # as mergekit, these join it
    if new:
        out.add_tokens(new)
        unchanged = False

    template = _chat_template(settings.chat_template, [toks[m.ref] for m in members if m.ref in toks])
    if template is not None:
        out.chat_template = template
        unchanged = False

    vocab = out.get_vocab()
    n = len(vocab)
    if n and max(vocab.values()) >= n:
        raise InputError(f"{at}: the output tokenizer's ids are not 0..{n - 1} (it has id "
                         f"{max(vocab.values())}); its vocabulary has gaps")
    pad = settings.pad_to_multiple_of
    rows = -(-n // pad) * pad if pad else n

    perms, original, member_rows = {}, {}, {}
    for m in members:
        own = toks.get(m.ref, fallback).get_vocab()
        limit = config_vocab_size(m.config) or len(own)
        ids = torch.full((n,), -1, dtype=torch.long)
        for tok, i in vocab.items():
            j = own.get(tok)
            if j is not None and j < limit:  # ids past vocab_size are padding, not tokens
                ids[i] = j
        perms[m.ref], original[m.ref], member_rows[m.ref] = ids, own, m.rows

    _check_overrides(settings, members, original)
    if unchanged:
        files, tokenizer = dict(carry_from.files), None
    else:
        files, tokenizer = _carried(carry_from), out
        out.init_kwargs.pop("local_files_only", None)  # how we read it, not part of the tokenizer
    return Vocabulary(tokens=dict(vocab), rows=rows, perms=perms, original=original,
                      member_rows=member_rows, overrides=dict(settings.tokens), where=settings.where,
                      tokenizer=tokenizer, files=files, notes=notes)


def template_only(chat_template: str, donor: Member, members: list[Member],
                  where: Callable[..., str]) -> Vocabulary | None:
    """`chat_template` without a tokenizer source: the donor's tokenizer, re-written with the
    template (mergekit re-serializes it the same way). None when `auto` finds no template."""
    at = where("chat_template")
    tf = require("transformers", "hf", f"{at}: writing a chat template needs transformers")
    if not has_vocab_files(donor.path):
        raise InputError(f"{at}: model {donor.ref!r}, whose tokenizer the output gets, has no "
                         f"tokenizer files to add the chat template to")
    tok = _load(tf, donor, needed_for=at)
    others = [tok if m.ref == donor.ref else _load(tf, m) for m in members if has_vocab_files(m.path)]
    template = _chat_template(chat_template, others)
    if template is None:
        return None
    tok.chat_template = template
    tok.init_kwargs.pop("local_files_only", None)
    vocab = tok.get_vocab()
    return Vocabulary(tokens=dict(vocab), rows=len(vocab), perms={}, original={}, member_rows={},
                      overrides={}, where=where, tokenizer=tok, files=_carried(donor))


def _carried(m: Member) -> dict[str, Path]:
    """Files that go with a re-written tokenizer: the generation config (its token ids are the
    source's, which the output keeps)."""
    return {n: p for n, p in m.files.items() if n == "generation_config.json"}


def check_token_models(settings: Settings, refs: list[str]) -> None:
    """`tokens` overrides name models of this merge (checked before anything is read)."""
    for tok, cfg in settings.tokens.items():
        model = _override_model(cfg)
        if model is not None and model not in refs:
            raise SpecError(f"{settings.where('tokenizer', 'tokens', tok, 'source')}: token {tok!r} "
                            f"takes its row from {model!r}, which is not a model of this merge "
                            f"(models: {', '.join(refs)})")


def _override_model(cfg: TokenEmbedding) -> str | None:
    src = cfg.source
    return src.model if isinstance(src, ModelTokenEmbedding) else src if isinstance(src, str) else None


def _check_overrides(settings: Settings, members: list[Member], original: dict) -> None:
    """`tokens` overrides that take another token's row name a token that model has."""
    check_token_models(settings, [m.ref for m in members])
    for tok, cfg in settings.tokens.items():
        src = cfg.source
        if isinstance(src, ModelTokenEmbedding) and src.token is not None \
                and src.token not in original[src.model]:
            raise SpecError(f"{settings.where('tokenizer', 'tokens', tok, 'source')}: token "
                            f"{src.token!r} is not in model {src.model!r}'s vocabulary")


def _load(tf: Any, m: Member, needed_for: str | None = None) -> Any:
    """The model's tokenizer, as transformers reads it; never remote code or the network."""
    if not has_vocab_files(m.path):
        where = f"{needed_for}: " if needed_for else ""
        raise InputError(f"{where}model {m.ref!r} has no tokenizer files (looked for "
                         f"{', '.join(VOCAB_FILES[:4])} in {m.path})")
    try:
        return tf.AutoTokenizer.from_pretrained(str(m.path), trust_remote_code=False,
                                                local_files_only=True, use_fast=True)
    except Exception as e:  # transformers raises many types for unreadable tokenizers
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise InputError(f"model {m.ref!r}: cannot read its tokenizer in {m.path}: {first}") from None


def _stripped(tf: Any, base: Member, at: str) -> tuple[Any, bool]:
    """The base tokenizer without tokens whose ids are past the base's vocab_size (mergekit's
    get_stripped_tokenizer); True in second place when it dropped any."""
    tok = _load(tf, base, needed_for=at)
    size = config_vocab_size(base.config) or len(tok.get_vocab())
    unused = {t for t, i in tok.get_vocab().items() if i >= size}
    if not unused:
        return tok, False
    if not getattr(tok, "is_fast", False):
        raise InputError(f"model {base.ref!r}: its tokenizer has {len(unused)} tokens past vocab_size "
                         f"{size} and no tokenizer.json to remove them from")
    data = json.loads(tok._tokenizer.to_str())
    model = data["model"]
    kind = model.get("type")
    data["added_tokens"] = [e for e in data.get("added_tokens", []) if e["id"] < size]
    if kind in ("BPE", "WordLevel", "WordPiece"):
        for t in unused:
            model["vocab"].pop(t, None)
        if kind == "BPE":
            def keep(merge: Any) -> bool:
                # mergekit checks the two parts only; a merge that makes a dropped token must go
                # too, or the tokenizer cannot be loaded
                parts = merge.split(" ") if isinstance(merge, str) else merge
                return not any(p in unused for p in [*parts, "".join(parts)])
            model["merges"] = [mg for mg in model.get("merges", []) if keep(mg)]
    elif kind == "Unigram":
        model["vocab"] = model["vocab"][:size]
    else:
        raise InputError(f"model {base.ref!r}: its {kind} tokenizer has tokens past vocab_size {size}, "
                         f"which only BPE, WordLevel, WordPiece and Unigram tokenizers can drop")
    tokenizers = require("tokenizers", "hf", "building the output tokenizer needs tokenizers")
    try:
        tok._tokenizer = tokenizers.Tokenizer.from_str(json.dumps(data))
    except Exception as e:  # the tokenizers library raises a bare Exception
        raise InputError(f"model {base.ref!r}: its tokenizer without the {len(unused)} tokens past "
                         f"vocab_size {size} cannot be built: {e}") from None
    return tok, True


def _union(tf: Any, base_tok: Any, toks: dict[str, Any], members: dict[str, Member]) -> tuple[Any, bool]:
    """mergekit's build_union_tokenizer: a copy of the base tokenizer plus, in model order, every
    token it lacks; tokens another model added (special or not) keep their settings. Returns the
    tokenizer and whether it gained any token."""
    out_vocab: dict[str, None] = {}
    out_added: dict[str, Any] = {}
    for ref, tok in toks.items():
        size = config_vocab_size(members[ref].config) or tok.vocab_size
        for t, i in sorted(tok.get_vocab().items(), key=lambda kv: kv[1]):  # each model's own order
            if i < size:
                out_vocab.setdefault(t)
        for i, info in sorted(tok.added_tokens_decoder.items()):
            if i < size:
                out_added.setdefault(info.content, info)
    with tempfile.TemporaryDirectory() as d:  # a copy, so the base's tokenizer stays as read
        base_tok.save_pretrained(d)
        res = tf.AutoTokenizer.from_pretrained(d, trust_remote_code=False, local_files_only=True,
                                               use_fast=True)
    base_vocab = base_tok.get_vocab()
    before = _fingerprint(res)
    # one call per kind: the tokenizers library rebuilds its added vocabulary on every call,
    # so mergekit's one call per token takes minutes for a large union
    res.add_tokens([t for t in out_vocab if t not in out_added and t not in base_vocab])
    res.add_tokens(list(out_added.values()))
    return res, _fingerprint(res) != before


def _fingerprint(tok: Any) -> tuple:
    """What adding tokens can change: the vocabulary and the added tokens' settings."""
    return (sorted(tok.get_vocab().items()),
            sorted((i, str(info)) for i, info in tok.added_tokens_decoder.items()))


def _chat_template(value: str | None, toks: list[Any]) -> str | None:
    """The template text to write: a name's, an inline one, or with `auto` the most common
    template among the models (the first of those tied; None when no model has one)."""
    if value is None:
        return None
    if value != "auto":
        return resolve_chat_template(value)
    found = []
    for tok in toks:
        t = getattr(tok, "chat_template", None)
        if isinstance(t, dict):
            t = t.get("default")
        if t:
            found.append(t.strip())
    return Counter(found).most_common(1)[0][0] if found else None


__all__ = ["Member", "Settings", "VocabRowsRef", "Vocabulary", "build_vocabulary",
           "check_token_models", "config_vocab_size", "is_vocab_tensor", "set_config_vocab_size",
           "template_only", "tokenizer_member", "tokenizer_only"]
