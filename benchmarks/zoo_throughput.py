"""Models per minute: batched (one vmap over many models) vs one model at a time.

    python benchmarks/zoo_throughput.py                       # prints a table, writes results/zoo.json
    python benchmarks/zoo_throughput.py --models 32 --epochs 5 --threads 2

Every configuration trains the same models (same seeds, same data order): the
only difference is how many share one batched computation (`max_batch`). One
process, `--threads` torch threads; the process-pool speed-up of `zoo build`
comes on top (see the README).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from weightspace.zoo.data import load_task
from weightspace.zoo.train import ModelRun, TrainConfig, group_runs, train_batch

ARCHS = {
    "mlp w32": {"arch": "mlp", "width": 32, "depth": 2},
    "resmlp w32": {"arch": "resmlp", "width": 32, "depth": 2},
    "cnn w16": {"arch": "cnn", "width": 16, "depth": 2},
    "vit w32": {"arch": "vit", "width": 32, "depth": 2},
}


def measure(arch: dict, n: int, epochs: int, batch_size: int, max_batch: int) -> float:
    task = load_task("digits")
    cfg = TrainConfig(epochs=epochs, batch_size=batch_size)
    runs = [ModelRun(arch=arch, train=cfg, seed=s) for s in range(n)]
    t0 = time.perf_counter()
    for g in group_runs(runs, max_batch=max_batch):
        train_batch(g, task=task)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", type=int, default=16)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--archs", default=",".join(ARCHS), help="comma-separated: " + ", ".join(ARCHS))
    ap.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "zoo.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    print(f"{args.models} models x {args.epochs} epochs, digits (1078 train), batch {args.batch_size}, "
          f"{args.threads} thread(s)")
    print(f"{'architecture':<12} {'one at a time':>16} {'batched':>16} {'speed-up':>9}")
    for name in args.archs.split(","):
        arch = ARCHS[name]
        measure(arch, 2, 1, args.batch_size, 2)          # warm-up (allocator, first-call costs)
        single = measure(arch, args.models, args.epochs, args.batch_size, max_batch=1)
        batched = measure(arch, args.models, args.epochs, args.batch_size, max_batch=args.models)
        row = {"arch": name, "models": args.models, "epochs": args.epochs, "batch_size": args.batch_size,
               "threads": args.threads, "single_s": single, "batched_s": batched,
               "single_models_per_min": 60 * args.models / single,
               "batched_models_per_min": 60 * args.models / batched}
        rows.append(row)
        print(f"{name:<12} {row['single_models_per_min']:>9.1f} /min {row['batched_models_per_min']:>9.1f} /min "
              f"{single / batched:>8.1f}x")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"machine": platform.platform(), "torch": torch.__version__,
                                     "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
