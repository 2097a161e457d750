"""Which input tensors are token-indexed, and the input models as the tokenizer step sees them.

    is_vocab_tensor("model.embed_tokens.weight")        # True: its rows are tokens
    member = tokenizer_member("org/tok", Path("tok"))    # a tokenizer-only directory

A vocabulary-indexed tensor (embeddings, `lm_head`) is what a merged vocabulary re-orders; a
`Member` is one input model's directory, config and row count, which the planner fills in.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from weightspace.files import read_json_object
from weightspace.sources import tokenizer_files
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
    cfg = read_json_object(d / "config.json") if os.path.lexists(d / "config.json") else None
    return Member(ref=ref, path=d, config=cfg, rows=None, files=tokenizer_files(d))
