"""I/O floor for a merge: read every input byte, write one output of the model's size.

Reads every ``*.safetensors`` file of each input checkpoint directory in full
with plain ``readinto`` calls into one reusable buffer (the same bytes a merge
has to read), and writes the bytes of the first input to a single output file
as it goes, so the output is exactly one model's size. Nothing is parsed and
nothing is computed: no merge of these inputs can move fewer bytes.

``bench_merge.py`` runs this as its own child process and times it exactly like
the merge tools (wall clock and ``ru_maxrss`` from ``os.wait4``).

Example::

    python benchmarks/io_floor.py --out /tmp/floor.bin DIR0 DIR1 DIR2
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path


def shard_files(model_dir: Path) -> list[Path]:
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise SystemExit(f"io_floor: no *.safetensors files in {model_dir}")
    return files


def run_floor(
    inputs: list[Path], out: Path, chunk_bytes: int = 16 << 20, fsync: bool = False
) -> dict:
    buf = bytearray(chunk_bytes)
    view = memoryview(buf)
    read = written = 0
    t0 = time.perf_counter()
    with open(out, "wb") as fout:
        for k, model_dir in enumerate(inputs):
            for path in shard_files(model_dir):
                with open(path, "rb", buffering=0) as fin:
                    while True:
                        n = fin.readinto(view)
                        if not n:
                            break
                        read += n
                        if k == 0:
                            written += fout.write(view[:n])
        fout.flush()
        if fsync:
            os.fsync(fout.fileno())
    return {
        "bytes_read": read,
        "bytes_written": written,
        "seconds": time.perf_counter() - t0,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description="Read all safetensors bytes of the input checkpoints and write one "
        "output file the size of the first one (the I/O floor of a merge).",
    )
    ap.add_argument("inputs", nargs="+", type=Path, help="checkpoint directories")
    ap.add_argument("--out", type=Path, required=True, help="output file to write")
    ap.add_argument("--chunk", type=int, default=16, help="read/write chunk in MiB (default 16)")
    ap.add_argument("--fsync", action="store_true", help="fsync the output before exiting")
    ap.add_argument(
        "--import-torch",
        action="store_true",
        help="import torch first, so interpreter + torch start-up is part of the floor",
    )
    args = ap.parse_args(argv)
    if args.import_torch:
        import torch  # noqa: F401

    result = run_floor(args.inputs, args.out, args.chunk << 20, args.fsync)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
