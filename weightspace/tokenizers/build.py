"""Building the output vocabulary from the spec's tokenizer settings (mergekit's build_tokenizer).

    vocab = build_vocabulary(settings, base, members, source_model)   # tokenizer files only
    vocab = template_only("chatml", donor, members, where)            # chat_template alone

The output tokenizer is the union of the models' (the base's tokens, then every other model's
new ones), the base's (stripped of ids past its vocab_size) or one model's; `tokens` overrides
that are new join it, a chat template is set, and `pad_to_multiple_of` rounds its rows up.
Each model then gets its row map: output token -> its own row for that token, or -1.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from weightspace.chat_templates import resolve_chat_template
from weightspace.errors import InputError, SpecError
from weightspace.extras import require
from weightspace.spec import ModelTokenEmbedding, TokenEmbedding
from weightspace.tokenizers.hf_tokenizers import load_tokenizer, stripped_tokenizer, union_tokenizer
from weightspace.tokenizers.members import VOCAB_FILES, Member, config_vocab_size, has_vocab_files
from weightspace.tokenizers.vocabulary import Vocabulary


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
    fallback, stripped, fallback_of = _fallback_tokenizer(tf, settings, base, source_model, at)
    toks = _member_tokenizers(tf, members, base, fallback, fallback_of, notes)
    out, unchanged, carry_from = _output_tokenizer(tf, settings, base, members, source_model,
                                                   fallback, stripped, toks, at)
    vocab = out.get_vocab()
    rows = _output_rows(vocab, settings.pad_to_multiple_of, at)
    perms, original, member_rows = _row_maps(vocab, members, toks, fallback)
    _check_overrides(settings, members, original)
    if unchanged:
        files, tokenizer = dict(carry_from.files), None
    else:
        files, tokenizer = _carried(carry_from), out
        out.init_kwargs.pop("local_files_only", None)  # how we read it, not part of the tokenizer
    return Vocabulary(tokens=dict(vocab), rows=rows, perms=perms, original=original,
                      member_rows=member_rows, overrides=dict(settings.tokens), where=settings.where,
                      tokenizer=tokenizer, files=files, notes=notes)


def _fallback_tokenizer(tf: Any, settings: Settings, base: Member, source_model: Member | None,
                        at: str) -> tuple[Any, bool, Member]:
    """The vocabulary a model without tokenizer files is taken to have: the base's, stripped of
    ids past its vocab_size (True in second place when that dropped any), and whose it is."""
    if settings.source not in ("union", "base") and not has_vocab_files(base.path):
        # mergekit reads the base's tokenizer first and fails here; with a model as the source,
        # that model's vocabulary stands in for the base's
        assert source_model is not None
        return load_tokenizer(tf, source_model, needed_for=at), False, source_model
    tok, stripped = stripped_tokenizer(tf, base, at)
    return tok, stripped, base


def _member_tokenizers(tf: Any, members: list[Member], base: Member, fallback: Any,
                       fallback_of: Member, notes: list[str]) -> dict[str, Any]:
    """Each member's own tokenizer, by reference (the base's is the fallback when that is the
    base's); a member without tokenizer files has none here and shares the fallback's."""
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
        toks[m.ref] = load_tokenizer(tf, m)
    return toks


def _output_tokenizer(tf: Any, settings: Settings, base: Member, members: list[Member],
                      source_model: Member | None, fallback: Any, stripped: bool,
                      toks: dict[str, Any], at: str) -> tuple[Any, bool, Member]:
    """The output tokenizer (union, base or a model's, with new `tokens` and the chat template),
    whether it is the source's files unchanged, and the member whose files go with it."""
    if settings.source == "union":
        out, added = union_tokenizer(tf, fallback, toks, {m.ref: m for m in members})
        unchanged = not stripped and not added
        carry_from = base
    elif settings.source == "base":
        out, unchanged, carry_from = fallback, not stripped, base
    else:
        assert source_model is not None
        out, unchanged, carry_from = load_tokenizer(tf, source_model, needed_for=at), True, source_model

    have = out.get_vocab()
    new = [tok for tok in settings.tokens if tok not in have]  # as mergekit, these join it
    if new:
        out.add_tokens(new)
        unchanged = False

    template = _chat_template(settings.chat_template, [toks[m.ref] for m in members if m.ref in toks])
    if template is not None:
        out.chat_template = template
        unchanged = False
    return out, unchanged, carry_from


def _output_rows(vocab: dict[str, int], pad: int | None, at: str) -> int:
    """Rows of the output's vocabulary tensors: one per token, padded to `pad_to_multiple_of`."""
    n = len(vocab)
    if n and max(vocab.values()) >= n:
        raise InputError(f"{at}: the output tokenizer's ids are not 0..{n - 1} (it has id "
                         f"{max(vocab.values())}); its vocabulary has gaps")
    return -(-n // pad) * pad if pad else n


def _row_maps(vocab: dict[str, int], members: list[Member], toks: dict[str, Any],
              fallback: Any) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, int]],
                                      dict[str, int | None]]:
    """Per member: its row for each output id (-1: it lacks the token), its own vocabulary, and
    the rows of its vocabulary tensors."""
    n = len(vocab)
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
    return perms, original, member_rows


def template_only(chat_template: str, donor: Member, members: list[Member],
                  where: Callable[..., str]) -> Vocabulary | None:
    """`chat_template` without a tokenizer source: the donor's tokenizer, re-written with the
    template (mergekit re-serializes it the same way). None when `auto` finds no template."""
    at = where("chat_template")
    tf = require("transformers", "hf", f"{at}: writing a chat template needs transformers")
    if not has_vocab_files(donor.path):
        raise InputError(f"{at}: model {donor.ref!r}, whose tokenizer the output gets, has no "
                         f"tokenizer files to add the chat template to")
    tok = load_tokenizer(tf, donor, needed_for=at)
    others = [tok if m.ref == donor.ref else load_tokenizer(tf, m) for m in members if has_vocab_files(m.path)]
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
