"""What the merge benchmark runs: synthetic checkpoints, one spec per method, and the job list.

    ckpt = make_checkpoints("134M", args)            # cached under WORKDIR/ckpt-<tag>/
    specs = write_specs(spec_dir, ckpt.models, "float32", ["linear", "ties"])
    jobs = job_list(args, tools, methods, ckpt.models, specs, out_root)

The checkpoints are written by make_checkpoints.py in a child process (model 0
is the base, the others the base plus seeded noise), so this process never
imports torch. The specs use the schema both wsmerge and mergekit read.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml
from _measure import Tool, safetensors_files

HERE = Path(__file__).resolve().parent
METHODS = ("linear", "task_arithmetic", "ties", "dare_ties", "breadcrumbs_ties", "della", "slerp",
           "model_stock")
# randomized in both tools with different generators: their outputs are not compared
RANDOMIZED = ("dare_ties", "della")
# (checkpoint dtype, share of each fine-tune's task-vector entries that are exactly zero)
CASES = {"fp32": ("float32", 0.0), "fp32-sparse50": ("float32", 0.5), "bf16": ("bfloat16", 0.0),
         "bf16-sparse50": ("bfloat16", 0.5), "fp16": ("float16", 0.0)}

# (method, tool, command, output path to clear before each run)
Job = tuple[str, str, list[str], Path]


@dataclass
class Checkpoints:
    """The synthetic checkpoints of one size: where they are and what they hold."""

    tag: str
    root: Path
    models: list[Path]
    settings: dict           # make_checkpoints.py's .complete.json: num_params, shape, ...
    inputs: list[Path]       # every safetensors file a merge reads
    input_bytes: int
    model_bytes: int


def size_tag(params: str, args: argparse.Namespace) -> str:
    """The name of a size's checkpoints, specs, outputs and logs under WORKDIR."""
    tag = f"{params}-{args.dtype}-n{args.n_models}-s{args.seed}"
    if getattr(args, "zero_fraction", 0.0):
        tag += f"-z{args.zero_fraction:g}"
    if args.hidden_size:
        tag += f"-h{args.hidden_size}"
    if args.layers:
        tag += f"-l{args.layers}"
    return tag


def make_checkpoints(params: str, args: argparse.Namespace) -> Checkpoints:
    """Write (or reuse) the N checkpoints of one size with make_checkpoints.py."""
    tag = size_tag(params, args)
    ckpt_root = args.workdir.resolve() / f"ckpt-{tag}"
    gen = [
        sys.executable, str(HERE / "make_checkpoints.py"), str(ckpt_root),
        "--params", params, "--n-models", str(args.n_models), "--dtype", args.dtype,
        "--seed", str(args.seed), "--shard-size", args.ckpt_shard_size,
    ]  # fmt: skip
    if getattr(args, "zero_fraction", 0.0):
        gen += ["--zero-fraction", str(args.zero_fraction)]
    if args.hidden_size:
        gen += ["--hidden-size", str(args.hidden_size)]
    if args.layers:
        gen += ["--layers", str(args.layers)]
    subprocess.run(gen, check=True)
    settings = json.loads((ckpt_root / ".complete.json").read_text())
    models = [ckpt_root / f"model_{k}" for k in range(args.n_models)]
    inputs = safetensors_files(models)
    return Checkpoints(
        tag=tag,
        root=ckpt_root,
        models=models,
        settings=settings,
        inputs=inputs,
        input_bytes=sum(p.stat().st_size for p in inputs),
        model_bytes=sum(p.stat().st_size for p in safetensors_files(models[:1])),
    )


def write_specs(spec_dir: Path, models: list[Path], dtype: str, methods: list[str]) -> dict:
    spec_dir.mkdir(parents=True, exist_ok=True)
    base, others = str(models[0]), [str(m) for m in models[1:]]
    n = len(models)
    specs = {
        "linear": {
            "merge_method": "linear",
            "models": [{"model": str(m), "parameters": {"weight": 1.0 / n}} for m in models],
            "dtype": dtype,
        },
        "task_arithmetic": {
            "merge_method": "task_arithmetic",
            "base_model": base,
            "models": [{"model": m, "parameters": {"weight": 0.5}} for m in others],
            "parameters": {"lambda": 1.0},
            "dtype": dtype,
        },
        "ties": {
            "merge_method": "ties",
            "base_model": base,
            "models": [{"model": m, "parameters": {"density": 0.5, "weight": 0.5}} for m in others],
            "dtype": dtype,
        },
        "dare_ties": {
            "merge_method": "dare_ties",
            "base_model": base,
            "models": [{"model": m, "parameters": {"density": 0.5, "weight": 0.5}} for m in others],
            "dtype": dtype,
        },
        "breadcrumbs_ties": {
            "merge_method": "breadcrumbs_ties",
            "base_model": base,
            "models": [{"model": m, "parameters": {"density": 0.5, "gamma": 0.01, "weight": 0.5}}
                       for m in others],
            "dtype": dtype,
        },
        "della": {
            "merge_method": "della",
            "base_model": base,
            "models": [{"model": m, "parameters": {"density": 0.5, "epsilon": 0.1, "weight": 0.5}}
                       for m in others],
            "parameters": {"lambda": 1.0},
            "dtype": dtype,
        },
        "slerp": {  # two models: the base and the first fine-tune
            "merge_method": "slerp",
            "base_model": base,
            "models": [{"model": base}, {"model": others[0]}],
            "parameters": {"t": 0.5},
            "dtype": dtype,
        },
        "model_stock": {
            "merge_method": "model_stock",
            "base_model": base,
            "models": [{"model": m} for m in others],
            "dtype": dtype,
        },
    }
    paths = {}
    for method in methods:
        path = spec_dir / f"{method}.yaml"
        path.write_text(yaml.safe_dump(specs[method], sort_keys=False))
        paths[method] = path
    return paths


def job_list(
    args: argparse.Namespace,
    tools: list[Tool],
    methods: list[str],
    models: list[Path],
    specs: dict,
    out_root: Path,
) -> list[Job]:
    """Start-up, the I/O floor (plain and --fsync), then every method with every tool."""
    jobs: list[Job] = []
    if not args.no_startup:
        cmd = [sys.executable, "-c", "import torch, safetensors"]
        jobs.append(("(startup)", "python+torch import", cmd, out_root / "none"))
    floor_out = out_root / "floor.bin"
    if not args.no_floor:
        cmd = [sys.executable, str(HERE / "io_floor.py"), "--out", str(floor_out)]
        cmd += ["--import-torch"] if args.floor_import_torch else []
        cmd += [str(m) for m in models]
        jobs.append(("(floor)", "io_floor", cmd, floor_out))
        jobs.append(("(floor)", "io_floor --fsync", cmd[:2] + ["--fsync"] + cmd[2:], floor_out))
    for method in methods:
        for tool in tools:
            out = out_root / f"{tool.name}-{method}"
            jobs.append((method, tool.name, tool.command(specs[method], out, args), out))
    return jobs
