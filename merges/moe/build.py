"""Build a sparse mixture of experts from dense models, as mergekit-moe does, streaming.

    plan = plan_moe(load_moe_spec("moe.yaml"), spec_dir=".")    # every check; no tensor read
    run_moe(plan, "runs/moe", device="cpu")                     # routers, then tensor by tensor

Output layouts (mergekit 0.1.5, mergekit/moe/mixtral.py and qwen.py; the names are those of the
checkpoints on the Hub, which transformers 5 fuses into `experts.gate_up_proj` on loading):

- Llama/Mistral experts -> MixtralForCausalLM: attention, norms, embeddings and lm_head from the
  base; `model.layers.N.block_sparse_moe.experts.E.w1/w2/w3.weight` = expert E's
  gate_proj/down_proj/up_proj of layer N; `model.layers.N.block_sparse_moe.gate.weight` the
  router (E, H).
- one shared expert (and Llama/Mistral/Qwen2 experts) -> Qwen2MoeForCausalLM:
  `model.layers.N.mlp.experts.E.{gate,up,down}_proj.weight`, the shared expert's MLP at
  `mlp.shared_expert.*`, routers `mlp.gate.weight` (E, H) and `mlp.shared_expert_gate.weight`
  (1, H); zero q/k/v biases where the inputs have none.

The output architecture is chosen as mergekit chooses it; where mergekit would build one of
its other architectures (DeepSeek MoE, Qwen3 MoE), the spec is refused with the reason.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from weightspace.card import Card, model_card
from weightspace.errors import InputError, SpecError
from weightspace.executor import Step, estimate_peak_bytes, execute
from weightspace.inputs import check_carried
from weightspace.ir import MemoryRef, TensorRef, WeightSpace
from weightspace.merges.moe.config import HIDDEN_MODES, PROMPT_MODES, Expert, MoESpec, check_spec
from weightspace.merges.moe.router import (
    cheap_embedding,
    degenerate_layers,
    gate_vectors,
    mean_hidden_states,
    prompt_tokenizer,
    random_gates,
    tokenize_prompts,
)
from weightspace.sink import DEFAULT_SHARD_SIZE, CheckpointSink, inputs_of
from weightspace.sources import locate, tokenizer_files
from weightspace.spec import parse_dtype

_MLP = re.compile(r"^model\.layers\.(\d+)\.mlp\.(gate_proj|up_proj|down_proj)\.weight$")
_MIXTRAL_NAMES = {"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"}
# mergekit's output architectures, in the order it tries them
_ARCHS = ("Mixtral", "DeepSeek MoE", "Qwen MoE", "Qwen3 MoE")


@dataclass
class MoEPlan:
    spec: MoESpec
    source: str                                # the spec file, for messages
    arch: str                                  # "mixtral" or "qwen2_moe"
    base: WeightSpace
    experts: list[WeightSpace]
    shared: list[WeightSpace]
    config: dict[str, Any]
    out_dtype: torch.dtype | None
    num_layers: int
    hidden: int
    steps: list[Step]                          # every output tensor but the routers
    router_names: list[tuple[str, str | None]]  # per layer: (router, shared expert gate or None)
    base_dir: Path | None                      # the base model's folder (for `hidden`)
    tokenizer_dir: Path | None                 # where the prompts' tokenizer is read
    tokenizer_files: dict[str, Path] = field(default_factory=dict)
    spec_path: Path | None = None
    seed: int = 0

    def outputs(self) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
        outs = [(s.name, s.dtype, s.shape) for s in self.steps]
        n = len(self.spec.experts)
        for router, shared in self.router_names:
            outs.append((router, self.router_dtype, (n, self.hidden)))
            if shared is not None:
                outs.append((shared, self.router_dtype, (1, self.hidden)))
        return outs

    @property
    def router_dtype(self) -> torch.dtype:
        return self.out_dtype or torch.float32

    def inputs(self) -> list[Path]:
        found = [*inputs_of(self.base)]
        for s in [*self.experts, *self.shared]:
            found += inputs_of(s)
        if self.tokenizer_dir is not None:
            found.append(self.tokenizer_dir)
        if self.spec_path is not None:
            found.append(self.spec_path)
        return found

    def summary(self) -> dict[str, Any]:
        outs = self.outputs()
        from weightspace.safetensors_io import nbytes_of

        write = sum(nbytes_of(s, d) for _, d, s in outs)
        return {
            "architecture": self.config["architectures"][0],
            "experts": len(self.spec.experts),
            "shared_experts": len(self.shared),
            "experts_per_token": self.spec.experts_per_token,
            "gate_mode": self.spec.gate_mode,
            "layers": self.num_layers,
            "tensors": len(outs),
            "parameters": sum(_numel(s) for _, _, s in outs),
            "read_bytes": sum(s.read_bytes for s in self.steps),
            "write_bytes": write,
            "peak_bytes": estimate_peak_bytes(self.steps, torch.float32),
            "dtype": str(self.out_dtype).replace("torch.", "") if self.out_dtype else None,
        }


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _open(ref: str, spec_dir: Path | None, what: str, source: str) -> tuple[WeightSpace, Path | None]:
    from weightspace.sources import open_located

    loc = locate(ref, spec_dir)
    try:
        space = open_located(ref, loc)
    except InputError as e:
        raise InputError(f"{source}: {what}: {e}") from None
    folder = Path(space.meta["path"]) if isinstance(space.meta.get("path"), (str, Path)) else None
    if folder is not None and not folder.is_dir():
        folder = folder.parent
    return space, folder


def _model_type(space: WeightSpace, what: str, source: str) -> str:
    cfg = space.meta.get("config")
    if not isinstance(cfg, dict) or not isinstance(cfg.get("model_type"), str):
        raise InputError(f"{source}: {what} ({space.source}) has no config.json with a model_type; "
                         f"an MoE is built from transformers checkpoints (Llama, Mistral or Qwen2)")
    return cfg["model_type"]


def choose_architecture(spec: MoESpec, model_types: list[str], source: str) -> str:
    """'mixtral' or 'qwen2_moe', as mergekit's `select_output_arch` picks; its other
    architectures are refused with what to change."""
    names = list(_ARCHS)
    if spec.architecture:
        names = [a for a in names if a.lower().startswith(spec.architecture.lower())]
        if not {"Mixtral", "Qwen MoE"} & set(names):
            raise SpecError(f"{source}: architecture {spec.architecture!r} matches none of "
                            f"mixtral, qwen (Qwen2-MoE); deepseek and qwen3 are mergekit's and "
                            f"not built here")
    same = len(set(model_types)) == 1
    kind = model_types[0]
    shared = spec.shared_experts or []
    why: dict[str, str] = {}

    def supports(a: str) -> bool:
        if a == "Mixtral":
            ok = not shared and same and kind in ("llama", "mistral")
            why[a] = ("Mixtral has no shared experts" if shared else
                      "Mixtral needs Llama or Mistral models, all of one model_type")
        elif a == "DeepSeek MoE":
            ok = (len(shared) <= 1 and not (shared and (shared[0].positive_prompts or shared[0].negative_prompts))
                  and same and kind in ("llama", "mistral"))
            why[a] = "DeepSeek MoE: needs at most one shared expert without prompts, Llama or Mistral models"
        elif a == "Qwen MoE":
            ok = (len(shared) == 1 and (spec.gate_mode == "random" or bool(shared[0].positive_prompts))
                  and same and kind in ("llama", "mistral", "qwen2"))
            why[a] = ("Qwen2-MoE needs exactly one shared expert (with prompts unless gate_mode is "
                      "random) and Llama, Mistral or Qwen2 models, all of one model_type")
        else:
            ok = not shared and all(t == "qwen3" for t in model_types)
            why[a] = "Qwen3 MoE needs Qwen3 models"
        return ok

    found = [a for a in names if supports(a)]
    if not same:
        raise SpecError(f"{source}: the base model and the experts are of different architectures "
                        f"({', '.join(sorted(set(model_types)))}); every model must have one model_type")
    if not found:
        reasons = "; ".join(why[a] for a in names)
        raise SpecError(f"{source}: no MoE architecture fits these models ({kind}, "
                        f"{len(shared)} shared expert(s)): {reasons}")
    pick = "Mixtral" if "Mixtral" in found else found[0]
    if pick == "DeepSeek MoE":
        raise SpecError(f"{source}: with {len(shared)} shared expert(s) without prompts mergekit would "
                        f"build a DeepSeek MoE, which wsmerge moe does not; give the shared expert "
                        f"positive_prompts and `architecture: qwen` for a Qwen2-MoE, or drop "
                        f"shared_experts for a Mixtral")
    if pick == "Qwen3 MoE":
        raise SpecError(f"{source}: Qwen3 experts make a Qwen3 MoE in mergekit, which wsmerge moe does "
                        f"not build; it builds Mixtral (Llama/Mistral) and Qwen2-MoE")
    return "mixtral" if pick == "Mixtral" else "qwen2_moe"


def plan_moe(spec: MoESpec, *, spec_dir: str | Path | None = None, source: str = "<moe spec>",
             allow_all_same: bool = False, seed: int = 0, spec_path: str | Path | None = None) -> MoEPlan:
    """Every check on the spec and the models' headers and configs; no tensor is read."""
    check_spec(spec, source, allow_all_same=allow_all_same)
    sd = Path(spec_dir) if spec_dir is not None else None
    base, base_dir = _open(spec.base_model, sd, "base_model", source)
    experts = [_open(e.source_model, sd, f"experts.{k}", source)[0] for k, e in enumerate(spec.experts)]
    shared = [_open(e.source_model, sd, f"shared_experts.{k}", source)[0]
              for k, e in enumerate(spec.shared_experts or [])]
    types = [_model_type(base, "base_model", source)]
    types += [_model_type(s, f"experts.{k}", source) for k, s in enumerate(experts)]
    types += [_model_type(s, f"shared_experts.{k}", source) for k, s in enumerate(shared)]
    arch = choose_architecture(spec, types, source)
    cfg = dict(base.meta["config"])
    layers, hidden = cfg.get("num_hidden_layers"), cfg.get("hidden_size")
    if not isinstance(layers, int) or not isinstance(hidden, int):
        raise InputError(f"{source}: base_model {base.source}: config.json lacks num_hidden_layers "
                         f"or hidden_size")
    _check_same_shapes(spec, base, experts, shared, cfg, source)
    out_dtype = parse_dtype(spec.dtype) if spec.dtype else _config_dtype(cfg)

    members = [(f"experts.{k}", e, s) for k, (e, s) in enumerate(zip(spec.experts, experts))]
    shared_members = [(f"shared_experts.{k}", e, s)
                      for k, (e, s) in enumerate(zip(spec.shared_experts or [], shared))]
    steps: list[Step] = []
    for name, ref in base.items():
        m = _MLP.match(name)
        if m:
            layer, proj = int(m[1]), m[2]
            for k, (_, e, s) in enumerate(members):
                out = (f"model.layers.{layer}.block_sparse_moe.experts.{k}.{_MIXTRAL_NAMES[proj]}.weight"
                       if arch == "mixtral" else f"model.layers.{layer}.mlp.experts.{k}.{proj}.weight")
                steps.append(_expert_step(out, s[name], e, proj, out_dtype, seed))
            for _, e, s in shared_members:
                out = f"model.layers.{layer}.mlp.shared_expert.{proj}.weight"
                steps.append(_expert_step(out, s[name], e, proj, out_dtype, seed))
            continue
        if ".mlp." in name:
            raise InputError(f"{source}: base_model {base.source}: tensor {name!r} is part of an MLP "
                             f"but not a gate_proj/up_proj/down_proj weight; an MoE expert has only those")
        if name.endswith("rotary_emb.inv_freq"):
            continue  # a buffer transformers computes
        if arch == "mixtral" and re.search(r"self_attn\.[qkvo]_proj\.bias$", name):
            raise InputError(f"{source}: base_model {base.source}: tensor {name!r}: Mixtral attention "
                             f"has no biases; these models need a Qwen2-MoE (architecture: qwen and "
                             f"one shared expert)")
        steps.append(_copy_step(name, ref, out_dtype))
    if arch == "qwen2_moe":
        steps += _zero_biases(base, cfg, out_dtype)
    missing = [n for n in range(layers) if not any(f"model.layers.{n}.mlp" in s.name
                                                   or f"model.layers.{n}.block_sparse_moe" in s.name
                                                   for s in steps)]
    if missing:
        raise InputError(f"{source}: base_model {base.source}: layer {missing[0]} has no "
                         f"mlp.gate_proj/up_proj/down_proj weights; only Llama-style MLPs become experts")
    routers = [(f"model.layers.{n}.block_sparse_moe.gate.weight", None) if arch == "mixtral" else
               (f"model.layers.{n}.mlp.gate.weight", f"model.layers.{n}.mlp.shared_expert_gate.weight")
               for n in range(layers)]

    tok_dir = None
    if spec.tokenizer_source is not None:
        tok_dir = _open_tokenizer_dir(spec.tokenizer_source, sd, source)
    elif spec.gate_mode in PROMPT_MODES:
        tok_dir = base_dir
    if spec.gate_mode in PROMPT_MODES:
        _check_prompt_tools(spec, base, base_dir, tok_dir, source, sd)
    carried = tokenizer_files(tok_dir) if tok_dir is not None else (
        tokenizer_files(base_dir) if base_dir is not None else {})
    plan = MoEPlan(spec=spec, source=source, arch=arch, base=base, experts=experts, shared=shared,
                   config=_out_config(cfg, arch, spec, out_dtype), out_dtype=out_dtype,
                   num_layers=layers, hidden=hidden, steps=steps, router_names=routers,
                   base_dir=base_dir, tokenizer_dir=tok_dir, tokenizer_files=carried,
                   spec_path=Path(spec_path) if spec_path is not None else None, seed=seed)
    return plan


