"""LoRA inputs: `base+adapter` is a base model with a peft LoRA adapter applied, lazily.

    space = load_space("models/base+adapters/sql")       # headers and adapter_config.json only
    space["model.layers.0.self_attn.q_proj.weight"].load()   # W + scale * B @ A: reads W, A, B

The adapter is a peft directory (local, or a Hub id `org/name[@revision]`):
`adapter_config.json` and `adapter_model.safetensors`, or `adapter_model.bin`
loaded with `torch.load(weights_only=True)`. The result is what peft's
`merge_and_unload()` writes, and so what mergekit's `model+lora` merges:

- a tensor the adapter touches becomes a `LoraRef` that reads the base tensor
  and that module's A and B only, computes W + scale * B @ A in float32 and
  casts it to the base tensor's dtype; peak memory is one tensor, and a large
  tensor streamed in row blocks reads only those rows of W (and of B);
- scale is lora_alpha / r, or lora_alpha / sqrt(r) with `use_rslora`;
  `rank_pattern` / `alpha_pattern` set r and alpha per module, matched as peft
  matches them; embeddings (`lora_embedding_A/B`) add (B @ A)^T, rounded to the
  base dtype first as peft does; Conv1D layers (GPT-2) stored as (in, out) add
  (B @ A)^T (`fan_in_fan_out`), the layout read from the shapes as peft reads it
  from the module type;
- tensors the adapter stores whole (`modules_to_save`, biases trained with
  `bias: all / lora_only`, saved embedding layers) replace the base's, and a
  `lora_B` bias (`lora_bias`) adds scale * b to the base bias;
- an output layer tied to the input embeddings (not stored in the base) adds
  its delta to the embedding tensor, after the embedding's own, as peft's
  merges of the shared weight do;
- the config, tokenizer and other files come from the base.

Everything is checked from headers before a tensor is read: the config, that
every module the adapter holds exists in the base with shapes that fit, the
ranks. Refused with a sentence: other peft methods, DoRA and the other LoRA
variants, initialisations that change the base weights (PiSSA, OLoRA, CorDA,
LoftQ, LoRA-GA), convolution layers, trainable tokens, `modules_to_save` that
unties a tied output layer.

Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models".
"""

from __future__ import annotations

import difflib
import functools
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from weightspace.errors import InputError, SpecError
from weightspace.ir import ExprRef, TensorRef, WeightSpace

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAMES = ("adapter_model.safetensors", "adapter_model.bin")
PREFIX = "base_model.model."  # peft's key prefix for the wrapped model

# Architectures whose attention/MLP layers are transformers' Conv1D, which stores its weight as
# (in, out): peft sets fan_in_fan_out for them whatever the config says, and clears it for
# nn.Linear. Non-square layers show their layout in their shapes; square ones follow this list.
CONV1D_MODEL_TYPES = frozenset({"gpt2", "openai-gpt", "imagegpt", "decision_transformer"})

# adapter_config.json settings whose merge is not W + scale * B @ A, or that need the weights
# they changed at initialisation: (key, what it is)
_VARIANTS = (
    ("use_dora", "DoRA (use_dora: true) rescales each column by a learned magnitude"),
    ("alora_invocation_tokens", "activated LoRA (alora_invocation_tokens) applies only after its "
                                "invocation tokens and cannot be merged"),
    ("velora_config", "VeLoRA (velora_config)"),
    ("monteclora_config", "MonteCLoRA (monteclora_config)"),
    ("use_bdlora", "block-diagonal LoRA (use_bdlora)"),
    ("arrow_config", "Arrow routing (arrow_config)"),
    ("kasa_config", "KaSA (kasa_config)"),
    ("use_qalora", "QALoRA (use_qalora)"),
    ("layer_replication", "layer replication (layer_replication) adds layers to the base"),
    ("target_parameters", "LoRA on parameters (target_parameters)"),
    ("trainable_token_indices", "trainable tokens (trainable_token_indices)"),
    ("megatron_config", "Megatron parallel layers (megatron_config)"),
)
_BASE_CHANGING_INITS = ("pissa", "corda", "olora", "loftq", "lora_ga")


