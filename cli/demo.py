"""`wsmerge demo`: tiny checkpoints, several merges, a printed summary. No downloads."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import torch

DEMO_SPECS = {
    "linear": """merge_method: linear
models:
  - model: models/ft_a
    parameters: {weight: 0.5}
  - model: models/ft_b
    parameters: {weight: 0.5}
""",
    "task_arithmetic": """merge_method: task_arithmetic
base_model: models/base
models:
  - model: models/ft_a
    parameters: {weight: 1.0}
  - model: models/ft_b
    parameters: {weight: 1.0}
parameters: {lambda: 0.8}
""",
    "ties": """merge_method: ties
base_model: models/base
models:
  - model: models/ft_a
    parameters: {weight: 1.0, density: 0.5}
  - model: models/ft_b
    parameters: {weight: 1.0, density: 0.5}
  - model: models/ft_c
    parameters: {weight: 1.0, density: 0.5}
""",
    "dare_ties": """merge_method: dare_ties
base_model: models/base
models:
  - model: models/ft_a
    parameters: {weight: 1.0, density: 0.5}
  - model: models/ft_b
    parameters: {weight: 1.0, density: 0.5}
parameters: {seed: 7}
""",
    "slerp": """merge_method: slerp
base_model: models/ft_a
models:
  - model: models/ft_a
  - model: models/ft_b
parameters:
  t:
    - filter: self_attn
      value: [0.0, 1.0]
    - value: 0.5
""",
    "model_stock": """merge_method: model_stock
base_model: models/base
models:
  - model: models/ft_a
  - model: models/ft_b
  - model: models/ft_c
""",
}


def run_demo(out: Path, device: str = "auto", echo: Callable[[str], None] = print) -> None:
    from weightspace.inspect import compare
    from weightspace.merge import plan_merge, run_plan
    from weightspace.sources import load_space
    from weightspace.spec import parse_spec
    from zoo.tiny import write_tiny_llama

    out = Path(out)
    models = out / "models"
    echo(f"writing tiny Llama-shaped checkpoints to {models}/ (base + 3 fine-tunes)")
    write_tiny_llama(models / "base", seed=0)
    for k, name in enumerate(["ft_a", "ft_b", "ft_c"], start=1):
        write_tiny_llama(models / name, seed=0, delta_seed=k)
    base = load_space(models / "base")
    fts = {n: load_space(models / n) for n in ("ft_a", "ft_b", "ft_c")}
    (out / "specs").mkdir(parents=True, exist_ok=True)
    echo(f"{'method':<16} {'seconds':>8} {'rel. dist to base':>18} {'cos(merged tv, tv_a)':>21} "
         f"{'cos(merged tv, tv_b)':>21}")
    for name, text in DEMO_SPECS.items():
        spec_path = out / "specs" / f"{name}.yaml"
        spec_path.write_text(text)
        spec = parse_spec(text, source=str(spec_path))
        plan = plan_merge(spec, spec_dir=out)
        t0 = time.perf_counter()
        dest = out / "merges" / name
        run_plan(plan, dest, device=device, overwrite=True, progress=False)
        dt = time.perf_counter() - t0
        merged = load_space(dest)
        rel = compare(base, merged)["overall_rel_diff"]
        coss = [_tv_cos(merged, fts[f], base) for f in ("ft_a", "ft_b")]
        echo(f"{name:<16} {dt:>8.3f} {rel:>18.5f} {coss[0]:>21.3f} {coss[1]:>21.3f}")
    echo(f"\nspecs in {out / 'specs'}; rerun one with: wsmerge run {out / 'specs' / 'ties.yaml'} "
         f"{out / 'ties-again'}")
    echo(f"inspect a result with: wsmerge inspect {out / 'merges' / 'ties'} --vs {models / 'base'}")


def _tv_cos(merged, ft, base) -> float:
    """Cosine between the merged model's task vector and one fine-tune's, over all tensors."""
    dot = na = nb = 0.0
    for n in base:
        b = base[n].load("cpu", torch.float64)
        x = merged[n].load("cpu", torch.float64) - b
        y = ft[n].load("cpu", torch.float64) - b
        dot += float((x * y).sum())
        na += float((x * x).sum())
        nb += float((y * y).sum())
    return dot / (na**0.5 * nb**0.5) if na > 0 and nb > 0 else 0.0