def _open_tokenizer_dir(ref: str, spec_dir: Path | None, source: str) -> Path:
    loc = locate(ref, spec_dir)
    if loc.path is None or not Path(loc.path).is_dir():
        raise SpecError(f"{source}: tokenizer_source {ref!r}: no such directory (a folder with the "
                        f"tokenizer files, e.g. tokenizer.json and tokenizer_config.json)")
    return Path(loc.path)


def _check_prompt_tools(spec: MoESpec, base: WeightSpace, base_dir: Path | None, tok_dir: Path | None,
                        source: str, spec_dir: Path | None = None) -> None:
    """Before any work: the prompts can be tokenized and (for `hidden`) the base model run."""
    import importlib.util

    if importlib.util.find_spec("transformers") is None:
        raise SpecError(f"{source}: gate_mode {spec.gate_mode} tokenizes the experts' prompts (and "
                        f"{'runs the base model' if spec.gate_mode in HIDDEN_MODES else 'reads its embeddings'}), "
                        f"which needs transformers: pip install 'weightspace[hf]'; or use gate_mode: random")
    if tok_dir is None or not tokenizer_files(tok_dir):
        where = tok_dir if tok_dir is not None else spec.base_model
        raise SpecError(f"{source}: gate_mode {spec.gate_mode} tokenizes the experts' prompts, but "
                        f"{where} has no tokenizer files; add them, name a folder that has them "
                        f"with tokenizer_source, or use gate_mode: random")
    if spec.gate_mode in HIDDEN_MODES:
        if base_dir is None or locate(spec.base_model, spec_dir).lora is not None \
                or not (base_dir / "config.json").is_file():
            raise SpecError(f"{source}: gate_mode {spec.gate_mode} runs the base model with "
                            f"transformers, so base_model must be a model directory (not "
                            f"{spec.base_model}); or use gate_mode: cheap_embed or random")
    elif "model.embed_tokens.weight" not in base:
        raise InputError(f"{source}: gate_mode cheap_embed reads model.embed_tokens.weight, which "
                         f"{base.source} lacks")