# ---------------------------------------------------------------- the adapter


@dataclass(frozen=True)
class LoraConfig:
    """The parts of peft's LoraConfig that decide the merged weights."""

    r: int
    lora_alpha: float
    use_rslora: bool = False
    fan_in_fan_out: bool = False
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    target_modules: list[str] | str | None = None

    def rank_and_scale(self, module: str) -> tuple[int, float]:
        """(r, scale) for `module`: peft's per-module patterns, then lora_alpha / r (or / sqrt(r))."""
        r = self.rank_pattern.get(_pattern_key(self.rank_pattern, module), self.r)
        alpha = self.alpha_pattern.get(_pattern_key(self.alpha_pattern, module), self.lora_alpha)
        return r, alpha / (math.sqrt(r) if self.use_rslora else r)

    def targets(self, module: str) -> bool:
        """Whether `target_modules` names `module`, as peft matches it."""
        t = self.target_modules
        if t is None or t == "all-linear":
            return True
        if isinstance(t, str):
            return re.fullmatch(t, module) is not None
        return any(module == k or module.endswith("." + k) for k in t)


def _pattern_key(patterns: dict, module: str) -> str:
    """peft's get_pattern_key: the first pattern that matches the end of the module's name."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return module


@dataclass
class Adapter:
    """A peft LoRA adapter, headers only: its folder, weights file, config and tensors
    (weightspace.sources.read_adapter opens one)."""

    path: Path
    weights: Path
    config: LoraConfig
    tensors: WeightSpace  # peft's names, e.g. base_model.model.<module>.lora_A.weight


def read_adapter_config(path: str | Path) -> tuple[LoraConfig, Path]:
    """A peft adapter directory's checked adapter_config.json, and its weights file (not read;
    weightspace.sources.read_adapter opens it)."""
    d = Path(path)
    if not d.is_dir():
        raise InputError(f"{d}: expected a peft adapter directory ({CONFIG_NAME} and "
                         f"{WEIGHTS_NAMES[0]}), got a file")
    cfg_file = d / CONFIG_NAME
    if not cfg_file.is_file():
        full = (d / "config.json").is_file()
        raise InputError(f"{d}: not a peft adapter: it has no {CONFIG_NAME}"
                         + ("; it looks like a full model: merge it as a model, not as base+adapter"
                            if full else ""))
    try:
        raw = json.loads(cfg_file.read_text())
    except (ValueError, OSError) as e:
        raise InputError(f"{cfg_file}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise InputError(f"{cfg_file}: expected a JSON object")
    config = _check_config(raw, cfg_file)
    weights = next((d / n for n in WEIGHTS_NAMES if (d / n).is_file()), None)
    if weights is None:
        has = ", ".join(sorted(p.name for p in d.iterdir())[:8])
        raise InputError(f"{d}: the adapter has no {' or '.join(WEIGHTS_NAMES)} (the folder has: {has})")
    return config, weights


def _check_config(raw: dict, where: Path) -> LoraConfig:
    kind = raw.get("peft_type", "LORA")
    if str(kind).upper() != "LORA":
        raise InputError(f"{where}: peft_type {kind!r} is not supported: only LoRA adapters "
                         f"(peft_type LORA) can be applied to a base model")
    for key, what in _VARIANTS:
        if raw.get(key):
            raise InputError(f"{where}: {what}: this adapter is not supported, only plain LoRA "
                             f"(W + scale * B @ A) is; merge it with peft's merge_and_unload() and use "
                             f"the merged model")
    init = raw.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(_BASE_CHANGING_INITS):
        raise InputError(f"{where}: init_lora_weights {init!r} changed the base weights when the "
                         f"adapter was made, so it does not apply to the original base; convert it "
                         f"to a plain LoRA first (peft's save_pretrained("
                         f"path_initial_model_for_weight_conversion=...))")
    if init == "mica":
        raise InputError(f"{where}: MiCA (init_lora_weights 'mica') is not supported")

    def number(key: str, value: Any, positive_int: bool = False) -> Any:
        ok = (isinstance(value, int) and not isinstance(value, bool) and value > 0 if positive_int
              else isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value))
        if not ok:
            want = "a positive integer" if positive_int else "a number"
            raise InputError(f"{where}: {key} must be {want}, got {value!r}")
        return value

    def patterns(key: str, positive_int: bool) -> dict:
        value = raw.get(key) or {}
        if not isinstance(value, dict):
            raise InputError(f"{where}: {key} must be an object (module pattern -> value), got {value!r}")
        for k, v in value.items():
            number(f"{key}[{k!r}]", v, positive_int)
            _check_regex(k, f"{key} pattern", where)
        return value

    if "r" not in raw or "lora_alpha" not in raw:
        raise InputError(f"{where}: a LoRA config needs r and lora_alpha")
    target = raw.get("target_modules")
    if isinstance(target, str):
        if target != "all-linear":
            _check_regex(target, "target_modules", where)
    elif target is not None and not (isinstance(target, list) and all(isinstance(t, str) for t in target)):
        raise InputError(f"{where}: target_modules must be a list of module names or a regex, got {target!r}")
    for key in ("use_rslora", "fan_in_fan_out"):
        if not isinstance(raw.get(key, False), bool):
            raise InputError(f"{where}: {key} must be true or false, got {raw[key]!r}")
    if raw.get("bias", "none") not in ("none", "all", "lora_only"):
        raise InputError(f"{where}: bias must be 'none', 'all' or 'lora_only', got {raw['bias']!r}")
    return LoraConfig(
        r=number("r", raw["r"], positive_int=True), lora_alpha=number("lora_alpha", raw["lora_alpha"]),
        use_rslora=raw.get("use_rslora", False), fan_in_fan_out=raw.get("fan_in_fan_out", False),
        rank_pattern=patterns("rank_pattern", True), alpha_pattern=patterns("alpha_pattern", False),
        target_modules=target)


def _check_regex(pattern: str, what: str, where: Path) -> None:
    try:
        re.compile(pattern)
    except re.error as e:
        raise InputError(f"{where}: {what} {pattern!r} is not a valid regular expression ({e})") from None


# ---------------------------------------------------------------- lazy tensors


class _Factor:
    """The column factor of a LoRA product (r x n, small), read whole inside the op. It is not a
    TensorRef on purpose: slicing a LoraRef's rows (ir.RowSliceRef) slices W and the row factor
    and leaves this one whole, which is what rows of W + L @ R need."""

    __slots__ = ("ref", "transpose")

    def __init__(self, ref: TensorRef, transpose: bool):
        self.ref, self.transpose = ref, transpose

    def load(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        t = self.ref.load("cpu", dtype)
        t = t.t() if self.transpose else t
        return t if device.type == "cpu" else t.to(device)


class _Transposed(TensorRef):
    """A small factor's transpose (A^T, n x r) as a ref, so it can be the row factor."""

    __slots__ = ("ref",)

    def __init__(self, ref: TensorRef):
        super().__init__(ref.name, tuple(reversed(ref.shape)), ref.dtype)
        self.ref = ref

    def _load_cpu(self) -> torch.Tensor:
        return self.ref.load("cpu").t().contiguous()


