"""The input models' tokenizers, as transformers reads them, and the two made from them.

    tok = load_tokenizer(tf, member)                      # never remote code or the network
    base_tok, dropped = stripped_tokenizer(tf, base, at)  # without ids past vocab_size
    union, grew = union_tokenizer(tf, base_tok, toks, members)

`tf` is the transformers module (weightspace.extras.require loads it, or says which extra to
install). These are mergekit 0.1.5's get_stripped_tokenizer and build_union_tokenizer
(mergekit/tokenizer/build.py); where they differ from it, a comment says why.
"""

from __future__ import annotations

import json
import tempfile
from typing import Any

from weightspace.errors import InputError
from weightspace.extras import require
from weightspace.inputs import check_carried
from weightspace.tokenizers.members import VOCAB_FILES, Member, config_vocab_size, has_vocab_files


def load_tokenizer(tf: Any, m: Member, needed_for: str | None = None) -> Any:
    """The model's tokenizer, as transformers reads it; never remote code or the network."""
    if not has_vocab_files(m.path):
        where = f"{needed_for}: " if needed_for else ""
        raise InputError(f"{where}model {m.ref!r} has no tokenizer files (looked for "
                         f"{', '.join(VOCAB_FILES[:4])} in {m.path})")
    check_carried(m.files)  # what transformers reads, and writes on into OUT: only from inside m.path
    try:
        return tf.AutoTokenizer.from_pretrained(str(m.path), trust_remote_code=False,
                                                local_files_only=True, use_fast=True)
    except Exception as e:  # transformers raises many types for unreadable tokenizers
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise InputError(f"model {m.ref!r}: cannot read its tokenizer in {m.path}: {first}") from None


def stripped_tokenizer(tf: Any, base: Member, at: str) -> tuple[Any, bool]:
    """The base tokenizer without tokens whose ids are past the base's vocab_size (mergekit's
    get_stripped_tokenizer); True in second place when it dropped any."""
    tok = load_tokenizer(tf, base, needed_for=at)
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


def union_tokenizer(tf: Any, base_tok: Any, toks: dict[str, Any], members: dict[str, Member]) -> tuple[Any, bool]:
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
