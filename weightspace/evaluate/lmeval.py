"""lm-evaluation-harness tasks on an already loaded model (the `lmeval` extra).

    results = run_lm_eval(evaluator, ["hellaswag", "arc_easy"], limit=100)

The model is handed to lm-eval as a loaded module (`HFLM(pretrained=module, tokenizer=...)`),
so lm-eval loads no model; its tasks' datasets are lm-eval's business (the Hugging Face
datasets cache; HF_DATASETS_OFFLINE=1 uses only what is cached).
"""

from __future__ import annotations

from typing import Any

from weightspace.errors import SpecError
from weightspace.extras import require


def parse_tasks(text: str) -> list[str]:
    """`hellaswag,arc_easy` -> ["hellaswag", "arc_easy"]."""
    tasks = [t.strip() for t in text.split(",")]
    if not all(tasks):
        raise SpecError(f"--lm-eval {text!r}: give task names separated by commas, e.g. hellaswag,arc_easy")
    return tasks


def run_lm_eval(evaluator, tasks: list[str], *, limit: int | None = None,
                num_fewshot: int | None = None) -> dict[str, Any]:
    """lm_eval.simple_evaluate on the evaluator's model; returns its "results" (task -> metrics)."""
    if evaluator.kind != "causal-lm":
        raise SpecError(f"--lm-eval: {evaluator.name} is not a causal LM; lm-eval's tasks score causal LMs")
    lm_eval = require("lm_eval", "lmeval", "--lm-eval needs the lm-eval package")
    huggingface = require("lm_eval.models.huggingface", "lmeval", "--lm-eval needs the lm-eval package")
    lm = huggingface.HFLM(pretrained=evaluator.module, tokenizer=evaluator.tokenizer,
                          batch_size=evaluator.batch_size, max_length=evaluator.max_length)
    out = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), limit=limit, num_fewshot=num_fewshot,
                                  log_samples=False)
    if not isinstance(out, dict) or "results" not in out:
        raise SpecError(f"--lm-eval {','.join(tasks)}: lm-eval returned no results")
    return out["results"]
