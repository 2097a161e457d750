"""Pick merge coefficients on validation data: try a grid, keep the best.

    result = search_merge(spec, "weight", [0.2, 0.4, 0.6, 0.8, 1.0], data="digits", spec_dir=".")
    result.best, result.scores                     # {value: accuracy}

Fisher merging (Matena & Raffel) and task arithmetic choose their lambda on a
validation set; this does that for any spec. PARAM is

    weight          every model's `weight` set to v (one shared scale, as in task arithmetic)
    target_weight   the first model's `weight` set to v, every other model's to (1 - v) / (n - 1)
    <name>          the global parameter `name` set to v (e.g. alpha for regmean, lambda for ties)

Each candidate is merged into a temporary directory and scored on `data`. A zoo
model is scored by accuracy on a zoo dataset (`split`, default val). A transformers
model is scored by weightspace.evaluate on a local file: perplexity (lower is better)
for a text file, acc for multiple-choice or classification JSONL, or `metric` (one of
weightspace.evaluate.METRICS for the file's kind: perplexity, nll, bits_per_byte;
acc, acc_norm, acc_bytes). The candidate must carry a tokenizer (the spec's
tokenizer_source, or a model that has one).
"""

from __future__ import annotations

import contextlib
import math
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from weightspace.errors import InputError, SpecError
from weightspace.ir import WeightSpace
from weightspace.spec import MergeSpec, validate_spec

# the most candidates one --search tries: each is a whole merge and an evaluation
MAX_POINTS = 1000


@dataclass
class SearchResult:
    param: str
    best: float
    best_score: float
    scores: dict[float, float] = field(default_factory=dict)
    metric: str = "accuracy"
    higher_is_better: bool = True


def with_value(spec: MergeSpec, param: str, value: float, option: str | None = None) -> MergeSpec:
    """A copy of `spec` with PARAM set to `value` (see the module docstring); errors name
    `option`, by default `--search PARAM=VALUE`."""
    data = spec.model_dump(exclude_none=True, by_alias=True)
    models = data.get("models") or []
    if param in ("weight", "target_weight"):
        if not models:
            raise SpecError(f"--search {param}: the spec has no models list")
        base = data.get("base_model")
        others = [m for m in models if m.get("model") != base]
        for i, m in enumerate(others):
            v = value if param == "weight" or i == 0 else (1.0 - value) / max(1, len(others) - 1)
            m.setdefault("parameters", {})["weight"] = v
    else:
        data.setdefault("parameters", {})[param] = value
    if option is None:
        option = f"--search {param}={value:g}" if isinstance(value, float) else f"--search {param}={value}"
    return validate_spec(data, source=option).with_origin_of(spec)


def accuracy(model_dir: str | Path | WeightSpace, data: str, split: str = "val", batch_size: int = 512) -> float:
    """Top-1 accuracy of a merged model (a directory, or a zoo model's in-memory WeightSpace) on
    DATA's split."""
    from weightspace.zoo.bind import open_batches, open_model

    adapter = open_model(model_dir)
    tokenizer = None if isinstance(model_dir, WeightSpace) else model_dir
    acc = adapter.accuracy(adapter.params(), open_batches(data, adapter, split=split, batch_size=batch_size,
                                                          tokenizer=tokenizer))
    if acc is None:
        raise SpecError(f"--data {data}: no labelled examples in split {split!r}")
    return acc


def is_file_data(data: str) -> bool:
    """DATA names a local evaluation file (scored by weightspace.evaluate), not a zoo dataset."""
    p = Path(data)
    return p.suffix in (".jsonl", ".txt") or p.is_file()


def _scorer(data: str, metric: str | None):
    """(metric, higher_is_better, score(model_dir, split) -> float) for DATA, checked up front:
    a file is read and validated whole, and `metric` must fit its kind."""
    if not is_file_data(data):
        if metric not in (None, "accuracy", "acc"):
            raise SpecError(f"--metric {metric}: a zoo dataset is scored by accuracy")
        return "accuracy", True, lambda out, split: accuracy(out, data, split)
    from weightspace.evaluate import DEFAULT_METRIC, LOWER_IS_BETTER, METRICS, Evaluator, read_data

    file = read_data(data)
    name = metric or DEFAULT_METRIC[file.kind]
    if name not in METRICS[file.kind]:
        raise SpecError(f"--metric {name}: {data} is {file.kind.replace('_', ' ')} data, scored by "
                        f"{', '.join(METRICS[file.kind])}")

    def score(out: Path, split: str) -> float:
        return float(Evaluator.open(out).run(file)["metrics"][name])

    return name, name not in LOWER_IS_BETTER, score


