"""LoRA extraction: a fine-tune's task vector, layer by layer, as a peft LoRA adapter.

    report = extract_lora("ft/", "base/", "adapter/", rank=32)          # a fixed rank
    report = extract_lora("ft/", "base/", "adapter/", energy=0.9, max_rank=64)
    plan = plan_extraction(load_space("ft/"), load_space("base/"), rank=32)   # headers only

Per linear layer (a 2-D `.weight` that is not an embedding: q/k/v/o/gate/up/down, lm_head,
BERT's query/key/value/dense), dW = W_ft - W_base in float32 is factored by a truncated SVD
dW ~ U_k S_k V_k^T (Eckart–Young: the best rank-k approximation, error^2 = sum of the tail
s_i^2). The factors are split evenly, as mergekit's extract_lora does by default:

    lora_B = U_k sqrt(S_k)   [out, k]        lora_A = sqrt(S_k) V_k^T   [k, in]

and the adapter's scale is 1: `lora_alpha` = r, and every module whose rank differs from r
gets `rank_pattern` and `alpha_pattern` entries of its own rank, so peft's W + B @ A * alpha / r
is W_base + U_k S_k V_k^T for every module.

The rank is `rank` (capped at min(out, in), with a warning: a capped layer is exact), or with
`energy` the smallest k whose s_1^2 + ... + s_k^2 keeps that share of ||dW||_F^2, at most
`max_rank`. The SVD is torch.linalg.svd where that is cheap (small matrices, or a rank near the
matrix's size) and otherwise a randomized SVD (torch.svd_lowrank, Halko et al. 2011) with
k + 16 columns and 4 power iterations; `svd="full"` forces the exact one. Its error is
reported, computed from the factors as stored (||dW - B A||_F / ||dW||_F, after their cast to
the output dtype), never assumed.

Other tensors are compared too. A linear layer's bias that changed is stored as peft's
`lora_B.bias` (`lora_bias: true`: merged bias = base + scale * b, exact). Embeddings, norms and
anything else that changed are reported, and saved whole as `modules_to_save` when
`save_modules` names them (kinds `embed`, `norm`, `other`, `all`, or module names); with
`embed_lora` input embeddings are factored too, as peft's `lora_embedding_A/B`
(weight += (B @ A)^T). Tied output layers are not stored and so not extracted.

Streaming: the tensors are read one at a time through the executor's prefetching reader and
the SVD runs on `device`; memory is one layer's tensors, the SVD's workspace and the adapter
being built (r * (in + out) values per module). Written atomically (files.atomic_dir): the
adapter directory appears whole or not at all, and never inside or over an input.

Hu et al. 2021 (LoRA); Halko, Martinsson & Tropp 2011 (randomized SVD).
"""

from __future__ import annotations

import difflib
import json
import math
import re
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from weightspace.errors import InputError, SpecError
from weightspace.ir import TensorRef, WeightSpace
from weightspace.lora.adapter import CONFIG_NAME, PREFIX, pattern_key
from weightspace.lora.apply import CONV1D_MODEL_TYPES
from weightspace.safetensors_io import ShardWriter, layout_order
from weightspace.structure import parse_layer

WEIGHTS_FILE = "adapter_model.safetensors"
REPORT_FILE = "extraction_report.json"
OVERSAMPLE, POWER_ITERATIONS = 16, 4
PREFETCH_BYTES = 64 * 2**20
SAVE_KINDS = ("embed", "norm", "other", "all", "none")

_EMBEDDING = re.compile(r"(^|\.)(embed_tokens|wte|wpe|word_embeddings|position_embeddings|"
                        r"token_type_embeddings|embed_positions|embed_in|tok_embeddings|shared)$")
_INPUT_EMBEDDING = re.compile(r"(^|\.)(embed_tokens|wte|word_embeddings|embed_in|tok_embeddings|shared)$")
_NORM = re.compile(r"(norm|(^|\.)ln_\w*$|(^|\.)ln$)", re.IGNORECASE)
_TASK_TYPES = {"ForCausalLM": "CAUSAL_LM", "ForSequenceClassification": "SEQ_CLS",
               "ForTokenClassification": "TOKEN_CLS", "ForQuestionAnswering": "QUESTION_ANS",
               "ForConditionalGeneration": "SEQ_2_SEQ_LM", "Model": "FEATURE_EXTRACTION"}