def _check_same_shapes(spec: MoESpec, base: WeightSpace, experts: list[WeightSpace],
                       shared: list[WeightSpace], cfg: dict, source: str) -> None:
    """Every expert has the base's MLP tensors with the base's shapes and the base's layer count."""
    mlp = [n for n in base if _MLP.match(n)]
    named = [(f"experts.{k}", s) for k, s in enumerate(experts)]
    named += [(f"shared_experts.{k}", s) for k, s in enumerate(shared)]
    for what, s in named:
        ecfg = s.meta.get("config") or {}
        for key in ("num_hidden_layers", "hidden_size", "intermediate_size"):
            if ecfg.get(key) != cfg.get(key):
                raise SpecError(f"{source}: {what} ({s.source}) has {key} {ecfg.get(key)}, the base "
                                 f"model {cfg.get(key)}; experts must have the base's shape")
        for n in mlp:
            if n not in s:
                raise SpecError(f"{source}: {what} ({s.source}) lacks tensor {n!r}")
            if s[n].shape != base[n].shape:
                raise SpecError(f"{source}: {what} ({s.source}): tensor {n!r} has shape "
                                 f"{list(s[n].shape)}, the base model {list(base[n].shape)}")


def _config_dtype(cfg: dict) -> torch.dtype | None:
    name = cfg.get("torch_dtype") or cfg.get("dtype")
    try:
        return parse_dtype(name) if isinstance(name, str) else None
    except SpecError:
        return None


