"""Peak RSS of `wsmerge atlas learn` on a Llama-shaped causal LM, by task-vector dtype.

    python benchmarks/atlas_lm_memory.py                  # 134M bf16, 2 task vectors, 3 steps
    python benchmarks/atlas_lm_memory.py --ckpt benchmarks/work/ckpt-134M-float32-n3-s0

The checkpoints are make_checkpoints.py's (model_0 the base, model_1 and model_2 its
fine-tunes; config.json, no tokenizer): build them with
`python benchmarks/make_checkpoints.py --sizes 134M --dtype bfloat16`. A whitespace
WordLevel tokenizer and a short text file are written into the work folder. Every run is
its own child process (peak RSS from the kernel, `_measure.run_child`): first one that
only opens the model and tokenizes the text (the floor: Python, torch, transformers and
the model), then `wsmerge atlas learn` with each --tv-dtype.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _measure import find_wsmerge, run_child  # noqa: E402

WORDS = [f"w{i}" for i in range(200)]
FLOOR = """
import sys
from weightspace.zoo.bind import open_batches, open_model
a = open_model(sys.argv[1], device="cpu")
open_batches(sys.argv[2], a, tokenizer=sys.argv[3], batch_size=4)
"""


def write_inputs(work: Path, lines: int, words: int) -> tuple[Path, Path]:
    tok = work / "tokenizer"
    tok.mkdir(parents=True, exist_ok=True)
    specials = ["<unk>", "<s>", "</s>"]
    vocab = {w: i for i, w in enumerate(specials + WORDS)}
    added = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": True} for i, t in enumerate(specials)]
    (tok / "tokenizer.json").write_text(json.dumps({
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
        "pre_tokenizer": {"type": "WhitespaceSplit"}, "post_processor": None, "decoder": None,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"}}))
    (tok / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "unk_token": "<unk>", "bos_token": "<s>",
        "eos_token": "</s>"}))
    text = work / "train.txt"
    text.write_text("\n".join(" ".join(WORDS[(7 * i + 3 * j) % len(WORDS)] for j in range(words))
                              for i in range(lines)) + "\n")
    return tok, text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ckpt", type=Path, default=HERE / "work" / "ckpt-134M-bfloat16-n3-s0")
    ap.add_argument("--work", type=Path, default=HERE / "work" / "atlas-lm")
    ap.add_argument("--tv-dtypes", default="auto,float32")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--lines", type=int, default=8)
    ap.add_argument("--words", type=int, default=32)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    exe, why = find_wsmerge(None)
    if exe is None:
        sys.exit(why)
    base, fts = args.ckpt / "model_0", [args.ckpt / "model_1", args.ckpt / "model_2"]
    if not base.is_dir():
        sys.exit(f"{base}: no checkpoint; build it with benchmarks/make_checkpoints.py")
    tok, text = write_inputs(args.work, args.lines, args.words)
    model_bytes = sum(f.stat().st_size for f in base.glob("*.safetensors"))
    rows = []
    floor = run_child([sys.executable, "-c", FLOOR, str(base), str(text), str(tok)],
                      args.work / "floor.log", timeout=None)
    rows.append({"run": "open model + tokenize (floor)", **floor})
    for dt in args.tv_dtypes.split(","):
        out = args.work / f"coeffs-{dt}.safetensors"
        cmd = [exe, "atlas", "learn", "--base", str(base), "--task-vectors", *map(str, fts),
               "--tokenizer", str(tok), "--data", str(text), "--steps", str(args.steps),
               "--batch-size", "4", "--lr", "0.01", "--device", "cpu", "--tv-dtype", dt,
               "-o", str(out), "--overwrite", "--no-progress"]
        r = run_child(cmd, args.work / f"learn-{dt}.log", timeout=None)
        if r["rc"] != 0:
            sys.exit(f"{' '.join(cmd)} exited {r['rc']}; see {args.work / f'learn-{dt}.log'}")
        from safetensors import safe_open

        with safe_open(out, "pt") as f:
            memory = json.loads(f.metadata()["meta"])["memory"]
        rows.append({"run": f"atlas learn --tv-dtype {dt}", "memory": memory, **r})
    print(f"model: {base} ({model_bytes / 1e6:.0f} MB of safetensors), 2 task vectors, "
          f"{args.steps} steps, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")
    for r in rows:
        extra = ""
        if "memory" in r:
            m = r["memory"]
            extra = (f"  task vectors {m['task_vectors'] / 1e6:.0f} MB ({m['tv_dtype']}), base "
                     f"{m['base'] / 1e6:.0f} MB ({m['compute_dtype']}, copied {m['base_copied'] / 1e6:.0f} MB)")
        split = r.get("sampled_peak_kib") or {}
        print(f"{r['run']:<34} peak RSS {r['maxrss_kib'] / 1024:7.0f} MiB (sampled: anonymous "
              f"{split.get('RssAnon', 0) / 1024:.0f}, file-backed {split.get('RssFile', 0) / 1024:.0f})  "
              f"wall {r['wall_s']:6.1f} s  load {r['load_before'][0]}{extra}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"model": str(base), "model_bytes": model_bytes, "steps": args.steps,
                                         "runs": rows}, indent=2, default=str))


if __name__ == "__main__":
    main()