# ---------------------------------------------------------------- the math, per matrix


def truncated_svd(delta: torch.Tensor, k: int, *, method: str = "auto",
                  seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, str]:
    """(U [m, q], S [q], Vh [q, n], how) with q >= min(k, min(m, n)) leading singular triplets of
    `delta` (float32). `method`: full (torch.linalg.svd, every triplet), randomized
    (torch.svd_lowrank with k + OVERSAMPLE columns, POWER_ITERATIONS power iterations, seeded)
    or auto (randomized only when k + OVERSAMPLE is at most a quarter of min(m, n) and the
    matrix has at least 512 rows and columns: there it is several times faster)."""
    if _svd_kind(tuple(delta.shape), k, method) == "randomized":
        q = min(min(delta.shape), k + OVERSAMPLE)
        # torch.svd_lowrank draws its test matrix from the global generator: seed it, and
        # restore the caller's state
        devices = [delta.device] if delta.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            u, s, v = torch.svd_lowrank(delta, q=q, niter=POWER_ITERATIONS)
        return u, s, v.mT, "randomized"
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    return u, s, vh, "full"


def energy_rank(s: torch.Tensor, total_sq: float, energy: float) -> int:
    """The smallest k with s_1^2 + ... + s_k^2 >= energy * total_sq (len(s) if none is)."""
    cum = torch.cumsum(s.double() ** 2, 0)
    hit = torch.nonzero(cum >= energy * total_sq * (1 - 1e-12))
    return int(hit[0]) + 1 if len(hit) else len(s)


