"""Tiny synthetic checkpoints for the demo, the examples and the tests.

    write_tiny_llama("base/", seed=0)                      # a random tiny Llama
    write_tiny_llama("ft/", seed=0, delta_seed=1)          # base + a seeded "fine-tune" delta

They load with `transformers.LlamaForCausalLM.from_pretrained`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from weightspace.ir import WeightSpace


def tiny_llama_config(hidden: int = 32, layers: int = 2, vocab: int = 64, intermediate: int = 64,
                      heads: int = 4, kv_heads: int = 2) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "vocab_size": vocab,
        "max_position_embeddings": 128,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "hidden_act": "silu",
    }


def tiny_llama_tensors(config: dict, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    h, i, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    hd = h // config["num_attention_heads"]
    kv = hd * config["num_key_value_heads"]

    def w(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * 0.02

    t = {"model.embed_tokens.weight": w(v, h)}
    for n in range(config["num_hidden_layers"]):
        p = f"model.layers.{n}."
        t[p + "self_attn.q_proj.weight"] = w(h, h)
        t[p + "self_attn.k_proj.weight"] = w(kv, h)
        t[p + "self_attn.v_proj.weight"] = w(kv, h)
        t[p + "self_attn.o_proj.weight"] = w(h, h)
        t[p + "mlp.gate_proj.weight"] = w(i, h)
        t[p + "mlp.up_proj.weight"] = w(i, h)
        t[p + "mlp.down_proj.weight"] = w(h, i)
        t[p + "input_layernorm.weight"] = torch.ones(h)
        t[p + "post_attention_layernorm.weight"] = torch.ones(h)
    t["model.norm.weight"] = torch.ones(h)
    t["lm_head.weight"] = w(v, h)
    return t


def write_tiny_llama(path: str | Path, *, seed: int = 0, delta_seed: int | None = None,
                     delta_scale: float = 0.01, dtype: torch.dtype = torch.float32,
                     overwrite: bool = True, **config_kw: int) -> Path:
    """Write a tiny Llama checkpoint; with `delta_seed`, base(seed) + a seeded delta."""
    config = tiny_llama_config(**config_kw)
    config["torch_dtype"] = str(dtype).replace("torch.", "")
    tensors = tiny_llama_tensors(config, seed)
    if delta_seed is not None:
        g = torch.Generator().manual_seed(10_000 + delta_seed)
        tensors = {k: v + torch.randn(v.shape, generator=g) * delta_scale for k, v in tensors.items()}
    tensors = {k: v.to(dtype) for k, v in tensors.items()}
    space = WeightSpace.from_tensors(tensors, {"source": str(path)})
    out = space.save(path, overwrite=overwrite, config=config)
    return out

