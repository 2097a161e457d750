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

The other way round, `weightspace.lora.extract.extract_lora(finetuned, base, out, rank=32)`
(or `energy=0.9`; not re-exported here: it opens models through weightspace.sources) writes
a fine-tune's task vector as a peft adapter: per linear layer a truncated SVD dW ~ B @ A with
lora_alpha = r (scale 1), B = U sqrt(S), A = sqrt(S) V^T (see weightspace.lora.extract).

A module per job: `adapter` (the format: adapter_config.json and its checks, peft's tensor
names, the refusals, the Hub download), `apply` (`apply_adapter`: which base tensor each
module changes, and how), `refs` (`LoraRef`: the math, when a tensor is loaded), `extract`
(`extract_lora`: adapters from fine-tunes), `merge_utils` (peft's combinations as pure tensor
functions); and `weightspace.lora.combine` (adapter-space merges, `wsmerge lora merge`: peft's
`add_weighted_adapter` from a spec, the plan and the streaming writer), imported by name,
since it reads adapters through weightspace.sources, which imports this package.

Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models".
"""

from __future__ import annotations

from weightspace.lora.adapter import (
    Adapter,
    LoraConfig,
    read_adapter_config,
    resolve_adapter_on_hub,
)
from weightspace.lora.apply import apply_adapter
from weightspace.lora.refs import LoraRef

__all__ = ["Adapter", "LoraConfig", "LoraRef", "apply_adapter", "read_adapter_config",
           "resolve_adapter_on_hub"]