def split_factors(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor,
                  k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, A) = (U_k sqrt(S_k), sqrt(S_k) Vh_k), so B @ A = U_k S_k Vh_k."""
    root = s[:k].clamp_min(0).sqrt()
    return u[:, :k] * root, root[:, None] * vh[:k]


# ---------------------------------------------------------------- the plan


@dataclass
class Target:
    """One module to factor: its weight tensor (and bias), layout and kind."""

    module: str
    weight: str
    shape: tuple[int, int]              # of the stored weight
    kind: str                           # linear | embedding
    transposed: bool = False            # the delta factored is dW^T (Conv1D, embeddings)
    bias: str | None = None

    @property
    def max_rank(self) -> int:
        return min(self.shape)


@dataclass
class ExtractionPlan:
    """What `run_extraction` will do, from headers only."""

    finetuned: WeightSpace
    base: WeightSpace
    targets: list[Target]
    others: list[str]                   # tensors compared, not factored (saved whole if chosen)
    rank: int | None
    energy: float | None
    max_rank: int | None
    save: list[str]                     # kinds and module names for modules_to_save
    svd: str
    fan_in_fan_out: bool
    notes: list[str] = field(default_factory=list)

    def rank_for(self, t: Target) -> int:
        """The rank the SVD is asked for (energy: its cap)."""
        want = self.rank if self.rank is not None else (self.max_rank or t.max_rank)
        return min(want, t.max_rank)

    def summary(self) -> dict[str, Any]:
        """The plan as --dry-run prints it: modules, their rank (or cap), adapter size."""
        rows = [{"module": t.module, "shape": list(t.shape), "kind": t.kind,
                 "rank": self.rank_for(t), "svd": _svd_kind(t.shape, self.rank_for(t), self.svd)}
                for t in self.targets]
        values = sum(r["rank"] * sum(t.shape) for r, t in zip(rows, self.targets))
        return {"finetuned": self.finetuned.source, "base": self.base.source,
                "rule": _rule_text(self.rank, self.energy, self.max_rank),
                "modules": rows, "compared_whole": len(self.others),
                "adapter_values_at_most": values, "notes": self.notes}


def _svd_kind(shape: tuple[int, int], k: int, method: str) -> str:
    """Which SVD `truncated_svd` runs for a matrix of `shape` and rank `k` (see there)."""
    small = min(shape)
    q = min(small, k + OVERSAMPLE)
    if method == "randomized" or (method == "auto" and small >= 512 and 4 * q <= small):
        return "randomized" if q < small else "full"
    return "full"


def _rule_text(rank: int | None, energy: float | None, max_rank: int | None) -> str:
    if rank is not None:
        return f"rank {rank}"
    return f"energy {energy:g}" + (f", at most rank {max_rank}" if max_rank else "")


def _module(name: str) -> str:
    return name.rsplit(".", 1)[0] if "." in name else name


def plan_extraction(finetuned: WeightSpace, base: WeightSpace, *, rank: int | None = None,
                    energy: float | None = None, max_rank: int | None = None,
                    save_modules: str | list[str] = "none", embed_lora: bool = False,
                    svd: str = "auto") -> ExtractionPlan:
    """Check the two models against each other and pick the modules to factor (headers only).

    Errors: a tensor in one model and not the other, or of another shape (naming it); a rank
    rule that is not exactly one of `rank` / `energy`; a fine-tune with no linear layer."""
    if (rank is None) == (energy is None):
        raise SpecError("give a rank (--rank R) or an energy share (--energy E), not both" if rank
                        else "give a rank (--rank R) or an energy share (--energy E)")
    if rank is not None and (not isinstance(rank, int) or rank <= 0):
        raise SpecError(f"--rank must be a positive integer, got {rank!r}")
    if energy is not None and not (0 < energy <= 1):
        raise SpecError(f"--energy must be in (0, 1], got {energy!r}")
    if max_rank is not None and max_rank <= 0:
        raise SpecError(f"--max-rank must be a positive integer, got {max_rank!r}")
    if rank is not None and max_rank is not None:
        raise SpecError("--max-rank caps the rank --energy picks; with --rank it has no use")
    if svd not in ("auto", "full", "randomized"):
        raise SpecError(f"svd must be auto, full or randomized, got {svd!r}")
    save = _parse_save(save_modules)
    _check_same_tensors(finetuned, base)
    modules = {_module(n) for n in finetuned}
    for name in save:
        if name not in SAVE_KINDS and not any(_matches_names(m, [name]) for m in modules):
            close = difflib.get_close_matches(name, sorted(modules), n=1, cutoff=0.6)
            raise SpecError(f"--save-modules {name!r}: no module of {finetuned.source} is called "
                            f"that (kinds: {', '.join(SAVE_KINDS[:-1])}, or module names"
                            + (f"; closest: {close[0]!r})" if close else ")"))
    model_type = (base.meta.get("config") or finetuned.meta.get("config") or {}).get("model_type")
    conv1d = model_type in CONV1D_MODEL_TYPES
    targets: list[Target] = []
    for name, ref in finetuned.items():
        mod = _module(name)
        if not (name.endswith(".weight") and len(ref.shape) == 2 and ref.dtype.is_floating_point):
            continue
        if _matches_names(mod, save):  # a module named in save_modules is saved whole, not factored
            continue
        bias = f"{mod}.bias" if f"{mod}.bias" in finetuned else None
        if not _EMBEDDING.search(mod):
            targets.append(Target(mod, name, tuple(ref.shape), "linear",
                                  transposed=conv1d and not mod.endswith(("lm_head", "score")),
                                  bias=bias))
        elif embed_lora and _INPUT_EMBEDDING.search(mod):
            targets.append(Target(mod, name, tuple(ref.shape), "embedding", transposed=True))
    factored = {t.weight for t in targets} | {t.bias for t in targets if t.bias}
    others = [n for n in finetuned if n not in factored]
    if not targets:
        raise InputError(f"{finetuned.source}: no linear layer to extract (no 2-D floating-point "
                         f"'.weight' tensor outside embeddings" + (" and --save-modules" if save else "")
                         + ")")
    plan = ExtractionPlan(finetuned, base, targets, others, rank, energy, max_rank, save, svd, conv1d)
    if rank is not None:
        capped = [t for t in targets if t.max_rank < rank]
        if capped:
            plan.notes.append(f"--rank {rank} is more than min(out, in) of {len(capped)} module(s) "
                              f"(e.g. {capped[0].module} {list(capped[0].shape)}); they get rank "
                              f"min(out, in), which is exact")
    return plan


def _parse_save(save_modules: str | list[str]) -> list[str]:
    items = save_modules.split(",") if isinstance(save_modules, str) else list(save_modules)
    items = [s.strip() for s in items if s.strip()]
    if "none" in items:
        if len(items) > 1:
            raise SpecError(f"--save-modules none cannot be combined with {items}")
        return []
    return items


def _matches_names(mod: str, save: list[str]) -> bool:
    """A module named (not by kind) in save_modules: its full name or its last components."""
    return any(s not in SAVE_KINDS and (mod == s or mod.endswith("." + s)) for s in save)


def _save_whole(mod: str, save: list[str]) -> bool:
    if not save:
        return False
    if "all" in save or _matches_names(mod, save):
        return True
    kind = "embed" if _EMBEDDING.search(mod) else "norm" if _NORM.search(mod) else "other"
    return kind in save


def _check_same_tensors(ft: WeightSpace, base: WeightSpace) -> None:
    missing = [n for n in ft if n not in base]
    extra = [n for n in base if n not in ft]
    if missing or extra:
        which = (f"{missing[0]!r} is in the fine-tune {ft.source} but not in the base {base.source}"
                 if missing else
                 f"{extra[0]!r} is in the base {base.source} but not in the fine-tune {ft.source}")
        count = len(missing) + len(extra)
        raise InputError(f"the fine-tune and the base have different tensors: {which}"
                         + (f" ({count} such tensors)" if count > 1 else "")
                         + "; extract from a fine-tune of this base")
    for n, r in ft.items():
        b = base[n]
        if tuple(r.shape) != tuple(b.shape):
            raise InputError(f"tensor {n!r} is {list(r.shape)} in the fine-tune {ft.source} but "
                             f"{list(b.shape)} in the base {base.source}; a LoRA cannot change a "
                             f"layer's shape (a resized vocabulary?)")


# ---------------------------------------------------------------- running it


def run_extraction(plan: ExtractionPlan, out: str | Path, *, overwrite: bool = False,
                   device: str = "cpu", dtype: torch.dtype | None = None, progress: bool = False,
                   inputs: list[str | Path] = (), seed: int = 0,
                   base_model_name: str | None = None) -> dict[str, Any]:
    """Factor every planned module and write the adapter directory `out` atomically:
    adapter_config.json, adapter_model.safetensors and extraction_report.json. `dtype`: the
    factors' dtype (default: the fine-tune's weight dtype). Returns the report."""
    from weightspace.executor import Step, execute, resolve_device
    from weightspace.files import atomic_dir, check_output
    from weightspace.sink import inputs_of

    ft, base = plan.finetuned, plan.base
    every_input = [*inputs_of(ft), *inputs_of(base), *inputs]
    check_output(out, overwrite, inputs=every_input)  # before the first tensor is read
    dev = resolve_device(device)
    tensors: dict[str, torch.Tensor] = {}   # the factors (small), by peft name
    whole: dict[str, TensorRef] = {}        # modules_to_save tensors, by peft name: read at the end
    modules: list[dict] = []
    changed_whole: list[dict] = []
    bias_deltas: dict[str, torch.Tensor] = {}
    unchanged: list[str] = []
    bar = _bar(progress, len(plan.targets) + len(plan.others))
    t0 = time.perf_counter()

    def compare(name: str) -> Callable[[list[torch.Tensor]], None]:
        def run(ts: list[torch.Tensor]) -> None:
            f, b = ts
            if not torch.equal(f, b):
                rel = None
                if f.is_floating_point() and (nb := float(b.norm())) > 0:
                    rel = float((f - b).norm()) / nb
                mod = _module(name)
                saved = _save_whole(mod, plan.save)
                changed_whole.append({"tensor": name, "module": mod, "shape": list(f.shape),
                                      "rel_change": rel, "saved": saved})
                if saved:  # read again from the fine-tune when the adapter is written
                    whole[PREFIX + name] = ft[name]
            _tick(bar)
        return run

    def factor(t: Target) -> Callable[[list[torch.Tensor]], None]:
        def run(ts: list[torch.Tensor]) -> None:
            f, b = ts[0], ts[1]
            start = time.perf_counter()
            delta = (f - b).float()
            if t.bias is not None:
                db = (ts[2] - ts[3]).float()
                if bool(db.any()):
                    bias_deltas[t.module] = db.cpu()
            if t.transposed:
                delta = delta.mT
            total_sq = float(torch.linalg.vector_norm(delta, dtype=torch.float64)) ** 2
            if total_sq == 0.0:
                unchanged.append(t.module)
                _tick(bar)
                return
            cap = plan.rank_for(t)
            u, s, vh, how = truncated_svd(delta, cap, method=plan.svd, seed=seed)
            k = min(cap, len(s)) if plan.energy is None else min(energy_rank(s, total_sq, plan.energy), cap)
            bf, af = split_factors(u, s, vh, k)
            out_dtype = dtype or ft[t.weight].dtype
            if out_dtype != bf.dtype:  # the error of the factors as stored
                bf, af = bf.to(out_dtype), af.to(out_dtype)
            err = float((delta - bf.float() @ af.float()).norm() / math.sqrt(total_sq))
            kept = float((s[:k].double() ** 2).sum() / total_sq)
            key = PREFIX + t.module
            if t.kind == "embedding":  # peft: weight [num, dim] += (B @ A)^T; A [r, num], B [dim, r]
                tensors[f"{key}.lora_embedding_A"] = af.to("cpu", out_dtype).contiguous()
                tensors[f"{key}.lora_embedding_B"] = bf.to("cpu", out_dtype).contiguous()
            else:
                tensors[f"{key}.lora_A.weight"] = af.to("cpu", out_dtype).contiguous()
                tensors[f"{key}.lora_B.weight"] = bf.to("cpu", out_dtype).contiguous()
            layer = parse_layer(t.weight)
            modules.append({"module": t.module, "tensor": t.weight, "kind": t.kind,
                            "layer": layer.index if layer else None, "shape": list(t.shape),
                            "rank": k, "max_rank": t.max_rank, "svd": how,
                            "rel_error": err,
                            "energy_kept": min(kept, 1.0),
                            "delta_norm": math.sqrt(total_sq),
                            "seconds": round(time.perf_counter() - start, 4)})
            _tick(bar)
        return run

    steps = [Step(n, None, torch.float32, [ft[n], base[n]], compare(n),
                  cast_inputs=ft[n].dtype.is_floating_point) for n in plan.others]
    for t in plan.targets:
        refs = [ft[t.weight], base[t.weight]] + ([ft[t.bias], base[t.bias]] if t.bias else [])
        steps.append(Step(t.weight, None, torch.float32, refs, factor(t)))
    try:
        # the SVD, not the reading, takes the time: a short prefetch keeps memory near one layer
        execute(steps, _NoSink(), device=dev, compute_dtype=torch.float32, progress=False,
                prefetch=2, prefetch_bytes=PREFETCH_BYTES)
    finally:
        if bar is not None:
            bar.close()
    if not modules:
        raise InputError(f"no linear layer differs between the fine-tune {ft.source} and the base "
                         f"{base.source}: there is nothing to extract")
    lora_bias = _lora_bias(plan, modules, bias_deltas, tensors)
    config = adapter_config(plan, modules, changed_whole, lora_bias, base_model_name or _base_name(base))
    report = {
        "finetuned": ft.source, "base": base.source,
        "rule": _rule_text(plan.rank, plan.energy, plan.max_rank), "svd": plan.svd,
        "device": str(dev), "scale": "lora_alpha / r = 1 for every module (B @ A is the delta)",
        "modules": modules, "unchanged_modules": unchanged,
        "changed_not_factored": changed_whole,
        "bias_deltas": sorted(bias_deltas) if lora_bias else [],
        "adapter_values": sum(v.numel() for v in tensors.values()) + sum(r.numel for r in whole.values()),
        "seconds": round(time.perf_counter() - t0, 3), "notes": plan.notes,
    }

    def write(tmp: Path) -> None:
        write_adapter_weights(tmp / WEIGHTS_FILE, tensors, whole)
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        (tmp / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")

    atomic_dir(out, overwrite, write, inputs=every_input)
    report["config"] = config
    return report


def write_adapter_weights(path: Path, tensors: dict[str, torch.Tensor],
                          whole: dict[str, TensorRef]) -> None:
    """adapter_model.safetensors, streamed: the factors from memory, the tensors saved whole read
    one at a time from their file."""
    specs = {k: (k, v.dtype, tuple(v.shape)) for k, v in tensors.items()}
    specs.update({k: (k, r.dtype, tuple(r.shape)) for k, r in whole.items()})
    order = layout_order([(k, s[1]) for k, s in specs.items()])
    writer = ShardWriter(path, [specs[k] for k in order], {"format": "pt"})
    try:
        for k in order:
            writer.write(k, tensors[k] if k in tensors else whole[k].load())
        writer.close()
    except BaseException:
        writer.abort()
        raise


class _NoSink:
    """Statistics steps write nothing; the executor only calls abort() on failure."""

    def write(self, name: str, tensor: torch.Tensor) -> None:  # pragma: no cover - never called
        raise AssertionError(name)

    def abort(self) -> None:
        pass


def _bar(progress: bool, total: int):
    if not progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="lora extract", unit="tensor", leave=False, dynamic_ncols=True)


def _tick(bar) -> None:
    if bar is not None:
        bar.update(1)


def _lora_bias(plan: ExtractionPlan, modules: list[dict], bias_deltas: dict[str, torch.Tensor],
               tensors: dict[str, torch.Tensor]) -> bool:
    """Changed biases of factored layers as peft's lora_B.bias (lora_bias: true, a global flag:
    every factored layer needs a base bias, and none may be an embedding)."""
    if not bias_deltas:
        return False
    by_module = {t.module: t for t in plan.targets}
    done = modules
    no_bias = [m["module"] for m in done if by_module[m["module"]].bias is None]
    embeds = [m["module"] for m in done if m["kind"] == "embedding"]
    changed = next(iter(bias_deltas))
    if embeds:
        raise InputError(f"the bias of {changed!r} changed, which peft stores as lora_B.bias "
                         f"(lora_bias), but peft's lora_bias does not support embedding layers "
                         f"({embeds[0]!r}, from --embed-lora); save the embedding whole instead "
                         f"(--save-modules embed)")
    if no_bias:
        raise InputError(f"the bias of {changed!r} changed, which peft stores as lora_B.bias "
                         f"(lora_bias), but peft's lora_bias needs a bias on every LoRA layer and "
                         f"{no_bias[0]!r} has none; save {changed!r} whole instead "
                         f"(--save-modules {changed})")
    for m in done:
        t = by_module[m["module"]]
        d = bias_deltas.get(t.module)
        if d is None:
            d = torch.zeros(t.shape[1] if t.transposed else t.shape[0])
        dtype = tensors[f"{PREFIX}{t.module}.lora_B.weight"].dtype
        tensors[f"{PREFIX}{t.module}.lora_B.bias"] = d.to(dtype)
    return True


def _base_name(base: WeightSpace) -> str:
    hub = base.meta.get("hub_id")
    if hub:
        return str(hub)
    loc = base.meta.get("location")
    return str(loc) if loc else base.source


def _task_type(config: dict | None) -> str | None:
    for arch in (config or {}).get("architectures") or []:
        for suffix, task in _TASK_TYPES.items():
            if str(arch).endswith(suffix):
                return task
    return None


def adapter_config(plan: ExtractionPlan, modules: list[dict], changed_whole: list[dict],
                   lora_bias: bool, base_name: str) -> dict[str, Any]:
    """peft's adapter_config.json for the extracted modules: scale 1 everywhere."""
    ranks = {m["module"]: m["rank"] for m in modules}
    r = max(ranks.values())
    pattern = {mod: k for mod, k in ranks.items() if k != r}
    _check_patterns(pattern, list(ranks))
    saved = sorted({c["module"] for c in changed_whole if c["saved"]})
    config: dict[str, Any] = {
        "peft_type": "LORA",
        "base_model_name_or_path": base_name,
        "r": r,
        "lora_alpha": r,
        "target_modules": _target_modules(list(ranks), plan),
        "rank_pattern": pattern,
        "alpha_pattern": dict(pattern),
        "modules_to_save": saved or None,
        "lora_dropout": 0.0,
        "bias": "none",
        "lora_bias": lora_bias,
        "use_rslora": False,
        "use_dora": False,
        "fan_in_fan_out": plan.fan_in_fan_out,
        "init_lora_weights": True,
        "inference_mode": True,
        "task_type": _task_type(plan.base.meta.get("config")),
    }
    return config