def _lora_sum(out_dtype: torch.dtype, w: torch.Tensor, *terms: Any) -> torch.Tensor:
    """w + scale * (left @ right) for each term, in float32 (float64 for a float64 base), cast to
    `out_dtype`. `terms` are flat quadruples (left, right, scale, round_first): `right` None adds
    scale * left (a bias); `round_first` rounds the delta to `out_dtype` before adding it, as
    peft merges an embedding. Several terms on one tensor (a tied embedding) are added one by one,
    rounded to `out_dtype` in between, as peft's module-by-module merges are.

    Works in place on `w`, which the ref that loaded it made for this call (a `load` always returns
    a fresh tensor), so at most two float32 copies of the tensor are alive.
    """
    work = torch.float64 if out_dtype == torch.float64 else torch.float32
    acc = w.to(work)
    for i in range(0, len(terms), 4):
        left, right, scale, round_first = terms[i:i + 4]
        if i:
            acc = acc.to(out_dtype).to(work)
        left = left.to(work)
        delta = left * scale if right is None else (left @ right.load(left.device, work)).mul_(scale)
        if round_first:
            delta = delta.to(out_dtype).to(work)
        acc.add_(delta)
        del delta
    return acc.to(out_dtype)


class LoraRef(ExprRef):
    """A base tensor with LoRA deltas added: W + sum of scale * L @ R, computed when loaded.

    Row-aligned by construction: row i of the result reads row i of W and of each row factor
    L (B, or A^T for embeddings and Conv1D); the column factors R are `_Factor`s read whole.
    So the generic row slicing of an ExprRef (ir.RowSliceRef) is exact for it, and a large
    tensor streamed in row blocks reads only those rows of W.
    """

    __slots__ = ("modules",)

    def __init__(self, name: str, base: TensorRef, terms: list[tuple], modules: list[str]):
        operands: list[Any] = [base]
        for t in terms:
            operands.extend(t)
        super().__init__(name, functools.partial(_lora_sum, base.dtype), operands, base.shape, base.dtype)
        self.modules = modules

    def load(self, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> torch.Tensor:
        # W, A and B in float32 whatever the caller's dtype: the sum is peft's, then cast
        work = torch.float64 if self.dtype == torch.float64 else torch.float32
        args = [o.load(device, work) if isinstance(o, TensorRef) else o for o in self.operands]
        out = self.op(*args)
        return out if dtype is None or dtype == out.dtype else out.to(dtype)


def _same(t: torch.Tensor) -> torch.Tensor:
    return t


def _replacement(name: str, ref: TensorRef, dtype: torch.dtype) -> TensorRef:
    """A tensor the adapter stores whole, under the base's name, in the base's dtype (peft loads it
    into the base module's parameter)."""
    return ExprRef(name, _same, [ref], ref.shape, dtype)


# ---------------------------------------------------------------- applying


@dataclass
class _Module:
    """The LoRA tensors of one module, by role (A, B, bias, embedding A, embedding B)."""

    parts: dict[str, tuple[str, TensorRef]] = field(default_factory=dict)


_ROLES = (  # key suffix -> role
    (".lora_A.weight", "A"), (".lora_B.weight", "B"), (".lora_B.bias", "bias"),
    (".lora_embedding_A", "EA"), (".lora_embedding_B", "EB"),
)


def _classify(adapter: Adapter) -> tuple[dict[str, _Module], dict[str, tuple[str, TensorRef]]]:
    """The adapter's tensors: LoRA factors by module, and whole tensors by base tensor name."""
    modules: dict[str, _Module] = {}
    whole: dict[str, tuple[str, TensorRef]] = {}
    where = adapter.weights
    for key, ref in adapter.tensors.items():
        if not key.startswith(PREFIX):
            raise InputError(f"{where}: tensor {key!r} is not a peft LoRA weight (peft's names start "
                             f"with {PREFIX!r}); is this a LoRA from another tool?")
        rest = key[len(PREFIX):]
        if "lora_magnitude_vector" in rest:
            raise InputError(f"{where}: tensor {key!r} is a DoRA magnitude: DoRA adapters are not "
                             f"supported, only plain LoRA (W + scale * B @ A) is; merge it with peft's "
                             f"merge_and_unload() and use the merged model")
        role = next(((rest[: -len(suf)], r) for suf, r in _ROLES if rest.endswith(suf)), None)
        if role is not None:
            mod, r = role
            if not ref.dtype.is_floating_point:
                raise InputError(f"{where}: tensor {key!r} has dtype {str(ref.dtype)[6:]}; LoRA "
                                 f"factors must be floating point (a quantised adapter?)")
            modules.setdefault(mod, _Module()).parts[r] = (key, ref)
        elif re.search(r"(^|\.)(lora_|token_adapter|trainable_tokens)", rest):
            raise InputError(f"{where}: tensor {key!r} is not a plain LoRA weight (lora_A, lora_B, "
                             f"lora_embedding_A/B); this kind of adapter is not supported")
        else:  # modules_to_save, trained biases, saved embedding layers: the tensor, whole
            whole[rest.replace(".base_layer.", ".")] = (key, ref)
    return modules, whole


def apply_adapter(base: WeightSpace, adapter: Adapter, *, source: str | None = None) -> WeightSpace:
    """`base` with `adapter` applied, lazily: LoRA-touched tensors become `LoraRef`s, tensors the
    adapter stores whole replace the base's, the rest are the base's own refs. Checked from
    headers only; nothing is read."""
    modules, whole = _classify(adapter)
    if not modules and not whole:
        raise InputError(f"{adapter.weights}: the adapter holds no LoRA weights")
    where = adapter.path
    refs: dict[str, TensorRef] = dict(base.items())
    replaced: set[str] = set()
    # a tied output layer's saved copy (`lm_head.base_layer.weight`) is the embedding's weight
    for name, (key, ref) in sorted(whole.items(), key=lambda kv: kv[0].split(".")[0] in _OUTPUT_LAYERS):
        if name not in refs:
            mod = name.rsplit(".", 1)[0]
            tied = _tied_embedding(mod, base, tuple(ref.shape)) if name.endswith(".weight") else None
            if tied is not None and ".base_layer." in key:
                if tied in replaced:
                    continue
                name = tied
            else:
                raise InputError(
                    f"{where}: the adapter stores tensor {key!r}, but the base model {base.source} "
                    f"has no tensor {name!r}"
                    + ("; the base ties its output layer to the input embeddings, and an adapter "
                       "that trains them apart (modules_to_save) is not supported" if tied
                       else _closest(name, refs)))
        b = refs[name]
        if tuple(ref.shape) != tuple(b.shape):
            raise InputError(f"{where}: the adapter's {key!r} is {list(ref.shape)} but the base's "
                             f"{name!r} is {list(b.shape)}"
                             + ("; the adapter was trained with a resized vocabulary, which is not "
                                "supported" if "embed" in name or "lm_head" in name else ""))
        refs[name] = _replacement(name, ref, b.dtype)
        replaced.add(name)
    terms: dict[str, list[tuple]] = {}
    touched: dict[str, list[str]] = {}
    model_type = (base.meta.get("config") or {}).get("model_type")
    for mod, m in modules.items():
        for name, term in _module_terms(mod, m, adapter, base, refs, model_type):
            terms.setdefault(name, []).append(term)
            touched.setdefault(name, []).append(mod)
    for name, ts in terms.items():
        # peft merges module by module in the model's order: the embedding before the output layer
        order = sorted(range(len(ts)), key=lambda i: touched[name][i] in _OUTPUT_LAYERS)
        refs[name] = LoraRef(name, refs[name], [ts[i] for i in order], [touched[name][i] for i in order])
    meta = {**base.meta, "source": source or f"{base.source}+{adapter.path}",
            "lora": {"adapter": str(adapter.path.resolve()), "weights": str(adapter.weights.resolve()),
                     "modules": len(modules), "replaced": sorted(replaced)}}
    return WeightSpace(refs, meta)


def _module_terms(mod: str, m: _Module, adapter: Adapter, base: WeightSpace,
                  refs: dict[str, TensorRef], model_type: str | None):
    """The (tensor name, term) pairs one module adds: its weight's delta, and its bias's."""
    where, cfg = adapter.path, adapter.config
    p = m.parts
    embedding = "EA" in p or "EB" in p
    a_role, b_role = ("EA", "EB") if embedding else ("A", "B")
    if embedding and ("A" in p or "B" in p):
        raise InputError(f"{where}: module {mod!r} has both lora_A/B and lora_embedding_A/B weights")
    for role, label in ((a_role, "lora_A"), (b_role, "lora_B")):
        if role not in p:
            other = p.get(b_role if role == a_role else a_role, ("?",))[0]
            raise InputError(f"{where}: module {mod!r} has {other!r} but no {label}"
                             f"{'' if not embedding else ' (embedding)'} weight")
    if not cfg.targets(mod):
        raise InputError(f"{where}: module {mod!r} has LoRA weights, but adapter_config.json's "
                         f"target_modules {cfg.target_modules!r} does not name it (peft would not "
                         f"apply them)")
    (_, a), (_, b) = p[a_role], p[b_role]
    wname = f"{mod}.weight"
    if wname not in refs and len(a.shape) == len(b.shape) == 2:
        # an output layer tied to the input embeddings is not stored: peft's merge changes the
        # shared weight, so the delta goes to the embedding tensor
        wname = _tied_embedding(mod, base, (b.shape[0], a.shape[1])) or wname
    if wname not in refs:
        raise InputError(f"{where}: target module {mod!r} does not exist in the base model "
                         f"{base.source}: it has no tensor {wname!r}{_closest(wname, refs)}")
    w = refs[wname]
    if len(a.shape) > 2 or len(w.shape) > 2:
        raise InputError(f"{where}: module {mod!r}: LoRA on convolution layers (lora_A "
                         f"{list(a.shape)}, base {list(w.shape)}) is not supported")
    if len(a.shape) != 2 or len(b.shape) != 2 or a.shape[0] != b.shape[1]:
        raise InputError(f"{where}: module {mod!r}: lora_A {list(a.shape)} and lora_B "
                         f"{list(b.shape)} do not make a low-rank product (A must be [r, in] and "
                         f"B [out, r])")
    if not w.dtype.is_floating_point:
        raise InputError(f"{where}: module {mod!r}: the base tensor {wname!r} has dtype "
                         f"{str(w.dtype)[6:]}, which LoRA cannot be added to")
    r, scale = cfg.rank_and_scale(mod)
    if a.shape[0] != r:
        source = ("rank_pattern" if _pattern_key(cfg.rank_pattern, mod) in cfg.rank_pattern else "r")
        raise InputError(f"{where}: module {mod!r}: the weights have rank {a.shape[0]} but "
                         f"adapter_config.json's {source} gives {r}")
    out_f, in_f = b.shape[0], a.shape[1]
    if embedding:
        # peft: weight [num_embeddings, dim] += ((B @ A)^T).to(weight dtype); A [r, num], B [dim, r]
        if tuple(w.shape) != (in_f, out_f):
            raise _shape_error(where, mod, a, b, (in_f, out_f), w, wname, "(B @ A)^T")
        transposed, round_first = True, True
    else:
        transposed = _transposed(mod, tuple(w.shape), out_f, in_f, cfg, model_type)
        if transposed is None:
            raise _shape_error(where, mod, a, b, (out_f, in_f), w, wname, "B @ A")
        round_first = False
    if transposed:  # rows of (B @ A)^T are rows of A^T
        term = (_Transposed(a), _Factor(b, transpose=True), scale, round_first)
    else:
        term = (b, _Factor(a, transpose=False), scale, round_first)
    yield wname, term
    if "bias" in p:  # lora_bias: the base bias += scale * lora_B.bias
        bias_name, (bb_key, bb) = f"{mod}.bias", p["bias"]
        if bias_name not in refs:
            raise InputError(f"{where}: module {mod!r} has a lora_B bias ({bb_key!r}) but the base "
                             f"layer has no bias {bias_name!r}; peft cannot merge it either")
        if tuple(bb.shape) != tuple(refs[bias_name].shape):
            raise InputError(f"{where}: module {mod!r}: lora_B bias is {list(bb.shape)} but the base "
                             f"bias {bias_name!r} is {list(refs[bias_name].shape)}")
        yield bias_name, (bb, None, scale, False)


def _transposed(mod: str, shape: tuple[int, ...], out_f: int, in_f: int, cfg: LoraConfig,
                model_type: str | None) -> bool | None:
    """Whether the base stores this layer as (in, out) (Conv1D), None if neither layout fits.
    peft decides by the module's type, overriding fan_in_fan_out: here the shapes decide, and for
    a square layer the architecture (or, without a config, the adapter's flag)."""
    plain, flipped = shape == (out_f, in_f), shape == (in_f, out_f)
    if plain and flipped:
        return model_type in CONV1D_MODEL_TYPES if model_type else cfg.fan_in_fan_out
    return False if plain else True if flipped else None


def _shape_error(where: Path, mod: str, a: TensorRef, b: TensorRef, delta: tuple[int, int],
                 w: TensorRef, wname: str, what: str) -> InputError:
    return InputError(f"{where}: module {mod!r}: the LoRA delta {what} is {list(delta)} (lora_A "
                      f"{list(a.shape)}, lora_B {list(b.shape)}) but the base tensor {wname!r} is "
                      f"{list(w.shape)}; is the adapter for another model?")


def _closest(name: str, refs: dict[str, TensorRef]) -> str:
    close = difflib.get_close_matches(name, list(refs), n=1, cutoff=0.75)
    return f" (closest: {close[0]!r})" if close else ""


_OUTPUT_LAYERS = ("lm_head", "embed_out")
_INPUT_EMBEDDING = re.compile(r"(^|\.)(embed_tokens|wte|word_embeddings|embed_in|tok_embeddings|shared)"
                              r"\.weight$")


def _tied_embedding(mod: str, base: WeightSpace, shape: tuple[int, int]) -> str | None:
    """The input embedding an unstored output layer `mod` is tied to, if there is exactly one
    of the layer's shape (and config.json does not say the two are untied)."""
    if mod not in _OUTPUT_LAYERS or (base.meta.get("config") or {}).get("tie_word_embeddings") is False:
        return None
    found = [n for n, r in base.items() if _INPUT_EMBEDDING.search(n) and tuple(r.shape) == shape]
    return found[0] if len(found) == 1 else None


# ---------------------------------------------------------------- adapters on the Hub


def resolve_adapter_on_hub(ref: str) -> Path:
    """Download (or find in the cache, honouring HF_HUB_OFFLINE) an adapter's two files."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    from weightspace.hub import check_repo_id, scrub, split_hub_id

    repo, rev = split_hub_id(ref)
    if ref.endswith("@") or "@" in (rev or ""):
        raise SpecError(f"{ref!r}: not a valid Hub id (expected org/name or org/name@revision)")
    check_repo_id(repo)
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    try:
        p = Path(snapshot_download(repo_id=repo, revision=rev, allow_patterns=[CONFIG_NAME, *WEIGHTS_NAMES],
                                   cache_dir=os.environ.get("HF_HUB_CACHE") or None,
                                   local_files_only=offline))
    except (LocalEntryNotFoundError, RevisionNotFoundError) as e:
        if isinstance(e, RevisionNotFoundError) or isinstance(e.__cause__, RevisionNotFoundError):
            raise InputError(f"{ref}: revision {rev!r} does not exist in {repo} on the Hub") from None
        why = ("HF_HUB_OFFLINE is set" if offline else "the Hub is unreachable")
        raise InputError(f"{ref}: not a local path, and not in the Hub cache ({why})") from None
    except GatedRepoError:
        raise InputError(f"{ref}: {repo} is gated; accept its terms on the Hub") from None
    except RepositoryNotFoundError:
        raise InputError(f"{ref}: no such adapter on the Hub (or it is private and your token cannot "
                         f"see it)") from None
    except HfHubHTTPError as e:
        raise InputError(scrub(f"{ref}: Hub request failed: {str(e).splitlines()[0]}")) from None
    except Exception as e:  # noqa: BLE001 - network errors vary by backend
        raise InputError(scrub(f"{ref}: not a local path, and the Hub lookup failed: {e}")) from None
    if not (p / CONFIG_NAME).is_file():
        raise InputError(f"{ref}: the Hub repo has no {CONFIG_NAME}; is it a peft adapter?")
    return p


__all__ = ["Adapter", "LoraConfig", "LoraRef", "apply_adapter", "read_adapter_config",
           "resolve_adapter_on_hub"]