# The defaults of transformers 5's LlamaConfig, MistralConfig and Qwen2Config where the MoE's config
# class has other ones: a key the base's config.json leaves out means the base's default, and
# left out of the MoE's config it would mean Mixtral's (rope_theta 1e6 for 1e4, rms_norm_eps 1e-5
# for 1e-6, ...). mergekit writes them all (it goes through the source's config class).
_COMMON = {"vocab_size": 32000, "hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32,
           "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "bos_token_id": 1, "eos_token_id": 2,
           "hidden_act": "silu", "tie_word_embeddings": False, "attention_dropout": 0.0}
SOURCE_DEFAULTS = {
    "llama": {**_COMMON, "intermediate_size": 11008, "max_position_embeddings": 2048},
    "mistral": {**_COMMON, "intermediate_size": 14336, "max_position_embeddings": 131072,
                "num_key_value_heads": 8},
    "qwen2": {**_COMMON, "vocab_size": 151936, "intermediate_size": 22016,
              "max_position_embeddings": 32768, "num_key_value_heads": 32, "bos_token_id": None,
              "eos_token_id": None},
}


def with_source_defaults(cfg: dict) -> dict:
    """`cfg` with the defaults of its model_type written in where it leaves them out."""
    out = dict(cfg)
    defaults = dict(SOURCE_DEFAULTS.get(cfg.get("model_type"), {}))
    rope = out.get("rope_parameters")
    if isinstance(rope, dict) and "rope_theta" in rope:
        defaults.pop("rope_theta")
    for k, v in defaults.items():
        out.setdefault(k, v)
    out.setdefault("num_key_value_heads", out["num_attention_heads"])  # Llama's: one per head
    return out


