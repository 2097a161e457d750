"""A peft LoRA adapter's format: adapter_config.json, peft's tensor names, the Hub download.

    config, weights = read_adapter_config("adapters/sql")   # checked; the weights not read
    modules, whole = classify(adapter)                       # LoRA factors by module; whole tensors
    path = resolve_adapter_on_hub("org/sql-lora@v1")         # adapter_config.json and the weights

Only plain LoRA (W + scale * B @ A) is accepted. Refused with a sentence that says what to do:
other peft methods, DoRA and the other LoRA variants, initialisations that change the base
weights (PiSSA, OLoRA, CorDA, LoftQ, LoRA-GA), trainable tokens, quantised factors.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from weightspace.errors import InputError, SpecError
from weightspace.files import read_json_object
from weightspace.ir import TensorRef, WeightSpace

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAMES = ("adapter_model.safetensors", "adapter_model.bin")
PREFIX = "base_model.model."  # peft's key prefix for the wrapped model

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
        r = self.rank_pattern.get(pattern_key(self.rank_pattern, module), self.r)
        alpha = self.alpha_pattern.get(pattern_key(self.alpha_pattern, module), self.lora_alpha)
        return r, alpha / (math.sqrt(r) if self.use_rslora else r)

    def targets(self, module: str) -> bool:
        """Whether `target_modules` names `module`, as peft matches it."""
        t = self.target_modules
        if t is None or t == "all-linear":
            return True
        if isinstance(t, str):
            return re.fullmatch(t, module) is not None
        return any(module == k or module.endswith("." + k) for k in t)


def pattern_key(patterns: dict, module: str) -> str:
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
    config = _check_config(read_json_object(cfg_file), cfg_file)
    weights = next((d / n for n in WEIGHTS_NAMES if (d / n).is_file()), None)
    if weights is None:
        has = ", ".join(sorted(p.name for p in d.iterdir())[:8])
        raise InputError(f"{d}: the adapter has no {' or '.join(WEIGHTS_NAMES)} (the folder has: {has})")
    return config, weights


def _check_config(raw: dict, where: Path) -> LoraConfig:
    """The LoraConfig of a plain LoRA adapter_config.json, every value checked."""
    _refuse_unsupported(raw, where)

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


def _refuse_unsupported(raw: dict, where: Path) -> None:
    """Other peft methods, LoRA variants and base-changing initialisations, each with a sentence."""
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


def _check_regex(pattern: str, what: str, where: Path) -> None:
    try:
        re.compile(pattern)
    except re.error as e:
        raise InputError(f"{where}: {what} {pattern!r} is not a valid regular expression ({e})") from None


# ---------------------------------------------------------------- peft's tensor names


@dataclass
class Module:
    """The LoRA tensors of one module, by role (A, B, bias, embedding A, embedding B)."""

    parts: dict[str, tuple[str, TensorRef]] = field(default_factory=dict)


_ROLES = (  # key suffix -> role
    (".lora_A.weight", "A"), (".lora_B.weight", "B"), (".lora_B.bias", "bias"),
    (".lora_embedding_A", "EA"), (".lora_embedding_B", "EB"),
)


def classify(adapter: Adapter) -> tuple[dict[str, Module], dict[str, tuple[str, TensorRef]]]:
    """The adapter's tensors: LoRA factors by module, and whole tensors by base tensor name."""
    modules: dict[str, Module] = {}
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
            modules.setdefault(mod, Module()).parts[r] = (key, ref)
        elif re.search(r"(^|\.)(lora_|token_adapter|trainable_tokens)", rest):
            raise InputError(f"{where}: tensor {key!r} is not a plain LoRA weight (lora_A, lora_B, "
                             f"lora_embedding_A/B); this kind of adapter is not supported")
        else:  # modules_to_save, trained biases, saved embedding layers: the tensor, whole
            whole[rest.replace(".base_layer.", ".")] = (key, ref)
    return modules, whole


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
