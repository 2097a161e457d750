"""Open a model and its data for data-aware statistics (Fisher, Gram matrices, coefficient search).

    adapter = open_model("zoo/models/<id>/epoch-0020")          # a zoo checkpoint
    adapter = open_model("./minilm-cls")                        # a transformers *ForSequenceClassification dir
    adapter = open_model(minilm_dir, num_labels=3)              # an encoder + a fresh, seeded head
    batches = open_batches("digits:classes=0-4", adapter, split="train", n_examples=512)
    batches = open_batches("reviews.jsonl", adapter, tokenizer=minilm_dir)   # {"text": ..., "label": ...}

DATA is a zoo dataset reference (`weightspace.zoo.data.load_task`) for zoo models, and a
local JSONL file (one {"text": ..., "label": ...} per line; `text_pair`
optional) or a plain text file (one example per line, for language models)
for transformers models, tokenized with the tokenizer in the model directory.
Nothing runs remote code: transformers models load with
`trust_remote_code=False` from local files only.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from weightspace.binding import (
    IGNORE_INDEX,
    Adapter,
    ClassifierAdapter,
    HFCausalLMAdapter,
    HFSequenceClassifierAdapter,
    load_into,
)
from weightspace.errors import InputError, SpecError
from weightspace.extras import require
from weightspace.ir import WeightSpace
from weightspace.sources import load_space

TASKS = ("auto", "classification", "causal-lm")


def _local_dir(model: str | Path) -> Path:
    p = Path(model)
    if p.is_dir():
        return p
    from weightspace.hub import resolve_hub  # a Hub id: the local snapshot (offline-aware)

    return Path(resolve_hub(str(model)))


def open_model(model: str | Path | WeightSpace, *, task: str = "auto", num_labels: int | None = None,
               seed: int = 0, device: str | torch.device = "cpu",
               dtype: torch.dtype | None = None) -> Adapter:
    """An adapter over the model at `model` (a zoo checkpoint or a transformers directory, or a
    zoo model's in-memory WeightSpace whose meta holds its config).

    The module is put on `device`; `dtype` None keeps the checkpoint's floating dtype
    (a transformers model loads with ``dtype="auto"``), a dtype casts its floating tensors.
    """
    if task not in TASKS:
        raise SpecError(f"--task: unknown task {task!r}; choose one of {', '.join(TASKS)}")
    space = model if isinstance(model, WeightSpace) else load_space(model)
    cfg = space.meta.get("config") or {}
    if cfg.get("model_type") == "weightspace-zoo":
        from weightspace.zoo.arch import model_from_config

        name = "an in-memory merge" if isinstance(model, WeightSpace) else str(model)
        module = model_from_config(cfg, name, tensors=space)
        load_into(module, space)
        module.to(device=device, dtype=dtype)
        module.eval()
        return ClassifierAdapter(module, num_classes=int(cfg["num_classes"]))
    if isinstance(model, WeightSpace):
        raise SpecError("open_model: an in-memory WeightSpace must be a zoo model (config model_type "
                        "weightspace-zoo); save a transformers model to a directory first")
    adapter = _open_hf(model, cfg, task, num_labels, seed, dtype)
    adapter.module.to(device)
    return adapter


def _open_hf(model: str | Path, cfg: dict, task: str, num_labels: int | None, seed: int,
             dtype: torch.dtype | None = None) -> Adapter:
    if not cfg:
        raise InputError(f"{model}: no config.json, so the architecture is unknown; a zoo checkpoint "
                         f"or a transformers model directory is needed")
    transformers = require("transformers", "hf", f"{model}: a transformers model needs the hf extra")
    path = _local_dir(model)
    archs = cfg.get("architectures") or []
    if task == "auto":
        if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):  # GPT2LMHeadModel too
            task = "causal-lm"
        elif any(a.endswith("ForSequenceClassification") for a in archs) or num_labels:
            task = "classification"
        else:
            raise SpecError(f"{model}: {', '.join(archs) or cfg.get('model_type', '?')} has no "
                            f"classification or language-model head; pass --num-labels N to add a "
                            f"seeded classification head, or --task causal-lm")
    kwargs: dict[str, Any] = {"local_files_only": True, "trust_remote_code": False,
                              "dtype": "auto" if dtype is None else dtype}
    torch.manual_seed(seed)                      # a newly added head is initialized from this seed
    try:
        if task == "causal-lm":
            module = transformers.AutoModelForCausalLM.from_pretrained(path, **kwargs)
            adapter: Adapter = HFCausalLMAdapter(module)
        else:
            if num_labels is not None:
                kwargs["num_labels"] = num_labels
            module = transformers.AutoModelForSequenceClassification.from_pretrained(path, **kwargs)
            adapter = HFSequenceClassifierAdapter(module)
    except (OSError, ValueError, KeyError) as e:
        raise InputError(f"{model}: transformers cannot load it as a {task} model: {e}") from None
    module.eval()
    return adapter


def _zoo_batches(ref: str, adapter: Adapter, split: str, batch_size: int,
                 n_examples: int | None) -> Iterator[dict[str, torch.Tensor]]:
    from weightspace.zoo.data import load_task

    task = load_task(ref)
    s = task.split(split)
    x, y = s.x, s.y
    if n_examples is not None:
        x, y = x[:n_examples], y[:n_examples]
    classes = adapter.num_classes
    if classes is not None and len(y) and int(y.max()) >= classes:
        raise InputError(f"--data {ref}: label {int(y.max())} exceeds the model's head "
                         f"({classes} classes)")
    for i in range(0, len(y), batch_size):
        yield {"x": x[i:i + batch_size], "y": y[i:i + batch_size]}


def _read_examples(path: Path) -> list[dict[str, Any]]:
    if path.suffix == ".jsonl":
        out = []
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as e:
                raise InputError(f"{path}:{i}: not valid JSON: {e}") from None
            if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                raise InputError(f"{path}:{i}: each line needs a string field 'text'")
            row["_line"] = i
            out.append(row)
        return out
    return [{"text": t, "_line": i} for i, t in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
            if t.strip()]


def _text_batches(path: Path, adapter: Adapter, tokenizer: str | Path | None, batch_size: int,
                  n_examples: int | None, max_length: int) -> Iterator[dict[str, torch.Tensor]]:
    import transformers

    if tokenizer is None:
        raise SpecError(f"--data {path}: text data needs a tokenizer (the model directory's)")
    try:
        tok = transformers.AutoTokenizer.from_pretrained(tokenizer, local_files_only=True,
                                                         trust_remote_code=False)
    except (OSError, ValueError) as e:
        raise InputError(f"{tokenizer}: cannot load its tokenizer: {e}") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    rows = _read_examples(path)[:n_examples]
    if not rows:
        raise InputError(f"{path}: no examples")
    classify = isinstance(adapter, HFSequenceClassifierAdapter)
    classes = adapter.num_classes
    for i in range(0, len(rows), batch_size):
        chunk = rows[i:i + batch_size]
        pair = [r["text_pair"] for r in chunk] if classify and all("text_pair" in r for r in chunk) else None
        enc = tok([r["text"] for r in chunk], pair, padding=True, truncation=True, max_length=max_length,
                  return_tensors="pt")
        batch = {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
        if classify:
            labels = []
            for r in chunk:
                lab = r.get("label", IGNORE_INDEX)
                if not isinstance(lab, int) or (lab != IGNORE_INDEX and not 0 <= lab < (classes or 0)):
                    raise InputError(f"{path}:{r['_line']}: label {lab!r} is not a class id of the "
                                     f"model's head (0..{(classes or 1) - 1})")
                labels.append(lab)
            batch["labels"] = torch.tensor(labels)
        yield batch


def open_batches(data: str, adapter: Adapter, *, split: str = "train", batch_size: int = 64,
                 n_examples: int | None = None, tokenizer: str | Path | None = None,
                 max_length: int = 128) -> list[dict[str, torch.Tensor]]:
    """Batches (dicts of tensors) for `adapter` from DATA (see the module docstring)."""
    if batch_size < 1:
        raise SpecError(f"--batch-size must be at least 1, got {batch_size}")
    p = Path(data)
    if p.suffix in (".jsonl", ".txt") or p.is_file():
        if not p.is_file():
            raise InputError(f"--data {data}: no such file")
        if isinstance(adapter, ClassifierAdapter):
            raise SpecError(f"--data {data}: a zoo model takes a zoo dataset reference such as 'digits'")
        return list(_text_batches(p, adapter, tokenizer, batch_size, n_examples, max_length))
    if not isinstance(adapter, ClassifierAdapter):
        raise SpecError(f"--data {data}: a transformers model takes a JSONL or text file")
    return list(_zoo_batches(data, adapter, split, batch_size, n_examples))