def _out_config(cfg: dict, arch: str, spec: MoESpec, out_dtype: torch.dtype | None) -> dict:
    """The base's config.json turned into the MoE's, as mergekit's `_generate_config` does."""
    out = {k: v for k, v in with_source_defaults(cfg).items()
           if k not in ("_name_or_path", "transformers_version")}
    n, k = len(spec.experts), spec.experts_per_token
    if arch == "mixtral":
        out.update(model_type="mixtral", architectures=["MixtralForCausalLM"], num_local_experts=n,
                   num_experts_per_tok=k, sliding_window=None)
    else:
        size = cfg.get("intermediate_size")
        out.update(model_type="qwen2_moe", architectures=["Qwen2MoeForCausalLM"], num_experts=n,
                   num_experts_per_tok=k, decoder_sparse_step=1, norm_topk_prob=True,
                   sliding_window=None, use_sliding_window=False,
                   shared_expert_intermediate_size=size, moe_intermediate_size=size)
        out.pop("layer_types", None)  # qwen2's sliding-window layer list; Qwen2-MoE has none here
    if out_dtype is not None:
        out["torch_dtype"] = str(out_dtype).replace("torch.", "")
        out.pop("dtype", None)
    return out


def _expert_step(out: str, ref: TensorRef, expert: Expert, proj: str, dtype: torch.dtype | None,
                 seed: int) -> Step:
    noise, scale = expert.noise_scale, expert.residual_scale if proj == "down_proj" else None

    def compute(ts: list[torch.Tensor]) -> torch.Tensor:
        t = ts[0]
        if noise is not None:  # seeded per output tensor, so a run is reproducible
            g = torch.Generator().manual_seed(_tensor_seed(seed, out))
            t = t + torch.randn(t.shape, generator=g, dtype=torch.float32).to(t.device, t.dtype) * noise
        if scale is not None:
            t = t * scale
        return t

    return Step(out, ref.shape, dtype or ref.dtype, [ref], compute, info={"source": ref.name})


