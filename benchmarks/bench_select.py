"""Trim-threshold selection: counting bit patterns (select_magnitude) against numpy's introselect.

    python benchmarks/bench_select.py                 # 16.8M float32 magnitudes, median of 5

For dense task vectors and for ones with half the entries exactly zero, at densities 0.3, 0.5
and 0.7, the seconds to find the k-th largest magnitude and how many entries exceed it: the
selection TIES, breadcrumbs and the blocked path make per model and tensor. Introselect is timed
as the code before used it, partitioning a copy in place.
"""

from __future__ import annotations

import argparse
import time

import torch

from weightspace.merges._sparsify import select_magnitude


def introselect(mag: torch.Tensor, k: int) -> tuple[torch.Tensor, int]:
    n = mag.numel()
    buf = mag.clone()
    buf.numpy().partition(n - k)
    thr = buf[n - k].clone()
    return thr, int((buf[n - k:] > thr).sum())


def median_seconds(f, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        f()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=16_777_216, help="magnitudes per tensor")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    n = args.n
    base = torch.randn(n, generator=g) * 0.02
    cases = {
        "dense": (base + 0.002 * torch.randn(n, generator=g)) - base,
        "half zero": (base + 0.002 * torch.randn(n, generator=g) * (torch.rand(n, generator=g) >= 0.5)) - base,
    }
    print("| task vector | density | introselect s | counting s |")
    print("| --- | ---: | ---: | ---: |")
    for name, delta in cases.items():
        mag = delta.abs()
        for density in (0.3, 0.5, 0.7):
            k = int(density * n)
            v, below, equal = select_magnitude(mag, n - k + 1)
            thr, above = introselect(mag, k)
            assert float(v) == float(thr) and n - below - equal == above  # the same answer
            a = median_seconds(lambda m=mag, k=k: introselect(m, k), args.repeat)
            b = median_seconds(lambda m=mag, k=k: select_magnitude(m, n - k + 1), args.repeat)
            print(f"| {name} | {density} | {a:.3f} | {b:.3f} |")


if __name__ == "__main__":
    main()
