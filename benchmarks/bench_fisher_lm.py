"""`wsmerge fisher` on a Llama-shaped causal LM: examples per second and peak RSS, vmap against loop.

    OMP_NUM_THREADS=1 flock /tmp/i20-bench.lock python benchmarks/bench_fisher_lm.py \\
        --model benchmarks/work/ckpt-134M-float32-n3-s0/model_0 --examples 32 --tokens 128 \\
        --json benchmarks/results/fisher_lm.json

The checkpoints from benchmarks/make_checkpoints.py carry no tokenizer, so this writes a
work directory with links to the model's files, a whitespace WordLevel tokenizer over the
model's whole vocabulary (`t0`, `t1`, ... after <unk>, <s>, </s>) and a text file of
`--examples` lines of `--tokens` seeded random words: every line is exactly that many tokens,
so every example makes tokens - 1 next-token predictions. Each run is its own child process
(benchmarks/_measure.py: wall clock, ru_maxrss); examples/s is the command's own figure (the
estimation, not the start-up and loading).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _measure import find_wsmerge, run_child  # noqa: E402

HERE = Path(__file__).resolve().parent


def write_tokenizer(d: Path, vocab_size: int) -> list[str]:
    from weightspace.tokenizers.word_level import SPECIALS, write_word_tokenizer

    words = [f"t{i}" for i in range(vocab_size - len(SPECIALS))]
    write_word_tokenizer(d, words)
    return words


def prepare(model: Path, work: Path, examples: int, tokens: int, seed: int) -> tuple[Path, Path]:
    d = work / "model"
    d.mkdir(parents=True, exist_ok=True)
    for f in model.iterdir():
        if f.suffix in (".json", ".safetensors") and not (d / f.name).exists():
            os.symlink(f.resolve(), d / f.name)
    cfg = json.loads((model / "config.json").read_text())
    words = write_tokenizer(d, int(cfg["vocab_size"]))
    rng = random.Random(seed)
    text = work / "train.txt"
    text.write_text("\n".join(" ".join(rng.choice(words) for _ in range(tokens)) for _ in range(examples)) + "\n")
    return d, text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, default=HERE / "work" / "ckpt-134M-float32-n3-s0" / "model_0")
    ap.add_argument("--work", type=Path, default=HERE / "work" / "fisher-lm")
    ap.add_argument("--examples", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--estimator", default="empirical")
    ap.add_argument("--modes", default="vmap,loop,loop@256M",
                    help="comma-separated --per-example values, each optionally @SIZE, a "
                         "--max-stats-memory of its own (loop@256M: parameters in groups)")
    ap.add_argument("--max-stats-memory", default="2GiB")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    exe, why = find_wsmerge(None)
    if exe is None:
        sys.exit(why)
    model, text = prepare(args.model, args.work, args.examples, args.tokens, args.seed)
    rows = []
    # the floor: the same start, imports, model load and one batch's forward (which touches
    # every weight: transformers maps the checkpoint, so a bare load is not all resident)
    load = [sys.executable, "-c", "import sys, torch; from weightspace.zoo.bind import open_model; "
            "a = open_model(sys.argv[1], device=sys.argv[2]); b, t = int(sys.argv[3]), int(sys.argv[4]); "
            "ids = torch.randint(3, a.num_classes, (b, t), device=sys.argv[2])\n"
            "with torch.no_grad(): a.logits(a.params(), {'input_ids': ids})",
            str(model), args.device, str(args.batch_size), str(args.tokens)]
    run = run_child(load, args.work / "logs" / "load.log", timeout=None)
    rows.append({"mode": "load + forward", "rc": run["rc"], "wall_s": round(run["wall_s"], 1),
                 "peak_rss_gib": round(run["maxrss_kib"] / 2**20, 2), "load_before": run["load_before"],
                 "load_after": run["load_after"], "cmd": load})
    print(json.dumps({k: v for k, v in rows[-1].items() if k != "cmd"}), flush=True)
    for variant in args.modes.split(","):
        mode, _, stats = variant.partition("@")
        stats = stats or args.max_stats_memory
        out = args.work / f"fisher-{mode}-{stats}"
        cmd = [exe, "fisher", str(model), "--data", str(text), "--estimator", args.estimator,
               "--per-example", mode, "--n-examples", str(args.examples), "--batch-size", str(args.batch_size),
               "--max-length", str(args.tokens), "--max-stats-memory", stats,
               "--device", args.device, "-o", str(out), "--overwrite", "--no-progress"]
        run = run_child(cmd, args.work / "logs" / f"{mode}-{stats}.log", timeout=None)
        log = Path(run["log"]).read_text()
        m = re.search(r"(\d+) pass(?:es)? \(([a-z+]+)\), ([\d.]+) examples/s", log)
        row = {"mode": mode, "max_stats_memory": stats, "rc": run["rc"], "wall_s": round(run["wall_s"], 1),
               "peak_rss_gib": round(run["maxrss_kib"] / 2**20, 2),
               "passes": int(m[1]) if m else None, "per_example": m[2] if m else None,
               "examples_per_s": float(m[3]) if m else None,
               "load_before": run["load_before"], "load_after": run["load_after"], "cmd": cmd}
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "cmd"}), flush=True)
        if run["rc"] != 0:
            print(log[-2000:], file=sys.stderr)
    size = sum(f.stat().st_size for f in args.model.glob("*.safetensors"))
    result = {"model": str(args.model), "model_bytes": size, "examples": args.examples, "tokens": args.tokens,
              "batch_size": args.batch_size, "estimator": args.estimator, "device": args.device,
              "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "runs": rows}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
