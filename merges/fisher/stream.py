"""A model's Fisher in bounded memory: parameters in groups, one data pass per group, streamed out.

    adapter = open_model("./llama", device="cuda")
    batches = open_batches("train.txt", adapter, tokenizer="./llama", n_examples=512)
    info = write_fisher(adapter, batches, "runs/llama.fisher", estimator="empirical",
                        max_stats_memory="2GiB", stored_names=load_space("./llama").keys())
    info["passes"]          # 1 when the float32 Fisher of every parameter fits in 2 GiB

The float32 accumulators of one group of parameters (at most `max_stats_memory` bytes, a
larger single tensor alone) live on the model's device while every batch runs through the
model with gradients for that group only; then the group's Fisher is written out and
dropped. A directory OUT is sharded safetensors plus an index (weightspace.sink.CheckpointSink),
written as the groups finish; a `.safetensors` OUT is one file, so the whole Fisher is held
once before it is written. Either way the Fisher's metadata (estimator, examples, seed,
passes, examples per second) is in `__metadata__["fisher"]`; a directory also gets it,
complete, in `fisher.json` (shard headers are written before the timing is known).

Tied parameters (a tied embedding and lm_head) are one parameter with one gradient, the sum
of both uses'; its Fisher is one tensor, written under each of its names the checkpoint
stores (`stored_names`), or under the module's first name when it stores none of them.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from weightspace.binding import IGNORE_INDEX, Adapter, HFCausalLMAdapter
from weightspace.errors import InputError, SpecError
from weightspace.ir import MemoryRef, WeightSpace
from weightspace.merges.fisher.estimate import fisher_diagonal
from weightspace.merges.fisher.files import save_fisher
from weightspace.sink import DEFAULT_SHARD_SIZE, CheckpointSink, parse_size

DEFAULT_MAX_STATS_MEMORY = "2GiB"
INFO_FILE = "fisher.json"


def output_names(module: torch.nn.Module, stored_names: Iterable[str] | None = None) -> dict[str, list[str]]:
    """For each parameter (tied ones once, by their first name), the names its Fisher is written
    under: those of its names the checkpoint stores, else its first name.

        output_names(gpt2, ["transformer.wte.weight", ...])["transformer.wte.weight"]
        # ['transformer.wte.weight']   (lm_head.weight is tied to it and not stored)
    """
    stored = None if stored_names is None else set(stored_names)
    aliases: dict[int, list[str]] = {}
    for name, p in module.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(p), []).append(name)
    out = {}
    for name, p in module.named_parameters():
        names = aliases[id(p)]
        kept = names if stored is None else [n for n in names if n in stored]
        out[name] = kept if stored is not None and kept else [name]
    return out


def plan_groups(sizes: Sequence[tuple[str, int]], budget: int) -> list[list[str]]:
    """Consecutive groups of (name, bytes) whose bytes sum to at most `budget` (a larger tensor
    gets a group of its own)."""
    groups: list[list[str]] = []
    cur: list[str] = []
    used = 0
    for name, nb in sizes:
        if cur and used + nb > budget:
            groups.append(cur)
            cur, used = [], 0
        cur.append(name)
        used += nb
    if cur:
        groups.append(cur)
    return groups


def _take(ref: Any) -> torch.Tensor:
    """An in-memory tensor as it is (a ref's load() would copy it), else loaded."""
    return ref.tensor if isinstance(ref, MemoryRef) else ref.load("cpu")


def _count_examples(batches: Sequence[Mapping[str, Any]], n_examples: int | None) -> int:
    total = 0
    for b in batches:
        sizes = [v.shape[0] for v in b.values() if isinstance(v, torch.Tensor) and v.dim()]
        total += sizes[0] if sizes else 0
    return total if n_examples is None else min(total, n_examples)


def _check_labels(adapter: Adapter, batches: Sequence[Mapping[str, Any]]) -> None:
    """Refuse data with nothing to predict before the model runs (a label-free batch is left
    to the estimator, which says whether it needs labels)."""
    lengths = []
    for b in batches:
        try:
            labels = adapter.labels(b)
        except KeyError:
            return
        if bool((labels != IGNORE_INDEX).any()):
            return
        lengths.append(int(labels.shape[-1]) + 1)
    raise InputError(f"the data has nothing to predict: every label is -100 in all {len(lengths)} "
                     f"batches (for a language model: each example is one token or padding only, "
                     f"sequences of at most {max(lengths, default=0)} tokens); give examples of at least "
                     f"two tokens")


def write_fisher(
    adapter: Adapter,
    batches: Sequence[Mapping[str, Any]],
    out: str | Path,
    *,
    estimator: str = "exact",
    n_samples: int = 1,
    n_examples: int | None = None,
    seed: int = 0,
    per_example: str = "auto",
    vmap_chunk: int | None = None,
    max_stats_memory: int | str = DEFAULT_MAX_STATS_MEMORY,
    shard_size: int | str = DEFAULT_SHARD_SIZE,
    stored_names: Iterable[str] | None = None,
    info: Mapping[str, Any] | None = None,
    overwrite: bool = False,
    inputs: Iterable[str | Path] = (),
    progress: bool = False,
    estimate: Callable[..., WeightSpace] | None = None,
) -> dict[str, Any]:
    """Compute `adapter`'s diagonal Fisher (see fisher_diagonal) group by group and write it to
    OUT (a directory, or a `.safetensors` file); returns the metadata written.

    `estimate` (default fisher_diagonal) computes one group's Fisher. `vmap_chunk` None takes as many examples per vmap call as fit in max_stats_memory next to
    the group's accumulators (per-example gradients are chunk x group size), at least one.
    """
    estimate = estimate or fisher_diagonal
    out = Path(out)
    budget = parse_size(max_stats_memory)
    shard_bytes = parse_size(shard_size)
    if not isinstance(batches, Sequence):
        raise SpecError("write_fisher: batches must be a list (each group of parameters reads them again)")
    if estimator == "exact" and isinstance(adapter, HFCausalLMAdapter):  # before any pass
        raise SpecError("exact Fisher needs one prediction per example, and a causal LM makes one per "
                        "token; use sampled or empirical for language models")
    params = adapter.params()
    names = output_names(adapter.module, stored_names)
    order = sorted(params)  # the sink's layout order is by name: groups follow it
    sizes = [(n, params[n].numel() * 4) for n in order]
    groups = plan_groups(sizes, budget)
    examples = _count_examples(batches, n_examples)
    if examples == 0:
        raise InputError("write_fisher: the batches hold no examples")
    meta: dict[str, Any] = {"estimator": estimator, "examples": examples,
                            "n_samples": n_samples if estimator == "sampled" else None, "seed": seed,
                            "passes": len(groups), "max_stats_memory": budget, **(info or {})}
    # the sink lays tensors out by name; a tied parameter's second name may come later than the
    # group that computes it, so a finished tensor waits in `pending` until its turn
    flat = sorted((o, n) for n in order for o in names[n])
    specs = [(o, torch.float32, tuple(params[n].shape)) for o, n in flat]
    _check_labels(adapter, batches)
    to_dir = out.suffix != ".safetensors"
    sink = None
    if not to_dir:
        from weightspace.files import check_output_file

        check_output_file(out, overwrite, inputs=inputs)
    if to_dir:
        sink = CheckpointSink(out, specs, shard_size=shard_bytes, overwrite=overwrite, inputs=inputs,
                              metadata={"fisher": json.dumps(meta, sort_keys=True)})
    held: dict[str, torch.Tensor] = {}
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=examples * len(groups), desc="fisher", unit="ex")
    t0 = time.perf_counter()
    modes: set[str] = set()
    predictions = None
    written = 0
    try:
        for group in groups:
            group_bytes = max(1, sum(params[n].numel() * 4 for n in group))
            chunk = vmap_chunk or max(1, (budget - group_bytes) // group_bytes)
            space = estimate(adapter, batches, params=params, over=group, estimator=estimator,
                                    n_samples=n_samples, n_examples=n_examples, seed=seed,
                                    per_example=per_example, vmap_chunk=chunk, bar=bar)
            modes.add(space.meta["fisher"]["per_example"])
            predictions = space.meta["fisher"]["predictions"]
            ready = {n: _take(ref) for n, ref in space.items()}
            del space
            for n in group:
                for o in names[n]:
                    held[o] = ready[n]
            del ready
            while sink is not None and written < len(sink.order) and sink.order[written] in held:
                sink.write(sink.order[written], held.pop(sink.order[written]))
                written += 1
        seconds = time.perf_counter() - t0
        meta.update({"per_example": "+".join(sorted(modes)), "predictions": predictions,
                     "seconds": round(seconds, 3),
                     "examples_per_second": round(examples / seconds, 3) if seconds > 0 else None})
        if sink is not None:
            sink.finish(extra_json={INFO_FILE: meta})
        else:
            save_fisher(WeightSpace.from_tensors({o: held[o] for o, _ in flat}, {"fisher": meta}), out)
    except BaseException:
        if sink is not None:
            sink.abort()
        raise
    finally:
        if bar is not None:
            bar.close()
    return meta
