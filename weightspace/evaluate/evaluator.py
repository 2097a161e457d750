"""One evaluator for merged models: perplexity, multiple choice, classification.

    from weightspace.evaluate import evaluate
    report = evaluate("runs/merged", "val.txt")                     # {"metrics": {"perplexity": ...}, ...}
    report = evaluate(model, "mc.jsonl", tokenizer=tok)             # an already loaded module

    ev = Evaluator.open("runs/merged", device="cuda", batch_size=16)
    reports = [ev.run(d) for d in ("wiki.txt", "arc.jsonl")]       # the model loaded once

`wsmerge eval`, `wsmerge run --search` (transformers models) and the aTLAS and evolutionary
searches call this. The file's shape picks the measurement (weightspace.evaluate.data);
the causal-LM conventions are lm-evaluation-harness's (weightspace.evaluate.lm).
Models load from local files only, with trust_remote_code=False.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from weightspace.errors import InputError, SpecError
from weightspace.evaluate.data import EvalData, read_data
from weightspace.evaluate.lm import CausalLMScorer
from weightspace.extras import require

# lower is better for these metrics; higher for every other one
LOWER_IS_BETTER = frozenset({"perplexity", "nll", "bits_per_byte"})
# the metric a file's kind is ranked by (run --search without --metric)
DEFAULT_METRIC = {"perplexity": "perplexity", "multiple_choice": "acc", "classification": "acc"}
METRICS = {"perplexity": ("perplexity", "nll", "bits_per_byte"),
           "multiple_choice": ("acc", "acc_norm", "acc_bytes"), "classification": ("acc",)}
# when the model's config names no length, and the most it is given without --max-length
# (lm-eval's default when the model names none; a 128k-context model would take 128k-token windows)
DEFAULT_MAX_LENGTH = 2048


def _config_length(config) -> int | None:
    for attr in ("max_position_embeddings", "n_positions", "n_ctx", "seq_length"):
        v = getattr(config, attr, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def _kind_of(module: torch.nn.Module) -> str:
    names = [type(module).__name__, *(getattr(getattr(module, "config", None), "architectures", None) or [])]
    if any(n.endswith("ForCausalLM") or n.endswith("LMHeadModel") for n in names):
        return "causal-lm"
    if any(n.endswith("ForSequenceClassification") for n in names):
        return "classification"
    raise SpecError(f"{type(module).__name__} is neither a causal LM (*ForCausalLM) nor a sequence "
                    f"classifier (*ForSequenceClassification); wsmerge eval scores those two")


def _load_tokenizer(source: str | Path, model: str):
    transformers = require("transformers", "hf", "evaluating a transformers model needs the hf extra")
    p = Path(source)
    if not p.is_dir():
        raise InputError(f"--tokenizer {source}: not a directory")
    if not any((p / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt",
                                              "tokenizer.model", "vocab.json")):
        raise InputError(f"{source} has no tokenizer files; give --tokenizer DIR (a folder with "
                         f"tokenizer.json), e.g. the base model's, for {model}")
    try:
        return transformers.AutoTokenizer.from_pretrained(p, local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError, KeyError) as e:
        raise InputError(f"{source}: cannot load its tokenizer: {e}") from None


def _load_module(path: Path, device: torch.device, dtype: torch.dtype | None) -> torch.nn.Module:
    from weightspace.files import read_json_object

    if not path.is_dir():
        raise InputError(f"{path}: not a model directory")
    if not (path / "config.json").is_file():
        raise InputError(f"{path}: no config.json, so the architecture is unknown; give a transformers "
                         f"model directory (a merged output, a fine-tune)")
    cfg = read_json_object(path / "config.json")
    if cfg.get("model_type") == "weightspace-zoo":
        raise SpecError(f"{path} is a zoo model; score it on a zoo dataset with `wsmerge run --search "
                        f"... --data digits` or `wsmerge zoo metrics`")
    archs = cfg.get("architectures") or []
    transformers = require("transformers", "hf", f"{path}: a transformers model needs the hf extra")
    if any(a.endswith("ForCausalLM") or a.endswith("LMHeadModel") for a in archs):
        auto = transformers.AutoModelForCausalLM
    elif any(a.endswith("ForSequenceClassification") for a in archs):
        auto = transformers.AutoModelForSequenceClassification
    else:
        raise SpecError(f"{path}: {', '.join(archs) or cfg.get('model_type', '?')} has no language-model "
                        f"or classification head; wsmerge eval scores *ForCausalLM and "
                        f"*ForSequenceClassification models")
    bars = transformers.utils.logging.is_progress_bar_enabled()
    transformers.utils.logging.disable_progress_bar()   # its per-tensor "Loading weights" bar
    try:
        module = auto.from_pretrained(path, local_files_only=True, trust_remote_code=False,
                                      dtype="auto" if dtype is None else dtype)
    except (OSError, ValueError, KeyError) as e:
        raise InputError(f"{path}: transformers cannot load it: {e}") from None
    finally:
        if bars:
            transformers.utils.logging.enable_progress_bar()
    return module.to(device).eval()


@dataclass
class Evaluator:
    """A loaded model and its tokenizer; `run(data)` scores one file."""

    module: torch.nn.Module
    tokenizer: Any
    name: str
    kind: str                      # "causal-lm" or "classification"
    batch_size: int = 8
    max_length: int = DEFAULT_MAX_LENGTH
    progress: bool = False

    @classmethod
    def open(cls, model: str | Path | torch.nn.Module, *, tokenizer: Any = None, device: str = "cpu",
             dtype: torch.dtype | None = None, batch_size: int = 8, max_length: int | None = None,
             progress: bool = False) -> Evaluator:
        """`model` a transformers model directory (loaded onto `device`) or a loaded module (left
        on its device, in eval mode); `tokenizer` a directory or a tokenizer object (default:
        the model directory's)."""
        from weightspace.executor import resolve_device

        if batch_size < 1:
            raise SpecError(f"--batch-size must be at least 1, got {batch_size}")
        if max_length is not None and max_length < 2:
            raise SpecError(f"--max-length must be at least 2, got {max_length}")
        dev = resolve_device(device)
        if isinstance(model, torch.nn.Module):
            if tokenizer is None:
                raise SpecError("evaluate(module, ...): pass tokenizer= (a tokenizer or its directory)")
            module, name = model.eval(), type(model).__name__
        else:
            module, name = _load_module(Path(model), dev, dtype), str(model)
        kind = _kind_of(module)
        if tokenizer is None or isinstance(tokenizer, (str, Path)):
            tokenizer = _load_tokenizer(tokenizer if tokenizer is not None else model, name)
        limit = _config_length(getattr(module, "config", None))
        if max_length is None:
            max_length = min(limit or DEFAULT_MAX_LENGTH, DEFAULT_MAX_LENGTH)
        elif limit is not None and max_length > limit:
            raise SpecError(f"--max-length {max_length}: {name} has {limit} positions "
                            f"(max_position_embeddings); give at most {limit}")
        return cls(module, tokenizer, name, kind, batch_size, max_length, progress)

    @property
    def device(self) -> torch.device:
        return next(self.module.parameters()).device

    def check(self, data: EvalData) -> None:
        """Refuse a file this model cannot be scored on, before any work."""
        if self.kind == "classification" and data.kind != "classification":
            raise SpecError(f"{data.path}: {self.name} is a sequence classifier; it is scored on JSONL "
                            f"{{\"text\", \"label\"}} lines, not {data.kind.replace('_', ' ')} data")
        if self.kind == "causal-lm" and data.kind == "classification":
            raise SpecError(f"{data.path}:{data.items[0].line}: {{\"text\", \"label\"}} lines are for a "
                            f"sequence classifier; for the causal LM {self.name}, give each line its "
                            f"\"choices\" ({{\"text\", \"choices\", \"label\"}}: the label's choice is "
                            f"scored by log-likelihood)")
        if data.kind == "classification":
            n = int(self.module.config.num_labels)
            bad = next((x for x in data.items if x.label >= n), None)
            if bad is not None:
                raise InputError(f"{data.path}:{bad.line}: label {bad.label} is not a class of "
                                 f"{self.name}'s head (0..{n - 1})")

    def run(self, data: str | Path | EvalData, *, limit: int | None = None) -> dict[str, Any]:
        """The report of one file: data, sha256, kind, n, metrics, seconds, examples_per_second."""
        if not isinstance(data, EvalData):
            data = read_data(data, limit=limit)
        self.check(data)
        t0 = time.perf_counter()
        if data.kind == "classification":
            metrics = self._classify(data)
        else:
            scorer = CausalLMScorer(self.module, self.tokenizer, batch_size=self.batch_size,
                                    max_length=self.max_length, progress=self.progress)
            if data.kind == "perplexity":
                metrics = scorer.perplexity(d.text for d in data.items)
            else:
                metrics = scorer.multiple_choice(data.items, source=str(data.path))
        dt = time.perf_counter() - t0
        return {"data": str(data.path), "sha256": data.sha256, "kind": data.kind, "n": len(data.items),
                "metrics": metrics, "seconds": dt, "examples_per_second": len(data.items) / dt if dt else None}

    def _classify(self, data: EvalData) -> dict[str, float]:
        from tqdm.auto import tqdm

        tok, items, right = self.tokenizer, data.items, 0
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        starts = range(0, len(items), self.batch_size)
        with torch.no_grad():
            for i in tqdm(starts, desc="classify", unit="batch", disable=not self.progress):
                chunk = items[i:i + self.batch_size]
                pair = [x.text_pair or "" for x in chunk] if any(x.text_pair for x in chunk) else None
                enc = tok([x.text for x in chunk], pair, padding=True, truncation=True,
                          max_length=self.max_length, return_tensors="pt")
                enc = {k: v.to(self.device) for k, v in enc.items()
                       if k in ("input_ids", "attention_mask", "token_type_ids")}
                pred = self.module(**enc).logits.argmax(-1).cpu()
                right += int((pred == torch.tensor([x.label for x in chunk])).sum())
        return {"acc": right / len(items)}


def evaluate(model: str | Path | torch.nn.Module, data: str | Path, *, tokenizer: Any = None,
             device: str = "cpu", dtype: torch.dtype | None = None, batch_size: int = 8,
             max_length: int | None = None, limit: int | None = None, progress: bool = False) -> dict[str, Any]:
    """Score `model` on one file; the report as `wsmerge eval --json` writes it for that file,
    with "model" added. The file is read and checked before the model is loaded."""
    d = read_data(data, limit=limit)
    ev = Evaluator.open(model, tokenizer=tokenizer, device=device, dtype=dtype, batch_size=batch_size,
                        max_length=max_length, progress=progress)
    return {"model": ev.name, **ev.run(d)}


def better(metric: str, a: float, b: float) -> bool:
    """Whether score `a` beats `b` for `metric`."""
    return a < b if metric in LOWER_IS_BETTER else a > b
