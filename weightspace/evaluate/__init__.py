"""Evaluate merged models: perplexity, multiple choice and classification, lm-eval style.

    from weightspace.evaluate import evaluate
    evaluate("runs/merged", "val.txt")["metrics"]["perplexity"]
"""

from weightspace.evaluate.data import EvalData, read_data
from weightspace.evaluate.evaluator import (
    DEFAULT_METRIC,
    LOWER_IS_BETTER,
    METRICS,
    Evaluator,
    better,
    evaluate,
)

__all__ = ["DEFAULT_METRIC", "LOWER_IS_BETTER", "METRICS", "EvalData", "Evaluator", "better", "evaluate",
           "read_data"]
