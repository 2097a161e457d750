"""`wsmerge demo`: tiny checkpoints, several merges, a printed summary. No downloads.

    OUT/models/{base,ft_a,ft_b,ft_c}   tiny Llama-shaped checkpoints
    OUT/specs/<method>.yaml            the merge specs; models named relative to the spec
    OUT/merges/<method>/               the merged checkpoints
    OUT/.wsmerge-demo                  marks OUT as the demo's own, so a second run may replace it
"""

from __future__ import annotations

import json
import shlex
import time
from collections.abc import Callable
from pathlib import Path

import click

from weightspace.cli.options import Command, device_option

DEMO_SPECS = {
    "linear": """merge_method: linear
models:
  - model: ../models/ft_a
    parameters: {weight: 0.5}
  - model: ../models/ft_b
    parameters: {weight: 0.5}
""",
    "task_arithmetic": """merge_method: task_arithmetic
base_model: ../models/base
models:
  - model: ../models/ft_a
    parameters: {weight: 1.0}
  - model: ../models/ft_b
    parameters: {weight: 1.0}
parameters: {lambda: 0.8}
""",
    "ties": """merge_method: ties
base_model: ../models/base
models:
  - model: ../models/ft_a
    parameters: {weight: 1.0, density: 0.5}
  - model: ../models/ft_b
    parameters: {weight: 1.0, density: 0.5}
  - model: ../models/ft_c
    parameters: {weight: 1.0, density: 0.5}
""",
    "dare_ties": """merge_method: dare_ties
base_model: ../models/base
models:
  - model: ../models/ft_a
    parameters: {weight: 1.0, density: 0.5}
  - model: ../models/ft_b
    parameters: {weight: 1.0, density: 0.5}
parameters: {seed: 7}
""",
    "slerp": """merge_method: slerp
base_model: ../models/ft_a
models:
  - model: ../models/ft_a
  - model: ../models/ft_b
parameters:
  t:
    - filter: self_attn
      value: [0.0, 1.0]
    - value: 0.5
""",
    "model_stock": """merge_method: model_stock
base_model: ../models/base
models:
  - model: ../models/ft_a
  - model: ../models/ft_b
  - model: ../models/ft_c
""",
}


MARKER = ".wsmerge-demo"
_MARKER_TEXT = json.dumps({"written_by": "wsmerge demo", "layout": 1}) + "\n"


@click.command(cls=Command)
@click.argument("out", type=click.Path(file_okay=False, path_type=Path), default="wsmerge-demo")
@device_option
@click.option("--overwrite", is_flag=True, help="Replace OUT even if `wsmerge demo` did not write it.")
def demo(out: Path, device: str, overwrite: bool) -> None:
    """Build tiny checkpoints and merge them with several methods; needs no downloads.

    Writes a base model and three "fine-tunes" (base + seeded deltas) to
    OUT/models, merges them with linear, task_arithmetic, ties, dare_ties,
    slerp and model_stock into OUT/merges (specs in OUT/specs), and prints
    how far each merge lands from its inputs. A second run replaces the
    demo's own earlier output; any other existing OUT needs --overwrite.

    \b
    Examples:
      wsmerge demo
      wsmerge demo runs/demo --device cpu
    """
    run_demo(out, device=device, overwrite=overwrite, echo=click.echo)


def is_demo_dir(path: Path) -> bool:
    """True if `path` is a directory `wsmerge demo` wrote (it holds the demo's marker file)."""
    marker = Path(path) / MARKER
    try:
        return marker.is_file() and not marker.is_symlink() and marker.read_text() == _MARKER_TEXT
    except (OSError, UnicodeDecodeError):
        return False