def search_merge(spec: MergeSpec, param: str, values: list[float], *, data: str, split: str = "val",
                 spec_dir: str | Path | None = None, work: Path | None = None,
                 metric: str | None = None) -> SearchResult:
    """Merge with every value of PARAM, score each on DATA, return the best (ties: the first);
    the best is the highest score, or the lowest for perplexity, nll and bits_per_byte.

    Each candidate is merged into the folder `work` (created, and removed at the end; default a
    temporary directory) and removed once scored, so the disk holds one candidate at a time.
    `wsmerge run` passes a hidden sibling of OUT that names its owner (weightspace.files), so
    what a killed search left is removed by the next run."""
    from weightspace.merge import plan_merge, run_plan
    from weightspace.plan import check_spec

    if not values:
        raise SpecError(f"--search {param}: give at least one value")
    metric, higher, score = _scorer(data, metric)
    candidates = [with_value(spec, param, v) for v in values]
    for v, candidate in zip(values, candidates):  # every value in range before the first merge
        try:
            check_spec(candidate, spec_dir=spec_dir)
        except (SpecError, InputError) as e:
            raise type(e)(f"--search {param}={v:g}: {e}") from None
    if is_file_data(data):  # text is encoded with the candidate's own tokenizer: one must be written
        first = plan_merge(candidates[0], spec_dir=spec_dir)
        if not first.tokenizer_files and first.vocabulary is None:
            raise SpecError(f"--data {data}: the merged candidates would have no tokenizer to encode "
                            f"the text; name one in the spec (tokenizer_source: a folder with "
                            f"tokenizer.json, e.g. the base model's)")
    scores: dict[float, float] = {}
    with contextlib.ExitStack() as stack:
        if work is None:
            work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="wsmerge-search-")))
        else:
            work.mkdir(parents=True)
            stack.callback(shutil.rmtree, work, ignore_errors=True)
        for i, (v, candidate) in enumerate(zip(values, candidates)):
            plan = plan_merge(candidate, spec_dir=spec_dir)
            out = work / f"c{i}"
            run_plan(plan, out, progress=False)
            scores[v] = score(out, split)
            shutil.rmtree(out)
    sign = 1 if higher else -1
    best = max(scores, key=lambda v: (sign * scores[v], -values.index(v)))
    return SearchResult(param, best, scores[best], scores, metric, higher)


def parse_search(text: str) -> tuple[str, list[float]]:
    """`weight=0.2,0.4,0.6` or `weight=0:1:6` (start:stop:count, inclusive) -> (name, values);
    finite numbers, at most MAX_POINTS of them."""
    name, eq, rest = text.partition("=")
    if not eq or not name or not rest:
        raise SpecError(f"--search {text!r}: expected PARAM=V1,V2,... or PARAM=START:STOP:COUNT")
    try:
        if ":" in rest:
            a, b, n = rest.split(":")
            count = int(n)
            if count < 1:
                raise ValueError
            ends = [float(a), float(b)]
        else:
            count = rest.count(",") + 1
            ends = []
        if count > MAX_POINTS:
            raise SpecError(f"--search {name}: {count:,} values; it tries at most {MAX_POINTS:,} (each is "
                            f"a whole merge and an evaluation)")
        values = [float(v) for v in rest.split(",")] if not ends else \
            [ends[0] + (ends[1] - ends[0]) * (i / max(1, count - 1)) for i in range(count)]
    except ValueError:
        raise SpecError(f"--search {text!r}: values must be numbers (V1,V2,... or START:STOP:COUNT)") from None
    bad = next((v for v in [*ends, *values] if not math.isfinite(v)), None)
    if bad is not None:
        raise SpecError(f"--search {name}: {bad} is not a finite number; give finite values")
    return name, [round(v, 10) for v in values]