def _check_patterns(pattern: dict[str, int], names: list[str]) -> None:
    """Each rank_pattern key (a full module name, read by peft as a regex on the name's end)
    must pick its own module only."""
    for mod in names:
        key = pattern_key(pattern, mod)
        if key in pattern and key != mod:  # pragma: no cover - names with regex characters
            raise InputError(f"internal: rank_pattern key {key!r} also matches module {mod!r}")


def _target_modules(names: list[str], plan: ExtractionPlan) -> list[str]:
    """Short names (q_proj, ...) where every module of that name is extracted, as peft users
    write them; otherwise the full names of the extracted modules."""
    short = sorted({n.rsplit(".", 1)[-1] for n in names})
    everywhere = {_module(k) for k, r in plan.finetuned.items()
                  if k.endswith(".weight") and _module(k).rsplit(".", 1)[-1] in short}
    if everywhere == set(names):
        return short
    return sorted(names)


# ---------------------------------------------------------------- one call


def extract_lora(finetuned: str | Path | WeightSpace, base: str | Path | WeightSpace,
                 out: str | Path, *, rank: int | None = None, energy: float | None = None,
                 max_rank: int | None = None, save_modules: str | list[str] = "none",
                 embed_lora: bool = False, svd: str = "auto", device: str = "cpu",
                 dtype: torch.dtype | None = None, overwrite: bool = False,
                 progress: bool = False, seed: int = 0) -> dict[str, Any]:
    """Extract a peft LoRA adapter of `finetuned` against `base` into `out`; returns the report
    (also in out/extraction_report.json). See the module docstring for the rules."""
    from weightspace.sources import load_space

    given = [p for p in (finetuned, base) if isinstance(p, (str, Path))]
    ft = finetuned if isinstance(finetuned, WeightSpace) else load_space(finetuned)
    bs = base if isinstance(base, WeightSpace) else load_space(base)
    plan = plan_extraction(ft, bs, rank=rank, energy=energy, max_rank=max_rank,
                           save_modules=save_modules, embed_lora=embed_lora, svd=svd)
    for note in plan.notes:
        warnings.warn(note, stacklevel=2)
    return run_extraction(plan, out, overwrite=overwrite, device=device, dtype=dtype,
                          progress=progress, inputs=given, seed=seed)


def plot_report(report: dict[str, Any], path: str | Path) -> Path:
    """Rank and relative reconstruction error by depth, one line per module kind (q_proj, ...)."""
    from weightspace.extras import pyplot

    plt = pyplot()
    by_kind: dict[str, list[dict]] = {}
    for m in report["modules"]:
        by_kind.setdefault(m["module"].rsplit(".", 1)[-1], []).append(m)
    fig, (ax1, ax2) = plt.subplots(2, 1, sharex=True, figsize=(7, 5.5))
    for kind, rows in sorted(by_kind.items()):
        rows = sorted(rows, key=lambda m: (m["layer"] is None, m["layer"] or 0))
        xs = [m["layer"] if m["layer"] is not None else -1 for m in rows]
        ax1.plot(xs, [m["rank"] for m in rows], marker="o", label=kind)
        ax2.plot(xs, [m["rel_error"] for m in rows], marker="o", label=kind)
    ax1.set_ylabel("rank")
    ax2.set_ylabel("||dW - BA|| / ||dW||")
    ax2.set_xlabel("layer (-1: outside the layer stack)")
    ax1.legend(fontsize=7, ncol=4)
    fig.suptitle(f"LoRA extraction ({report['rule']}): {Path(str(report['finetuned'])).name}",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
