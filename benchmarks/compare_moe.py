"""`wsmerge moe` against mergekit-moe 0.1.5 on the same tiny checkpoints, tensor by tensor.

    python benchmarks/compare_moe.py --mergekit-moe /tmp/mkvenv/bin/mergekit-moe

Three tiny Llama experts (zoo.tiny, seeded) and a WordLevel tokenizer; each case is one
mergekit-moe config that both tools run unchanged. mergekit 0.1.5 writes the experts in
transformers 5's fused layout (`mlp.experts.gate_up_proj`, `mlp.experts.down_proj`, router
`mlp.gate.weight`) and wsmerge the Hub's per-expert one (`block_sparse_moe.experts.E.w1/w2/w3`,
which transformers fuses on loading), so the tensors are compared after fusing ours. The
table gives the largest absolute difference per tensor group. Expected: experts, attention and
embeddings equal; cheap_embed routers equal to float rounding; hidden routers within bfloat16
rounding (mergekit runs the base in bfloat16, wsmerge in float32); random routers differ (mergekit
draws from torch's unseeded global generator). Not part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from weightspace.zoo.tiny import write_tiny_llama  # noqa: E402

WORDS = ["apple", "pear", "fig", "sum", "integral", "proof", "verb", "noun", "poem", "rhyme"]
EXPERTS = """experts:
  - source_model: {d}/ft0
    positive_prompts: ["apple pear", "fig"]
    negative_prompts: ["poem"]
  - source_model: {d}/ft1
    positive_prompts: ["sum integral proof"]
  - source_model: {d}/ft2
    positive_prompts: ["verb noun", "rhyme poem verb"]
"""
CASES = {
    "cheap_embed": "base_model: {d}/base\ngate_mode: cheap_embed\ndtype: float32\nexperts_per_token: 2\n" + EXPERTS,
    "hidden": "base_model: {d}/base\ngate_mode: hidden\ndtype: float32\nexperts_per_token: 2\n" + EXPERTS,
    "hidden_avg": "base_model: {d}/base\ngate_mode: hidden_avg\ndtype: float32\nexperts_per_token: 1\n" + EXPERTS,
    "random-bf16": "base_model: {d}/base\ngate_mode: random\ndtype: bfloat16\nexperts_per_token: 2\n" + EXPERTS,
}


def write_tokenizer(d: Path) -> None:
    specials = ["<unk>", "<s>", "</s>"]
    vocab = {w: i for i, w in enumerate(specials + WORDS)}
    added = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": True} for i, t in enumerate(specials)]
    tok = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
           "pre_tokenizer": {"type": "WhitespaceSplit"}, "post_processor": None, "decoder": None,
           "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"}}
    (d / "tokenizer.json").write_text(json.dumps(tok))
    (d / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>"}))


def tensors(d: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def fused(ours: dict[str, torch.Tensor], layers: int, n: int) -> dict[str, torch.Tensor]:
    """Our per-expert names in mergekit 0.1.5's (transformers 5's) fused layout."""
    out = {k: v for k, v in ours.items() if ".block_sparse_moe." not in k}
    for i in range(layers):
        p = f"model.layers.{i}.block_sparse_moe."
        out[f"model.layers.{i}.mlp.experts.gate_up_proj"] = torch.stack(
            [torch.cat([ours[f"{p}experts.{e}.w1.weight"], ours[f"{p}experts.{e}.w3.weight"]]) for e in range(n)])
        out[f"model.layers.{i}.mlp.experts.down_proj"] = torch.stack(
            [ours[f"{p}experts.{e}.w2.weight"] for e in range(n)])
        out[f"model.layers.{i}.mlp.gate.weight"] = ours[f"{p}gate.weight"]
    return out


def group(name: str) -> str:
    if name.endswith("mlp.gate.weight"):
        return "router"
    if ".mlp.experts." in name:
        return "experts"
    return "dense (attention, norms, embeddings, head)"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mergekit-moe", default="/tmp/mkvenv/bin/mergekit-moe")
    ap.add_argument("--only", nargs="*", choices=sorted(CASES), default=None)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        write_tiny_llama(d / "base", seed=0, layers=2)
        write_tokenizer(d / "base")
        for k in range(3):
            write_tiny_llama(d / f"ft{k}", seed=0, delta_seed=k + 1, delta_scale=0.05, layers=2)
        print("| case | tensor group | max abs diff | max abs value |")
        print("| --- | --- | --- | --- |")
        for name in args.only or CASES:
            spec = d / f"{name}.yaml"
            spec.write_text(CASES[name].format(d=d))
            mk, ws = d / f"mk-{name}", d / f"ws-{name}"
            subprocess.run([args.mergekit_moe, str(spec), str(mk)], check=True, capture_output=True)
            subprocess.run([sys.executable, "-m", "weightspace.cli.main", "moe", str(spec), str(ws),
                            "--no-progress"], check=True, capture_output=True, cwd=ROOT)
            theirs, ours = tensors(mk), fused(tensors(ws), 2, 3)
            if set(theirs) != set(ours):
                print(f"| {name} | names differ | only mergekit: {sorted(set(theirs) - set(ours))[:3]} | "
                      f"only wsmerge: {sorted(set(ours) - set(theirs))[:3]} |")
                continue
            worst: dict[str, tuple[float, float]] = {}
            for k, t in theirs.items():
                a, b = t.float(), ours[k].float()
                diff = float((a - b).abs().max()) if a.shape == b.shape else float("inf")
                g = group(k)
                old = worst.get(g, (0.0, 0.0))
                worst[g] = (max(old[0], diff), max(old[1], float(a.abs().max())))
            for g, (diff, scale) in worst.items():
                print(f"| {name} | {g} | {diff:.3g} | {scale:.3g} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
