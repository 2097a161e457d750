"""Run a merge plan: stream it tensor by tensor into an atomic checkpoint directory.

    plan = plan_merge(load_spec("ties.yaml"), spec_dir="examples")   # weightspace.plan
    run_plan(plan, "runs/ties", device="auto")

`plan_merge`, `MergePlan` and `evaluate` are importable from here as well.
"""

from __future__ import annotations

from pathlib import Path

from weightspace.card import Card, model_card
from weightspace.executor import Step, execute, stream_threads
from weightspace.inputs import check_carried
from weightspace.ir import WeightSpace
from weightspace.params import evaluate
from weightspace.plan import MergePlan, plan_merge
from weightspace.sink import DEFAULT_SHARD_SIZE, CheckpointSink, MemorySink

# ---------------------------------------------------------------- running


def run_plan(plan: MergePlan, out: str | Path, *, device: str = "auto",
             shard_size: int = DEFAULT_SHARD_SIZE, overwrite: bool = False,
             allow_nonfinite: bool = False, progress: bool = True, copy_tokenizer: bool = True,
             write_card: bool = True, inputs: list[str | Path] | tuple = ()) -> dict:
    """Stream the plan into OUT atomically; returns stats. OUT also gets the spec as
    `mergekit_config.yml` (where mergekit users and Hub tooling look for the recipe), the
    tokenizer files unless `copy_tokenizer` is off and the model card unless `write_card` is.
    OUT may not be, hold or lie inside anything the plan reads (`MergePlan.inputs`) or `inputs`."""
    out = Path(out)
    if copy_tokenizer:  # a carried file that would be refused at the end is refused before the first tensor
        check_carried(plan.tokenizer_files)
        check_carried(plan.vocabulary.files if plan.vocabulary is not None else {})
    recipe = plan.spec.to_yaml()
    sink = CheckpointSink(out, plan.outputs(), shard_size=shard_size, overwrite=overwrite,
                          metadata={"weightspace_spec": recipe}, inputs=[*plan.inputs(), *inputs])
    by_name: dict[str, list[Step]] = {}
    for s in plan.steps:
        by_name.setdefault(s.name, []).append(s)
    ordered = [s for n in sink.order for s in by_name[n]]
    try:
        stats = execute(ordered, sink, device=device, compute_dtype=plan.compute_dtype,
                        progress=progress, allow_nonfinite=allow_nonfinite,
                        desc=plan.method.name,
                        threads=stream_threads() if plan.method.single_threaded else None)
        sink.finish(config=plan.config, files=plan.tokenizer_files if copy_tokenizer else {},
                    card=model_card(card_of(plan)) if write_card else None,
                    texts={"mergekit_config.yml": recipe},
                    tokenizer=plan.vocabulary if copy_tokenizer else None)
    except BaseException:
        sink.abort()
        raise
    stats["out"] = str(out)
    stats["shards"] = len(sink.names)
    return stats


def merge_in_memory(plan: MergePlan, *, device: str = "cpu") -> WeightSpace:
    """The plan's result as an in-memory WeightSpace (meta: the output config), for merges small
    enough to hold, where writing and reading a directory would cost more than the merge."""
    sink = MemorySink()
    names = [n for n, _, _ in plan.outputs()]
    execute(plan.steps, sink, device=device, compute_dtype=plan.compute_dtype, progress=False,
            desc=plan.method.name, threads=stream_threads() if plan.method.single_threaded else None)
    return WeightSpace.from_tensors({n: sink.result(n) for n in names},
                                    {"source": "memory", "config": plan.config or {}})


def card_of(plan: MergePlan) -> Card:
    """What the model card of this merge says (see weightspace.card)."""
    m, cfg = plan.method, plan.config or {}
    return Card(method=m.name, pretty_name=m.pretty_name, paper=m.paper, paper_url=m.reference_url,
                title=plan.spec.name or "merged model", base_model=plan.spec.base_model,
                models=list(plan.spaces), spec_yaml=plan.spec.to_yaml(),
                hub_ids=list(dict.fromkeys(h for r in plan.spaces for k in ("hub_id", "adapter_hub_id")
                                           if (h := plan.spaces[r].meta.get(k)))),
                # zoo checkpoints are not transformers models
                transformers=bool(cfg.get("architectures")) or cfg.get("model_type") not in (None, "weightspace-zoo"))


__all__ = ["MergePlan", "card_of", "evaluate", "plan_merge", "run_plan"]
