"""A whitespace word-level tokenizer written from a word list: for tiny test models and offline
benchmarks that need a tokenizer no Hub can supply.

    write_word_tokenizer(model_dir, ["apple", "pear", "fig"])   # ids: <unk> 0, <s> 1, </s> 2, apple 3, ...

It writes `tokenizer.json` (a `tokenizers` WordLevel model split on whitespace, with `<unk>`,
`<s>` and `</s>` as special tokens at ids 0, 1 and 2, the words after them in order) and a
`tokenizer_config.json` that transformers' `AutoTokenizer` loads as a PreTrainedTokenizerFast.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

SPECIALS = ("<unk>", "<s>", "</s>")


def write_word_tokenizer(directory: str | Path, words: Sequence[str]) -> Path:
    """Write the tokenizer files into `directory` (which must exist); returns it."""
    d = Path(directory)
    specials = list(SPECIALS)
    vocab = {w: i for i, w in enumerate(specials + list(words))}
    if len(vocab) != len(specials) + len(words):
        raise ValueError("write_word_tokenizer: the words repeat or name a special token")
    added = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": True} for i, t in enumerate(specials)]
    tok = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
           "normalizer": None, "pre_tokenizer": {"type": "WhitespaceSplit"}, "post_processor": None,
           "decoder": None, "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"}}
    (d / "tokenizer.json").write_text(json.dumps(tok))
    (d / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "unk_token": "<unk>", "bos_token": "<s>",
        "eos_token": "</s>"}))
    return d


__all__ = ["SPECIALS", "write_word_tokenizer"]
