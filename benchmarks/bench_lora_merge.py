"""Time `wsmerge lora merge` against peft's own add_weighted_adapter on the same two adapters.

    python benchmarks/make_checkpoints.py benchmarks/work/ckpt-134M --params 134M
    python benchmarks/bench_lora_merge.py benchmarks/work/ckpt-134M-float32-n3-s0/model_0 \
        --rank 16 --work benchmarks/work/lora-merge --out benchmarks/results/lora_merge_134M.json

Two seeded random peft-format adapters (r, lora_alpha 2r, on every linear layer of BASE) are
written once; then, per combination type, each tool runs in its own child process under
/usr/bin/time (wall seconds, peak RSS): `wsmerge lora merge SPEC -o OUT --device cpu`, and a
script that loads BASE with transformers, both adapters with peft, calls add_weighted_adapter
and saves the result (peft needs the model in memory; wsmerge reads only the adapters). The
outputs are compared tensor by tensor (not for the dare types: peft draws its masks from
torch's global stream, wsmerge per module from its seed).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

PEFT_SCRIPT = r"""
import json, sys, torch
from peft import PeftModel
from peft.utils import get_peft_model_state_dict
from safetensors.torch import save_file
from transformers import LlamaForCausalLM
base, a, b, kind, params, out = sys.argv[1:]
params = json.loads(params)
weights = params.pop("weights")
model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base), a, adapter_name="a")
model.load_adapter(b, adapter_name="b")
model.add_weighted_adapter(["a", "b"], weights, "m", combination_type=kind, **params)
sd = get_peft_model_state_dict(model, adapter_name="m")
save_file({k: v.contiguous() for k, v in sd.items()}, out)
"""

LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
TYPES = {"cat": {}, "ties": {"density": 0.5}, "svd": {}, "ties_svd": {"density": 0.5},
         "dare_ties_svd": {"density": 0.5}}


def write_adapters(base: Path, work: Path, rank: int) -> tuple[Path, Path]:
    import torch
    from safetensors.torch import save_file

    from weightspace.sources import load_local

    space = load_local(base)
    mods = [n[: -len(".weight")] for n in space if n.endswith(".weight") and n.split(".")[-2] in LINEAR]
    paths = []
    for k, name in enumerate(("a", "b")):
        d = work / name
        if not (d / "adapter_model.safetensors").is_file():
            d.mkdir(parents=True, exist_ok=True)
            g = torch.Generator().manual_seed(k)
            t = {}
            for m in mods:
                out_f, in_f = space[f"{m}.weight"].shape
                t[f"base_model.model.{m}.lora_A.weight"] = torch.randn(rank, in_f, generator=g) * 0.02
                t[f"base_model.model.{m}.lora_B.weight"] = torch.randn(out_f, rank, generator=g) * 0.02
            save_file(t, str(d / "adapter_model.safetensors"), metadata={"format": "pt"})
            (d / "adapter_config.json").write_text(json.dumps({
                "peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": list(LINEAR),
                "base_model_name_or_path": str(base), "task_type": "CAUSAL_LM"}))
        paths.append(d)
    return paths[0], paths[1]


def timed(cmd: list[str], log: Path) -> dict:
    """Wall seconds and peak RSS (MiB) of one child, from /usr/bin/time."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    with open(log, "w") as f:
        p = subprocess.run(["/usr/bin/time", "-f", "TIME %e %M", *cmd], stdout=f, stderr=subprocess.STDOUT,
                           env=env)
    text = log.read_text()
    if p.returncode:
        raise SystemExit(f"{cmd[0]} failed ({p.returncode}); see {log}:\n{text[-2000:]}")
    wall, rss = text.strip().splitlines()[-1].split()[1:]
    return {"wall_s": float(wall), "peak_rss_mib": round(int(rss) / 1024, 1)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("base", type=Path)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--work", type=Path, default=Path("benchmarks/work/lora-merge"))
    ap.add_argument("--types", default=",".join(TYPES))
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = ap.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    a, b = write_adapters(args.base, args.work, args.rank)
    wsmerge = str(Path(sys.executable).with_name("wsmerge"))
    rows = []
    for kind in args.types.split(","):
        params = TYPES[kind]
        spec = args.work / f"{kind}.yaml"
        spec.write_text(json.dumps({"combination_type": kind, "parameters": params, "adapters": [
            {"adapter": str(a.resolve()), "parameters": {"weight": 0.7}},
            {"adapter": str(b.resolve()), "parameters": {"weight": 0.3}}]}))
        out = args.work / f"out-{kind}"
        ours = timed([wsmerge, "lora", "merge", str(spec), "-o", str(out), "--overwrite", "--device", "cpu",
                      "--no-progress"], args.work / f"{kind}.wsmerge.log")
        theirs_file = args.work / f"peft-{kind}.safetensors"
        theirs = timed([sys.executable, "-c", PEFT_SCRIPT, str(args.base), str(a), str(b), kind,
                        json.dumps({**params, "weights": [0.7, 0.3]}), str(theirs_file)],
                       args.work / f"{kind}.peft.log")
        diff = None
        if not kind.startswith("dare"):
            from safetensors.torch import load_file

            x, y = load_file(str(out / "adapter_model.safetensors")), load_file(str(theirs_file))
            assert set(x) == set(y), "different tensor names"
            diff = max((x[k] - y[k]).abs().max().item() for k in x)
        rows.append({"type": kind, "wsmerge": ours, "peft": theirs, "max_abs_diff": diff})
        print(f"{kind:15s} wsmerge {ours['wall_s']:6.2f} s {ours['peak_rss_mib']:7.1f} MiB | "
              f"peft {theirs['wall_s']:6.2f} s {theirs['peak_rss_mib']:7.1f} MiB | max |diff| {diff}")
    result = {"base": str(args.base), "rank": args.rank, "loadavg": open("/proc/loadavg").read().split()[:3],
              "cpus": os.cpu_count(), "rows": rows}
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