def check_demo_out(out: Path, overwrite: bool) -> str | None:
    """Whether the demo may write OUT: a note on what it replaces (None: nothing), or a SpecError."""
    from weightspace.errors import SpecError

    if not (out.exists() or out.is_symlink()):
        return None
    if not out.is_dir() or out.is_symlink():
        raise SpecError(f"{out} exists and is not a directory; name another OUT (wsmerge demo OTHER_DIR)")
    if is_demo_dir(out):
        return f"replacing the demo written earlier in {out}/"
    if not any(out.iterdir()):
        return None
    if overwrite:
        return f"replacing {out}/ (--overwrite)"
    raise SpecError(f"{out} exists and was not written by `wsmerge demo`; pass --overwrite to replace it, "
                    f"or name another OUT (wsmerge demo OTHER_DIR)")


def run_demo(out: Path, device: str = "auto", overwrite: bool = False,
             echo: Callable[[str], None] = print) -> None:
    """Write the demo into OUT (atomically: built beside it, renamed into place at the end)."""
    from weightspace.files import atomic_dir

    out = Path(out)
    note = check_demo_out(out, overwrite)
    if note:
        echo(note)
    atomic_dir(out, True, lambda tmp: _write_demo(tmp, out, device, echo), inputs=())
    q = shlex.quote
    echo(f"\nspecs in {out / 'specs'}; rerun one with: wsmerge run {q(str(out / 'specs' / 'ties.yaml'))} "
         f"{q(str(out / 'ties-again'))}")
    echo(f"inspect a result with: wsmerge inspect {q(str(out / 'merges' / 'ties'))} "
         f"--vs {q(str(out / 'models' / 'base'))}")


def _write_demo(root: Path, out: Path, device: str, echo: Callable[[str], None]) -> None:
    """Fill `root` (a temporary directory that becomes `out`) with the demo; messages name `out`."""
    from weightspace.inspect import compare
    from weightspace.merge import plan_merge, run_plan
    from weightspace.sources import load_space
    from weightspace.spec import parse_spec
    from weightspace.zoo.tiny import write_tiny_llama

    models = root / "models"
    echo(f"writing tiny Llama-shaped checkpoints to {out / 'models'}/ (base + 3 fine-tunes)")
    write_tiny_llama(models / "base", seed=0)
    for k, name in enumerate(["ft_a", "ft_b", "ft_c"], start=1):
        write_tiny_llama(models / name, seed=0, delta_seed=k)
    base = load_space(models / "base")
    fts = {n: load_space(models / n) for n in ("ft_a", "ft_b", "ft_c")}
    specs = root / "specs"
    specs.mkdir(parents=True, exist_ok=True)
    echo(f"{'method':<16} {'seconds':>8} {'rel. dist to base':>18} {'cos(merged tv, tv_a)':>21} "
         f"{'cos(merged tv, tv_b)':>21}")
    for name, text in DEMO_SPECS.items():
        spec_path = specs / f"{name}.yaml"
        spec_path.write_text(text)
        spec = parse_spec(text, source=str(out / "specs" / f"{name}.yaml"))
        plan = plan_merge(spec, spec_dir=specs)    # the specs name their models relative to themselves
        t0 = time.perf_counter()
        dest = root / "merges" / name
        run_plan(plan, dest, device=device, overwrite=True, progress=False)
        dt = time.perf_counter() - t0
        merged = load_space(dest)
        rel = compare(base, merged)["overall_rel_diff"]
        coss = [_tv_cos(merged, fts[f], base) for f in ("ft_a", "ft_b")]
        echo(f"{name:<16} {dt:>8.3f} {rel:>18.5f} {coss[0]:>21.3f} {coss[1]:>21.3f}")
    (root / MARKER).write_text(_MARKER_TEXT)


def _tv_cos(merged, ft, base) -> float:
    """Cosine between the merged model's task vector and one fine-tune's, over all tensors."""
    import torch

    dot = na = nb = 0.0
    for n in base:
        b = base[n].load("cpu", torch.float64)
        x = merged[n].load("cpu", torch.float64) - b
        y = ft[n].load("cpu", torch.float64) - b
        dot += float((x * y).sum())
        na += float((x * x).sum())
        nb += float((y * y).sum())
    return dot / (na**0.5 * nb**0.5) if na > 0 and nb > 0 else 0.0
