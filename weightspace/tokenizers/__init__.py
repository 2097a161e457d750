"""Merged tokenizers: the output vocabulary, each input model's embedding rows in its order.

    vocab = build_vocabulary(settings, base, members, source_model)  # tokenizer files only
    refs = vocab.align("model.embed_tokens.weight", order, refs, base=..., work_dtype=...)
    vocab.write(out_dir)                                              # tokenizer files, chat template

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
tokens in a union), this package takes the spec's order and each model's own token ids, so a
spec always gives the same token ids.

A module per job: `members` (which tensors are token-indexed; the input models),
`hf_tokenizers` (reading the models' tokenizers; the stripped base, the union), `build` (the
output vocabulary from the spec's settings), `vocabulary` (the result: row maps, writing the
output tokenizer), `rows` (default rows and the lazy `VocabRowsRef`).
"""

from __future__ import annotations

from weightspace.tokenizers.build import (
    Settings,
    build_vocabulary,
    check_token_models,
    template_only,
)
from weightspace.tokenizers.members import (
    Member,
    config_vocab_size,
    is_vocab_tensor,
    set_config_vocab_size,
    tokenizer_member,
    tokenizer_only,
)
from weightspace.tokenizers.rows import VocabRowsRef
from weightspace.tokenizers.vocabulary import Vocabulary

__all__ = ["Member", "Settings", "VocabRowsRef", "Vocabulary", "build_vocabulary",
           "check_token_models", "config_vocab_size", "is_vocab_tensor", "set_config_vocab_size",
           "template_only", "tokenizer_member", "tokenizer_only"]
