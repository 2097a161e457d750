"""Evaluation files, read and checked whole before a model runs.

    data = read_data("val.txt")          # perplexity: one document per non-empty line
    data = read_data("mc.jsonl")         # {"context", "choices", "answer"} multiple choice
    data.kind, len(data.items), data.sha256

A file's shape decides what is measured:

    a text file (not .jsonl)                     perplexity, one document per non-empty line
    JSONL {"text"}                               perplexity, one document per line
    JSONL {"context", "choices", "answer"}       multiple choice by log-likelihood (lm-eval style)
    JSONL {"text", "choices", "label"}           the same, with text as the context
    JSONL {"text", "label"}                      classification (a sequence classifier's head)

Every line must have the shape of the first one; a wrong line is named by file:line.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from weightspace.errors import InputError, SpecError

KINDS = ("perplexity", "multiple_choice", "classification")


@dataclass(frozen=True)
class Document:
    """A text scored by perplexity."""
    text: str
    line: int


@dataclass(frozen=True)
class Question:
    """Multiple choice: `context` followed by each of `choices`; `answer` the right one's index."""
    context: str
    choices: tuple[str, ...]
    answer: int
    line: int


@dataclass(frozen=True)
class Labelled:
    """Classification by a sequence classifier's head."""
    text: str
    label: int
    text_pair: str | None
    line: int


@dataclass
class EvalData:
    path: Path
    kind: str
    items: list[Any] = field(default_factory=list)
    sha256: str = ""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _shape(row: dict) -> str:
    if "choices" in row:
        return "multiple_choice"
    if "label" in row:
        return "classification"
    if "text" in row:
        return "perplexity"
    return "?"


def _index(value: Any, n: int, where: str, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InputError(f"{where}: {name!r} must be an integer (the index of the right choice), "
                         f"got {value!r}")
    if not 0 <= value < n:
        raise InputError(f"{where}: {name!r} {value} is out of range for {n} choice(s) (0..{n - 1})")
    return value


def _string(row: dict, key: str, where: str) -> str:
    if key not in row:
        raise InputError(f"{where}: missing field {key!r}")
    if not isinstance(row[key], str):
        raise InputError(f"{where}: field {key!r} must be a string, got {type(row[key]).__name__}")
    return row[key]


def _question(row: dict, where: str, line: int) -> Question:
    ctx_key, ans_key = ("context", "answer") if "context" in row or "answer" in row else ("text", "label")
    context = _string(row, ctx_key, where)
    if ans_key not in row:
        raise InputError(f"{where}: missing field {ans_key!r}")
    choices = row["choices"]
    if not isinstance(choices, list) or not choices:
        raise InputError(f"{where}: 'choices' must be a non-empty list of strings")
    for i, c in enumerate(choices):
        if not isinstance(c, str) or not c.strip():
            raise InputError(f"{where}: choice {i} must be a non-empty string, got {c!r}")
    return Question(context, tuple(choices), _index(row[ans_key], len(choices), where, ans_key), line)


def _labelled(row: dict, where: str, line: int) -> Labelled:
    text = _string(row, "text", where)
    label = row["label"]
    if isinstance(label, bool) or not isinstance(label, int) or label < 0:
        raise InputError(f"{where}: 'label' must be a class id (an integer >= 0), got {label!r}")
    pair = _string(row, "text_pair", where) if "text_pair" in row else None
    return Labelled(text, label, pair, line)


def _read_jsonl(path: Path, limit: int | None) -> tuple[str, list[Any]]:
    kind, items = None, []
    with open(path, encoding="utf-8") as f:
        for i, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            where = f"{path}:{i}"
            try:
                row = json.loads(raw)
            except ValueError as e:
                raise InputError(f"{where}: not valid JSON: {e}") from None
            if not isinstance(row, dict):
                raise InputError(f"{where}: each line must be a JSON object")
            shape = _shape(row)
            if shape == "?":
                raise InputError(f"{where}: no field 'text', 'context' or 'choices'; each line is "
                                 f"{{\"text\"}}, {{\"text\", \"label\"}} or {{\"context\", \"choices\", \"answer\"}}")
            if kind is None:
                kind = shape
            elif shape != kind:
                raise InputError(f"{where}: a {shape.replace('_', ' ')} line in a "
                                 f"{kind.replace('_', ' ')} file (the first line decides)")
            if kind == "multiple_choice":
                items.append(_question(row, where, i))
            elif kind == "classification":
                items.append(_labelled(row, where, i))
            else:
                text = _string(row, "text", where)
                if text.strip():
                    items.append(Document(text, i))
    if limit is not None:
        items = items[:limit]
    return kind or "perplexity", items


def read_data(path: str | Path, *, limit: int | None = None) -> EvalData:
    """The examples of one evaluation file (see the module docstring), every line checked.
    `limit` keeps the first N examples (after the whole file was checked)."""
    p = Path(path)
    if limit is not None and limit < 1:
        raise SpecError(f"--limit must be at least 1, got {limit}")
    if not p.is_file():
        raise InputError(f"--data {path}: no such file")
    try:
        if p.suffix == ".jsonl":
            kind, items = _read_jsonl(p, limit)
        else:
            kind = "perplexity"
            with open(p, encoding="utf-8") as f:
                items = [Document(t.rstrip("\n"), i) for i, t in enumerate(f, 1) if t.strip()]
            items = items[:limit] if limit is not None else items
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if not items:
        raise InputError(f"{path}: no examples (every line is empty)")
    return EvalData(p, kind, items, _sha256(p))