def _tensor_seed(seed: int, name: str) -> int:
    import zlib

    return (seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63


def _copy_step(name: str, ref: TensorRef, dtype: torch.dtype | None) -> Step:
    out_dt = dtype if dtype is not None and ref.dtype.is_floating_point else ref.dtype
    return Step(name, ref.shape, out_dt, [ref], lambda ts: ts[0], cast_inputs=ref.dtype.is_floating_point)


def _zero_biases(base: WeightSpace, cfg: dict, dtype: torch.dtype | None) -> list[Step]:
    """Qwen2-MoE attention has q/k/v biases; where the inputs have none they are zeros (mergekit)."""
    heads, hidden = cfg["num_attention_heads"], cfg["hidden_size"]
    head_dim = cfg.get("head_dim") or hidden // heads
    kv = cfg.get("num_key_value_heads") or heads
    steps = []
    for n in range(cfg["num_hidden_layers"]):
        for p, h in (("q", heads), ("k", kv), ("v", kv)):
            name = f"model.layers.{n}.self_attn.{p}_proj.bias"
            if name not in base:
                z = torch.zeros(h * head_dim, dtype=dtype or torch.float32)
                steps.append(_copy_step(name, MemoryRef(name, z), dtype))
    return steps


# ---------------------------------------------------------------- running


def compute_gates(plan: MoEPlan, *, device: str = "cpu", progress: bool = False) -> torch.Tensor:
    """(L, E + shared, H) router rows for the plan's gate_mode (see weightspace.merges.moe.router)."""
    spec = plan.spec
    gated = list(spec.experts)
    if spec.shared_experts and (any(e.positive_prompts for e in spec.shared_experts)
                                or spec.gate_mode in ("random", "uniform_random")):
        gated += spec.shared_experts
    if spec.gate_mode in ("random", "uniform_random"):
        return random_gates(plan.num_layers, len(gated), plan.hidden, plan.seed,
                            uniform=spec.gate_mode == "uniform_random")
    from transformers import AutoTokenizer

    tok = prompt_tokenizer(AutoTokenizer.from_pretrained(str(plan.tokenizer_dir), local_files_only=True))
    if spec.gate_mode == "cheap_embed":
        embed = plan.base["model.embed_tokens.weight"].load()

        def encode(prompts):
            return cheap_embedding(embed, tokenize_prompts(prompts, tok), plan.num_layers)
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(str(plan.base_dir), dtype=torch.float32,
                                                     local_files_only=True, trust_remote_code=False)
        model.to(device).eval()

        def encode(prompts):
            return mean_hidden_states(model, tokenize_prompts(prompts, tok),
                                      average=spec.gate_mode == "hidden_avg")
    gates = gate_vectors(gated, encode, progress=progress)
    if gates.shape[0] != plan.num_layers:
        raise InputError(f"{plan.source}: the base model gave {gates.shape[0]} hidden states, its "
                         f"config says {plan.num_layers} layers")
    return gates


def run_moe(plan: MoEPlan, out: str | Path, *, device: str = "cpu",
            shard_size: int = DEFAULT_SHARD_SIZE, overwrite: bool = False, progress: bool = False,
            copy_tokenizer: bool = True, write_card: bool = True, recipe: str | None = None,
            warn: Any = None) -> dict:
    """Compute the routers, then stream every tensor into OUT atomically; returns stats."""
    out = Path(out)
    files = plan.tokenizer_files if copy_tokenizer else {}
    check_carried(files)
    text = recipe if recipe is not None else plan.spec.model_dump_json(exclude_none=True)
    sink = CheckpointSink(out, plan.outputs(), shard_size=shard_size, overwrite=overwrite,
                          metadata={"weightspace_moe_spec": text}, inputs=plan.inputs())
    try:
        steps = _with_routers(plan, compute_gates(plan, device=device, progress=progress), warn)
        by_name = {s.name: s for s in steps}
        stats = execute([by_name[n] for n in sink.order], sink, device="cpu", compute_dtype=torch.float32,
                        progress=progress, desc="moe")
        sink.finish(config=plan.config, files=files, card=model_card(_card(plan, text)) if write_card else None,
                    texts={"mergekit_moe_config.yml": text})
    except BaseException:
        sink.abort()
        raise
    stats["out"] = str(out)
    stats["shards"] = len(sink.names)
    return stats


def _with_routers(plan: MoEPlan, gates: torch.Tensor, warn: Any) -> list[Step]:
    """The plan's steps plus one per router tensor (rows of `gates`, (L, E + shared, H))."""
    if warn is not None and (bad := degenerate_layers(gates)):
        warn(f"layer(s) {', '.join(map(str, bad))}: the router rows are nearly dependent (condition "
             f"number > 5); the prompts may be too similar and some experts seldom chosen")
    n = len(plan.spec.experts)
    steps = list(plan.steps)
    for layer, (router, shared) in enumerate(plan.router_names):
        steps.append(_copy_step(router, MemoryRef(router, gates[layer, :n].contiguous()), plan.router_dtype))
        if shared is not None:
            steps.append(_copy_step(shared, MemoryRef(shared, gates[layer, n:n + 1].contiguous()),
                                    plan.router_dtype))
    return steps


def _card(plan: MoEPlan, recipe: str) -> Card:
    hub = [h for s in [plan.base, *plan.experts, *plan.shared] if (h := s.meta.get("hub_id"))]
    return Card(method="moe", pretty_name=f"mixture of experts ({plan.config['architectures'][0]}, "
                                          f"gate_mode {plan.spec.gate_mode})",
                title=os.path.basename(os.path.normpath(str(plan.spec.base_model))) + " MoE",
                base_model=plan.spec.base_model,
                models=[plan.spec.base_model, *[e.source_model for e in plan.spec.experts],
                        *[e.source_model for e in plan.spec.shared_experts or []]],
                spec_yaml=recipe, hub_ids=list(dict.fromkeys(hub)), transformers=True)


__all__ = ["MoEPlan", "choose_architecture", "compute_gates", "plan_moe", "run_moe"]
