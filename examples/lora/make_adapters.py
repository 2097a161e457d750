"""Write the tiny peft LoRA adapters the `wsmerge lora merge` example combines (committed, so the
example runs from a fresh clone; making them needs peft and transformers).

    python examples/lora/make_adapters.py     # rewrites examples/lora/adapters/{sql,math}

Each is a seeded random LoRA on examples/models/base (lora_B is drawn too: peft starts it at 0).
"""

import json
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaForCausalLM

HERE = Path(__file__).parent
ADAPTERS = {  # name: (seed, LoraConfig)
    "sql": (1, dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj"])),
    "math": (2, dict(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "up_proj", "down_proj"])),
}

if __name__ == "__main__":
    for name, (seed, cfg) in ADAPTERS.items():
        model = get_peft_model(LlamaForCausalLM.from_pretrained(HERE.parent / "models" / "base"), LoraConfig(**cfg))
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for pname, p in model.named_parameters():
                if "lora_" in pname:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.05)
        out = HERE / "adapters" / name
        model.save_pretrained(out)
        # a path that means the same from any checkout (peft writes the absolute one given)
        c = json.loads((out / "adapter_config.json").read_text())
        c["base_model_name_or_path"] = "examples/models/base"
        (out / "adapter_config.json").write_text(json.dumps(c, indent=2, sort_keys=True) + "\n")
        (out / "README.md").unlink(missing_ok=True)
    print(f"wrote {HERE / 'adapters'}/sql, math")
