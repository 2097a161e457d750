"""Write synthetic Llama-shaped Hugging Face checkpoints for merge benchmarks.

Model 0 is the "base"; models 1..N-1 are the base plus small seeded Gaussian
noise (stand-ins for fine-tunes). Every tensor is generated from its own
seeded generator, so the output is deterministic for a seed and a tensor can be
regenerated without the ones before it. Tensors are written shard by shard
(``safetensors.torch.save_file`` per shard), so peak memory is about one shard,
not one model: a 4 GB checkpoint can be written with well under 4 GB of RAM.

No tokenizer files are written; merge tools must be told not to copy one
(``mergekit-yaml --no-copy-tokenizer``; a weightspace spec without
``tokenizer_source`` copies nothing).

Example::

    python benchmarks/make_checkpoints.py benchmarks/work/ckpt-134M --params 134M
"""

from __future__ import annotations

import argparse
import json
import math
import re
import shutil
import sys
import time
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
_SUFFIX = {"": 1, "K": 10**3, "M": 10**6, "B": 10**9, "G": 10**9, "T": 10**12}
_BYTE_SUFFIX = {
    "": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
    "KI": 2**10, "MI": 2**20, "GI": 2**30, "TI": 2**40,
}  # fmt: skip

COMPLETE_MARKER = ".complete.json"


def parse_count(text: str) -> int:
    """Parse a parameter count such as ``134M``, ``1.5B``, ``7e9`` or ``250000000``."""
    m = re.fullmatch(r"\s*([0-9.eE+]+)\s*([KMBGT]?)\s*", text.upper())
    if not m:
        raise ValueError(f"cannot parse count {text!r} (expected e.g. 134M, 1B, 7e9)")
    return int(round(float(m.group(1)) * _SUFFIX[m.group(2)]))


def parse_bytes(text: str) -> int:
    """Parse a byte size such as ``1G``, ``500MB``, ``2GiB`` (decimal unless ``i``)."""
    m = re.fullmatch(r"\s*([0-9.eE+]+)\s*([KMGT]?I?)B?\s*", text.upper())
    if not m:
        raise ValueError(f"cannot parse size {text!r} (expected e.g. 1G, 500MB, 2GiB)")
    return int(round(float(m.group(1)) * _BYTE_SUFFIX[m.group(2)]))


def normalize_dtype(name: str) -> str:
    name = DTYPE_ALIASES.get(name.lower(), name.lower())
    if name not in DTYPES:
        raise ValueError(f"unsupported dtype {name!r}; choose from {sorted(DTYPES)} or fp32/bf16")
    return name


