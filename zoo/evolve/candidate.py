"""One candidate of a search: merge its spec, score the result, remove it. Runs in a worker.

    result = evaluate_candidate({"spec": {...merge spec...}, "spec_dir": "examples",
                                 "evaluation": {"data": "digits"}, "split": "val"})
    result  # {"value": 0.71, "metrics": {...}, "merge_s": 0.04, "eval_s": 0.02, "error": None}

A unit and its result are plain data (dicts of str, float), so the same function runs in this
process, in a local worker process or as a Ray task. A zoo model's merge of at most
IN_MEMORY_BYTES is held in memory (weightspace.merge.merge_in_memory) and scored there; any
other merge streams through weightspace.merge.run_plan into a temporary directory of the
worker's machine (TMPDIR), which is removed whatever happens. An error in the
merge or the evaluation is returned, not raised, so one bad candidate never stops a search.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

from weightspace.errors import WeightspaceError


def evaluate_candidate(unit: dict[str, Any]) -> dict[str, Any]:
    """Merge `unit["spec"]` and score it on `unit["evaluation"]` (its `split`); never raises
    for a candidate's own failure (the result's `error` says what went wrong)."""
    t0 = time.perf_counter()
    out: dict[str, Any] = {"value": None, "metrics": {}, "merge_s": None, "eval_s": None,
                           "error": None, "worker": f"{os.uname().nodename}:{os.getpid()}"}
    work = None
    try:
        from weightspace.merge import merge_in_memory, plan_merge, run_plan
        from weightspace.spec import validate_spec

        spec = validate_spec(unit["spec"], source=unit.get("source", "candidate"))
        t = time.perf_counter()
        plan = plan_merge(spec, spec_dir=unit.get("spec_dir"))
        if _in_memory(plan, unit["evaluation"]):
            merged = merge_in_memory(plan, device=unit.get("device", "cpu"))
            out["in_memory"] = True
        else:
            work = Path(tempfile.mkdtemp(prefix="wsmerge-evolve-"))
            run_plan(plan, work / "merged", progress=False, write_card=False, device=unit.get("device", "cpu"))
            merged = work / "merged"
        out["merge_s"] = time.perf_counter() - t
        t = time.perf_counter()
        value, metrics = score(merged, unit["evaluation"], unit.get("split", "val"),
                               spec_dir=unit.get("spec_dir"), test=unit.get("test", False),
                               device=unit.get("device", "cpu"))
        out["eval_s"] = time.perf_counter() - t
        out["value"], out["metrics"] = value, metrics
    except WeightspaceError as e:
        out["error"] = f"{type(e).__name__}: {e}"
    except Exception as e:  # noqa: BLE001 - a candidate's failure is recorded, not fatal
        out["error"] = f"{type(e).__name__}: {e}"
        if os.environ.get("WSMERGE_DEBUG", "") not in ("", "0"):
            out["error"] += "\n" + traceback.format_exc()
    finally:
        if work is not None:
            shutil.rmtree(work, ignore_errors=True)
    out["total_s"] = time.perf_counter() - t0
    return out


# a zoo model's merge up to this size is held in memory and scored there (no directory written
# and read back, nothing to clean up); a language model is evaluated from a directory, which
# its tokenizer and transformers' loader need
IN_MEMORY_BYTES = 256 << 20


def _in_memory(plan: Any, evaluation: dict[str, Any]) -> bool:
    from weightspace.safetensors_io import nbytes_of
    from weightspace.zoo.evolve.spec import Evaluation

    if Evaluation.model_validate(evaluation).kind == "lm":
        return False
    return sum(nbytes_of(shape, dtype) for _, dtype, shape in plan.outputs()) <= IN_MEMORY_BYTES


def score(model_dir: Path | Any, evaluation: dict[str, Any], split: str, *, spec_dir: str | None = None,
          test: bool = False, device: str = "cpu") -> tuple[float, dict[str, float]]:
    """The evaluation's metric on the merged model: the mean over its datasets (their own
    values in `metrics`). `test` scores the test split (zoo) or the test files instead."""
    from weightspace.zoo.evolve.spec import Evaluation, resolve_data

    ev = Evaluation.model_validate(evaluation)
    refs = ev.test_datasets() if test else ev.datasets()
    split = (ev.test_split or split) if test else split
    metrics: dict[str, float] = {}
    for ref in refs:
        if ev.kind == "lm":
            path = resolve_data(ref, Path(spec_dir) if spec_dir else None)
            metrics[ref] = lm_metric(model_dir, path, ev.metric_name, batch_size=ev.batch_size,
                                     max_length=ev.max_length, device=device)
        else:
            from weightspace.zoo.search import accuracy

            metrics[ref] = accuracy(model_dir, ref, split, batch_size=ev.batch_size)
    return sum(metrics.values()) / len(metrics), metrics


def lm_metric(model_dir: Path, data: Path, metric: str, *, batch_size: int, max_length: int | None,
              device: str) -> float:
    """`metric` of a transformers model on a data file, by weightspace.evaluate (perplexity on a
    text file, accuracy on JSONL), imported only here, so a search of zoo models never needs it."""
    try:
        from weightspace.evaluate import evaluate
    except ImportError:
        raise WeightspaceError("evaluation of language models needs weightspace.evaluate (the "
                               "evaluator of issue 20), which this install does not have; score "
                               "zoo models with a zoo dataset, or update weightspace") from None
    result = evaluate(str(model_dir), str(data), batch_size=batch_size, max_length=max_length, device=device)
    metrics = result.get("metrics") or {}
    key = {"accuracy": "acc"}.get(metric, metric)  # the evaluator's report names accuracy "acc"
    if key not in metrics:
        raise WeightspaceError(f"the evaluator gave {', '.join(map(str, metrics)) or 'nothing'} for {data}, "
                               f"not {metric}")
    return float(metrics[key])


__all__ = ["evaluate_candidate", "lm_metric", "score"]