@dataclass(frozen=True)
class LlamaShape:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def tensors(self) -> list[tuple[str, tuple[int, ...]]]:
        """Tensor names and shapes in Hugging Face LlamaForCausalLM order."""
        h, i, v = self.hidden_size, self.intermediate_size, self.vocab_size
        kv = self.num_key_value_heads * self.head_dim
        out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (v, h))]
        for layer in range(self.num_hidden_layers):
            p = f"model.layers.{layer}."
            out += [
                (p + "self_attn.q_proj.weight", (h, h)),
                (p + "self_attn.k_proj.weight", (kv, h)),
                (p + "self_attn.v_proj.weight", (kv, h)),
                (p + "self_attn.o_proj.weight", (h, h)),
                (p + "mlp.gate_proj.weight", (i, h)),
                (p + "mlp.up_proj.weight", (i, h)),
                (p + "mlp.down_proj.weight", (h, i)),
                (p + "input_layernorm.weight", (h,)),
                (p + "post_attention_layernorm.weight", (h,)),
            ]
        out += [("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]
        return out

    def num_params(self) -> int:
        return sum(math.prod(shape) for _, shape in self.tensors())

    def config(self, dtype: str) -> dict:
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "vocab_size": self.vocab_size,
            "max_position_embeddings": 2048,
            "hidden_act": "silu",
            "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0,
            "initializer_range": 0.02,
            "attention_bias": False,
            "mlp_bias": False,
            "tie_word_embeddings": False,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "use_cache": True,
            "torch_dtype": dtype,
        }


def _intermediate(hidden: int) -> int:
    # Llama's SwiGLU width: 8/3 * hidden, rounded up to a multiple of 256.
    return int(math.ceil(hidden * 8 / 3 / 256) * 256)


def shape_for_params(
    target: int,
    vocab_size: int = 32000,
    hidden_size: int | None = None,
    num_layers: int | None = None,
    gqa: int = 1,
) -> LlamaShape:
    """Pick a Llama shape whose parameter count is close to ``target``.

    Searches hidden sizes in multiples of 128 (head_dim 64), sets the number of
    layers to hit the target, and prefers a depth near ``hidden/64`` for small
    models and ``hidden/128`` for large ones (Llama-like aspect ratios). Either
    dimension can be fixed explicitly.
    """

    def make(h: int, n_layers: int) -> LlamaShape:
        heads = max(1, h // 64)
        kv = heads // gqa if heads % gqa == 0 else heads
        return LlamaShape(h, _intermediate(h), n_layers, heads, kv, vocab_size)

    def layers_for(h: int) -> int:
        fixed = make(h, 0).num_params()
        per_layer = make(h, 1).num_params() - fixed
        return max(1, round((target - fixed) / per_layer))

    if hidden_size is not None:
        return make(hidden_size, num_layers if num_layers is not None else layers_for(hidden_size))

    best: tuple[float, LlamaShape] | None = None
    for h in range(256, 16384 + 1, 128):
        n_layers = num_layers if num_layers is not None else layers_for(h)
        if n_layers < 2:
            break
        shape = make(h, n_layers)
        err = abs(shape.num_params() - target) / target
        ideal = h / 64 if h <= 1024 else h / 128
        score = err * 20 + abs(math.log(n_layers / ideal))
        if best is None or score < best[0]:
            best = (score, shape)
    if best is None:
        raise ValueError(f"target {target} too small for a Llama shape with vocab {vocab_size}")
    return best[1]


def _generator(seed: int, model_index: int, name: str, salt: str) -> torch.Generator:
    key = zlib.crc32(f"{salt}:{model_index}:{name}".encode())
    g = torch.Generator()
    g.manual_seed((seed * 1_000_003 + key) % (2**63))
    return g


def make_tensor(
    name: str, shape: tuple[int, ...], model_index: int, seed: int, noise: float, dtype: torch.dtype,
    zero_fraction: float = 0.0,
) -> torch.Tensor:
    """Base tensor (deterministic in seed and name) plus seeded noise for models > 0; with
    `zero_fraction`, that share of the entries (seeded, per model) gets no noise, so the task
    vector is exactly zero there (a partly frozen or sparsified fine-tune)."""
    if name.endswith("norm.weight"):
        t = torch.ones(shape, dtype=torch.float32)
        t.add_(torch.randn(shape, generator=_generator(seed, 0, name, "base")), alpha=0.01)
    else:
        t = torch.randn(shape, generator=_generator(seed, 0, name, "base"))
        t.mul_(0.02)
    if model_index > 0 and noise > 0:
        delta = torch.randn(shape, generator=_generator(seed, model_index, name, "noise"))
        if zero_fraction > 0:
            keep = torch.rand(shape, generator=_generator(seed, model_index, name, "zero")) >= zero_fraction
            delta.mul_(keep)
        t.add_(delta, alpha=noise)
    return t if dtype == torch.float32 else t.to(dtype)


def plan_shards(
    tensors: list[tuple[str, tuple[int, ...]]], itemsize: int, shard_bytes: int
) -> list[list[tuple[str, tuple[int, ...]]]]:
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in tensors:
        nbytes = math.prod(shape) * itemsize
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes
    return shards


def write_model(
    out_dir: Path,
    shape: LlamaShape,
    model_index: int,
    seed: int,
    noise: float,
    dtype: str,
    shard_bytes: int,
    zero_fraction: float = 0.0,
) -> int:
    """Write one checkpoint; returns bytes of tensor data written."""
    tdtype = DTYPES[dtype]
    itemsize = torch.empty((), dtype=tdtype).element_size()
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    shards = plan_shards(shape.tensors(), itemsize, shard_bytes)
    weight_map: dict[str, str] = {}
    total = 0
    for k, shard in enumerate(shards, start=1):
        fname = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        data = {
            name: make_tensor(name, shp, model_index, seed, noise, tdtype, zero_fraction)
            for name, shp in shard
        }
        total += sum(t.numel() * t.element_size() for t in data.values())
        save_file(data, str(tmp / fname), metadata={"format": "pt"})
        del data
        weight_map.update({name: fname for name, _ in shard})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    (tmp / "config.json").write_text(json.dumps(shape.config(dtype), indent=2) + "\n")
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)
    return total


def make_checkpoints(
    out_root: Path,
    params: int,
    n_models: int = 3,
    dtype: str = "float32",
    seed: int = 0,
    noise: float = 0.002,
    shard_bytes: int = 10**9,
    vocab_size: int = 32000,
    hidden_size: int | None = None,
    num_layers: int | None = None,
    zero_fraction: float = 0.0,
    reuse: bool = True,
    log=print,
) -> list[Path]:
    """Write ``n_models`` checkpoints under ``out_root/model_{k}``; returns their paths.

    With ``reuse``, a set already written with identical settings (recorded in
    ``out_root/.complete.json``) is returned as is.
    """
    dtype = normalize_dtype(dtype)
    shape = shape_for_params(params, vocab_size, hidden_size, num_layers)
    settings = {
        "shape": asdict(shape),
        "num_params": shape.num_params(),
        "n_models": n_models,
        "dtype": dtype,
        "seed": seed,
        "noise": noise,
        "shard_bytes": shard_bytes,
        **({"zero_fraction": zero_fraction} if zero_fraction else {}),
    }
    paths = [out_root / f"model_{k}" for k in range(n_models)]
    marker = out_root / COMPLETE_MARKER
    if reuse and marker.exists():
        try:
            if json.loads(marker.read_text()) == settings and all(p.is_dir() for p in paths):
                log(f"reusing checkpoints in {out_root}")
                return paths
        except json.JSONDecodeError:
            pass
    out_root.mkdir(parents=True, exist_ok=True)
    marker.unlink(missing_ok=True)
    log(
        f"writing {n_models} x {shape.num_params() / 1e6:.1f}M-param {dtype} Llama checkpoints "
        f"(hidden {shape.hidden_size}, layers {shape.num_hidden_layers}, "
        f"ffn {shape.intermediate_size}, vocab {shape.vocab_size}) to {out_root}"
    )
    for k, path in enumerate(paths):
        t0 = time.perf_counter()
        nbytes = write_model(path, shape, k, seed, noise, dtype, shard_bytes, zero_fraction)
        log(f"  {path.name}: {nbytes / 1e9:.3f} GB in {time.perf_counter() - t0:.1f} s")
    marker.write_text(json.dumps(settings, indent=2) + "\n")
    return paths


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description="Write N synthetic Llama-shaped sharded safetensors checkpoints "
        "(model_0 = base, model_1.. = base + seeded noise) for merge benchmarks.",
    )
    ap.add_argument("out", type=Path, help="output root; models go to OUT/model_0 .. model_{N-1}")
    ap.add_argument(
        "--params", default="134M", help="target parameter count, e.g. 134M, 1B (default 134M)"
    )
    ap.add_argument("--n-models", type=int, default=3, help="number of checkpoints (default 3)")
    ap.add_argument(
        "--dtype",
        default="float32",
        help="float32/fp32, bfloat16/bf16 or float16 (default float32)",
    )
    ap.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    ap.add_argument(
        "--noise",
        type=float,
        default=0.002,
        help="std of the noise added to models 1.. (default 0.002; base weights have std 0.02)",
    )
    ap.add_argument(
        "--shard-size", default="1G", help="max bytes per shard, e.g. 500MB, 1G, 2GiB (default 1G)"
    )
    ap.add_argument("--vocab-size", type=int, default=32000, help="vocabulary size (default 32000)")
    ap.add_argument(
        "--hidden-size", type=int, default=None, help="fix the hidden size instead of searching"
    )
    ap.add_argument(
        "--layers",
        type=int,
        default=None,
        help="fix the number of layers instead of solving for it",
    )
    ap.add_argument(
        "--zero-fraction", type=float, default=0.0,
        help="share of each fine-tune's task-vector entries that are exactly zero (default 0: dense)",
    )
    ap.add_argument("--force", action="store_true", help="rewrite even if a matching set exists")
    ap.add_argument(
        "--dry-run", action="store_true", help="print the chosen shape and size, write nothing"
    )
    args = ap.parse_args(argv)

    try:
        params = parse_count(args.params)
        dtype = normalize_dtype(args.dtype)
        shard_bytes = parse_bytes(args.shard_size)
    except ValueError as e:
        ap.error(str(e))
    if args.dry_run:
        shape = shape_for_params(params, args.vocab_size, args.hidden_size, args.layers)
        itemsize = torch.empty((), dtype=DTYPES[dtype]).element_size()
        n = shape.num_params()
        print(
            json.dumps(
                {**asdict(shape), "num_params": n, "bytes_per_model": n * itemsize}, indent=2
            )
        )
        return 0
    make_checkpoints(
        args.out,
        params,
        n_models=args.n_models,
        dtype=dtype,
        seed=args.seed,
        noise=args.noise,
        shard_bytes=shard_bytes,
        vocab_size=args.vocab_size,
        hidden_size=args.hidden_size,
        num_layers=args.layers,
        zero_fraction=args.zero_fraction,
        reuse=not args.force,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
